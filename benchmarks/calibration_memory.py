"""Peak memory and time of calibration on PP-OCRv4 det (640x640), ours vs ONNX Runtime's.

Targets (issue 4): our peak RSS with 512 samples <= 1.2x that with 16 (memory must not grow
with the number of samples), and our calibration time <= ORT MinMax's at the same count.

Every (runner, sample count) runs in its own subprocess so peaks do not mix; the parent
reads the child's own ``ru_maxrss`` from ``os.wait4``. Runners:

- ``ours-minmax``      onnxopt.calibration.collect_stats(method="minmax")
- ``ours-percentile``  onnxopt.calibration.collect_stats(method="percentile") (99.99, 2048 bins)
- ``ours-entropy``, ``ours-mse``  the other histogram methods (same pass, another range search)
- ``ort-minmax``       onnxruntime.quantization create_calibrator(MinMax) + collect_data + compute_data
- ``ort-percentile``   ORT's Percentile (only with --ort-percentile and never at 512: it keeps every
                       activation of every sample, ~18 GB at 26 images)
- ``minilm-*``         (with --minilm N) all-MiniLM-L6-v2, MatMul inputs and outputs, N sentences
                       from the calibration split at 128 tokens, batch 1: the model whose attention mask
                       made ORT's Percentile/Entropy crash and peak at 4.0 GB with 100 sentences

Tensors: every Conv input and output (what ORT's calibrator picks with op_types=["Conv"]).
Data: the 10 calibration photographs of onnxopt.testing.real_models.images("calib"); sample i
uses image i % 10, and samples beyond the first 10 are deterministic random crops (60-100 %
of each side) with a horizontal flip on odd rounds, preprocessed like the detector's own
pipeline (det_preprocess: bilinear 640x640, BGR, mean/std 0.5). The same generator feeds
every runner, generated on the fly (never all in memory), and its cost is in every timing.
Runners are interleaved per sample count so machine drift hits all of them alike.

    python benchmarks/calibration_memory.py                  # 16, 128, 512
    python benchmarks/calibration_memory.py --counts 16,128 --runners ours-minmax,ort-minmax
    python benchmarks/calibration_memory.py --methods minmax,percentile,entropy,mse   # + ort-minmax

ORT's calibrator runs as ORT ships it: graph optimizations off, intra-op threads = ORT's
default (one per physical core), thread spinning on (ORT's default). Ours: ORT's default
thread count, spinning off, optimizations on for reductions-only (min-max) sessions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import run_measured  # noqa: E402  (benchmarks/ is not a package)

RUNNERS = (
    "ours-minmax",
    "ours-percentile",
    "ours-entropy",
    "ours-mse",
    "ort-minmax",
    "ort-percentile",
    "minilm-ours-minmax",
    "minilm-ours-percentile",
    "minilm-ort-minmax",
)


# ----------------------------------------------------------------------------- child side


def _cpu_s() -> float:
    """CPU seconds of this process, all threads (user + system): on a shared machine whose
    load changes by the minute this compares runners far more fairly than wall time."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class DetImages:
    """Re-iterable, generated on the fly: n preprocessed detector inputs from real photos."""

    def __init__(self, n: int, size: int):
        from onnxopt.testing import real_models as rm

        self.n, self.size = n, size
        self.images = [img for _, img in rm.images("calib")]
        self._pre = rm.det_preprocess

    def sample(self, i: int):
        import numpy as np

        img = self.images[i % len(self.images)]
        rnd = i // len(self.images)
        if rnd:
            rng = np.random.default_rng(i)
            h, w = img.shape[:2]
            ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            img = img[y : y + ch, x : x + cw]
            if rnd % 2:
                img = img[:, ::-1]
            img = np.ascontiguousarray(img)
        return {"x": self._pre(img, size=self.size)}

    def __len__(self):
        return self.n

    def __iter__(self):
        for i in range(self.n):
            yield self.sample(i)


def _conv_tensors(model) -> list[str]:
    names = []
    for node in model.graph:
        if node.op_type == "Conv":
            for v in (node.inputs[0], node.outputs[0]):
                if v is not None and not v.is_initializer():
                    names.append(v.name)
    return list(dict.fromkeys(names))


def child(runner: str, n: int, size: int) -> dict:
    import numpy as np

    from onnxopt.model_io import load_model
    from onnxopt.testing import real_models as rm

    if runner.startswith("minilm"):
        return _child_minilm(runner, n)
    path = rm.ppocr_model("det")
    model = load_model(path)
    data_src = DetImages(n, size)
    tensors = _conv_tensors(model)
    rss_before = _rss_mb()
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    if runner.startswith("ours"):
        from onnxopt.calibration import collect_stats, load_calibration_data

        data = load_calibration_data(data_src, model)
        stats = collect_stats(model, data, tensors, method=runner.split("-")[1], progress=False)
        ranges = {k: (s.min, s.max) for k, s in stats.items()}
    else:
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.i = 0

            def get_next(self):
                if self.i >= n:
                    return None
                self.i += 1
                return data_src.sample(self.i - 1)

        method = CalibrationMethod.MinMax if runner == "ort-minmax" else CalibrationMethod.Percentile
        with tempfile.TemporaryDirectory() as tmp:
            cal = create_calibrator(
                str(path), ["Conv"], augmented_model_path=os.path.join(tmp, "aug.onnx"), calibrate_method=method
            )
            cal.collect_data(Reader())
            result = cal.compute_data()
        ranges = {k: tuple(float(np.asarray(x).ravel()[0]) for x in v.range_value) for k, v in result.data.items()}
    elapsed = time.perf_counter() - t0
    import resource

    return {
        "runner": runner,
        "n": n,
        "time_s": elapsed,
        "cpu_s": _cpu_s() - cpu0,
        "rss_before_mb": rss_before,
        "self_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tensors": len(ranges),
    }


def _child_minilm(runner: str, n: int) -> dict:
    import resource

    from onnxopt.calibration import collect_stats
    from onnxopt.model_io import load_model
    from onnxopt.testing import real_models as rm

    path = rm.minilm_model()
    model = load_model(path)
    feeds = rm.encode_sentences(rm.sentences("calib", n), seq_len=128)
    batches = [{k: v[i : i + 1] for k, v in feeds.items()} for i in range(n)]
    names = []
    for node in model.graph:
        if node.op_type == "MatMul":  # inputs and outputs, the set ORT's calibrator picks
            vals = [*node.inputs, *node.outputs]
            names += [v.name for v in vals if v is not None and not v.is_initializer() and v.const_value is None]
    names = list(dict.fromkeys(names))
    rss_before = _rss_mb()
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    if runner == "minilm-ort-minmax":
        from onnxruntime.quantization import CalibrationMethod, create_calibrator

        with tempfile.TemporaryDirectory() as tmp:
            cal = create_calibrator(
                str(path), ["MatMul"], augmented_model_path=os.path.join(tmp, "aug.onnx"),
                calibrate_method=CalibrationMethod.MinMax,
            )
            it = iter(batches)
            reader = type("Reader", (), {"get_next": lambda self: next(it, None)})()
            cal.collect_data(reader)
            result = cal.compute_data()
        return {
            "runner": runner, "n": n, "time_s": time.perf_counter() - t0, "cpu_s": _cpu_s() - cpu0,
            "rss_before_mb": rss_before,
            "self_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tensors": len(result.data), "flagged": 0,
        }
    stats = collect_stats(model, batches, names, method=runner.rsplit("-", 1)[1], progress=False)
    return {
        "runner": runner,
        "n": n,
        "time_s": time.perf_counter() - t0,
        "cpu_s": _cpu_s() - cpu0,
        "rss_before_mb": rss_before,
        "self_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tensors": len(stats),
        "flagged": sum(1 for s in stats.values() if not s.finite or s.saturated),
    }


# ---------------------------------------------------------------------------- parent side


def run_child(runner: str, n: int, size: int, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", runner, "--n", str(n), "--size", str(size)]
    r = run_measured(cmd, timeout)
    if r["rc"] == "timeout":
        return {"runner": runner, "n": n, "error": f"timed out after {timeout:.0f} s"}
    if r["rc"] != 0:
        err = r["stderr"].strip()
        return {"runner": runner, "n": n, "error": f"exit {r['rc']}: {err.splitlines()[-1] if err else ''}"}
    res = json.loads(r["stdout"].strip().splitlines()[-1])
    res["peak_rss_mb"] = r["peak_rss"] / 2**20  # the child's own peak
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="16,128,512")
    ap.add_argument("--runners", default="ours-minmax,ours-percentile,ort-minmax")
    ap.add_argument(
        "--methods",
        help="shorthand for --runners ours-<m> for each method given, plus ort-minmax (e.g. minmax,percentile)",
    )
    ap.add_argument("--ort-percentile", action="store_true", help="also ORT Percentile (16 and 128 only; ~GBs)")
    ap.add_argument("--minilm", type=int, default=0, metavar="N", help="also MiniLM with N sentences (e.g. 100)")
    ap.add_argument("--size", type=int, default=640)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--child", choices=RUNNERS, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n, args.size)))
        return

    counts = [int(c) for c in args.counts.split(",")]
    runners = [r for r in args.runners.split(",") if r]
    if args.methods:
        runners = [f"ours-{m.strip()}" for m in args.methods.split(",") if m.strip()] + ["ort-minmax"]
    bad = [r for r in runners if r not in RUNNERS]
    if bad:
        ap.error(f"unknown runner {bad[0]!r} (choose from {', '.join(RUNNERS)})")
    if args.ort_percentile and "ort-percentile" not in runners:
        runners.append("ort-percentile")
    print(
        f"PP-OCRv4 det {args.size}x{args.size}, all Conv inputs/outputs; data: 10 real photos "
        "(skimage calib split), samples beyond 10 are random crops/flips of them"
    )
    results = []
    for n in counts:
        for r in runners:
            if r == "ort-percentile" and n > 128:
                print(f"  skip ort-percentile at {n}: it keeps every activation (~18 GB at 26 images)")
                continue
            res = run_child(r, n, args.size, args.timeout)
            results.append(res)
            if "error" in res:
                print(f"  {r:16s} n={n:4d}  ERROR {res['error']}", flush=True)
            else:
                print(
                    f"  {r:16s} n={n:4d}  {res['time_s']:8.1f} s wall {res['cpu_s']:8.1f} s CPU  "
                    f"peak {res['peak_rss_mb']:7.0f} MB "
                    f"(before calibration {res['rss_before_mb']:.0f} MB)",
                    flush=True,
                )
    _table(results, counts, runners)
    if args.minilm:
        print(f"\nall-MiniLM-L6-v2, MatMul inputs+outputs, {args.minilm} sentences x 128 tokens (ORT Percentile: crash, 4.0 GB):")
        for r in ("minilm-ours-minmax", "minilm-ort-minmax", "minilm-ours-percentile"):
            res = run_child(r, args.minilm, args.size, args.timeout)
            results.append(res)
            if "error" in res:
                print(f"  {r:24s} ERROR {res['error']}")
            else:
                print(
                    f"  {r:24s} {res['time_s']:7.1f} s wall {res['cpu_s']:7.1f} s CPU  peak {res['peak_rss_mb']:6.0f} MB  "
                    f"({res['tensors']} tensors"
                    + (f", {res['flagged']} non-finite/saturated)" if r.startswith("minilm-ours") else ")")
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def _table(results, counts, runners) -> None:
    ok = {(r["runner"], r["n"]): r for r in results if "error" not in r}
    print()
    print("CPU seconds of the calibration (all threads) and peak RSS of the process:")
    header = f"{'runner':16s}" + "".join(f" | {f'n={n}':>20s}" for n in counts) + " | peak max/min n"
    print(header)
    print("-" * len(header))
    for r in runners:
        cells = []
        for n in counts:
            x = ok.get((r, n))
            cells.append(f"{x['cpu_s']:7.1f}s {x['peak_rss_mb']:7.0f}MB" if x else f"{'-':>20s}")
        lo, hi = ok.get((r, counts[0])), ok.get((r, counts[-1]))
        ratio = f"{hi['peak_rss_mb'] / lo['peak_rss_mb']:.2f}x" if lo and hi else "-"
        print(f"{r:16s}" + "".join(f" | {c:>20s}" for c in cells) + f" | {ratio}")
    print()
    for r in runners:
        if not r.startswith("ours"):
            continue
        parts = []
        for n in counts:
            a, b = ok.get((r, n)), ok.get(("ort-minmax", n))
            if a and b:
                parts.append(f"n={n}: CPU {a['cpu_s'] / b['cpu_s']:.2f}x, wall {a['time_s'] / b['time_s']:.2f}x")
        if parts:
            print(f"time {r} / ort-minmax: " + "; ".join(parts))
    for r in runners:
        lo, hi = ok.get((r, counts[0])), ok.get((r, counts[-1]))
        if lo and hi and len(counts) > 1:
            print(f"peak {r} n={counts[-1]} / n={counts[0]}: {hi['peak_rss_mb'] / lo['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
