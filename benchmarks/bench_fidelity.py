"""Does ``onnxopt bench`` report what a plain ``session.run`` loop measures?

The harness must add nothing measurable to the latency it reports. This script times
the same model both ways in the same process, in alternating rounds (harness, plain,
plain, harness, ...) so machine drift hits both alike:

- harness: ``onnxopt.bench.benchmark(model, runs=N, warmup=W)``, its reported p50;
- plain:   a new ``InferenceSession`` with the same thread settings (intra-op =
  physical cores, inter-op 1, sequential), W untimed runs, then N runs of
  ``t = perf_counter(); sess.run(None, feeds); times.append(perf_counter() - t)``.

Target: the harness's p50 is within 5% of the plain loop's (p50 over all runs of each
method; the per-round ratios are printed too, to show how much the machine moved).

A lockstep table alternates the two run by run (the plain run happens in the
harness's between-rounds progress callback), the sharpest comparison on a busy machine.
An A/A table times the det model against itself through the harness's interleaved
comparison (its speedup interval should contain 1). A last table repeats the fidelity
check on a one-node model (Identity on a tiny tensor), where a run costs microseconds,
so any per-run overhead of the harness shows up in absolute terms.

    python benchmarks/bench_fidelity.py                 # PP-OCRv4 det, 640x640, CPU
    python benchmarks/bench_fidelity.py --rounds 8 --runs 40
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from rich.console import Console
from rich.table import Table

from onnxopt.bench import benchmark, session_options
from onnxopt.bench.machine import cpu_model, physical_cores


def det_model_and_feeds(size: int):
    from onnxopt.testing.real_models import RealModelUnavailable, det_preprocess, images, ppocr_model

    try:
        path = ppocr_model("det")
    except RealModelUnavailable as e:
        sys.exit(f"bench_fidelity: {e}")
    try:
        name, rgb = images("eval", 1)[0]
        x = det_preprocess(rgb, size=size).astype(np.float32)
        source = f"real image {name}"
    except RealModelUnavailable:
        x = np.random.default_rng(0).uniform(-1, 1, (1, 3, size, size)).astype(np.float32)
        source = "uniform noise (scikit-image not installed)"
    return str(path), {"x": np.ascontiguousarray(x)}, source


def tiny_model(folder: str):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "tiny", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = os.path.join(folder, "identity.onnx")
    onnx.save(model, path)
    return path, {"x": np.ones((1, 8), np.float32)}


def plain_loop(path: str, feeds, *, runs: int, warmup: int, threads: int) -> np.ndarray:
    """The reference: what a user would write with perf_counter. Per-run latencies in ms."""
    sess = ort.InferenceSession(path, session_options(threads), providers=["CPUExecutionProvider"])
    for _ in range(warmup + 1):  # +1: the harness also does a first run before its warm-up
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return np.array(times) * 1000


def harness(path: str, feeds, *, runs: int, warmup: int, threads: int) -> np.ndarray:
    """onnxopt bench through its Python API; the per-run samples behind its reported statistics."""
    report = benchmark(path, inputs=feeds, runs=runs, warmup=warmup, threads=threads)
    r = report.results[0]
    samples = report.samples[(r["model"], r["ep"], r["batch"])]
    assert abs(float(np.percentile(samples, 50)) - r["latency_ms"]["p50"]) < 1e-9
    return samples


def compare(title: str, path: str, feeds, *, rounds: int, runs: int, warmup: int, threads: int, unit: str, scale: float):
    """Alternating rounds (bench, plain | plain, bench | ...). Returns the table and the pooled p50 ratio."""
    table = Table(title=title)
    for col in ("round", "first", f"onnxopt bench p50 ({unit})", f"plain loop p50 ({unit})", "bench / plain"):
        table.add_column(col, justify="right")
    h_all, p_all = [], []
    for r in range(rounds):
        order = ("bench", "plain") if r % 2 == 0 else ("plain", "bench")
        got = {}
        for which in order:
            fn = harness if which == "bench" else plain_loop
            got[which] = fn(path, feeds, runs=runs, warmup=warmup, threads=threads)
        h_all.append(got["bench"])
        p_all.append(got["plain"])
        hp, pp = np.median(got["bench"]), np.median(got["plain"])
        table.add_row(str(r + 1), order[0], f"{hp * scale:.3f}", f"{pp * scale:.3f}", f"{hp / pp:.3f}")
    ratios = [np.median(a) / np.median(b) for a, b in zip(h_all, p_all)]
    h, p = float(np.median(np.concatenate(h_all))), float(np.median(np.concatenate(p_all)))
    table.add_section()
    table.add_row(f"all {rounds * runs} runs", "", f"{h * scale:.3f}", f"{p * scale:.3f}", f"[bold]{h / p:.3f}[/bold]")
    table.caption = (
        f"p50 over all runs of each method (bold: the fidelity ratio); median of per-round ratios "
        f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})"
    )
    return table, h / p


def lockstep(path: str, feeds, *, runs: int, warmup: int, threads: int):
    """Harness and plain loop alternating run by run, in one process.

    The harness calls its progress callback between rounds (never inside a timed run,
    at most every 0.2 s; a det run takes longer, so after every round). The callback
    here times one plain ``session.run`` on its own session, so the two methods
    alternate run by run and see the same machine state, which the round-level
    comparison above cannot give on a busy machine.
    """
    sess = ort.InferenceSession(path, session_options(threads), providers=["CPUExecutionProvider"])
    for _ in range(warmup + 1):
        sess.run(None, feeds)
    plain: list[float] = []

    def after_round(description: str, done: int, total) -> None:
        if "timing" in description and 0 < done < runs:
            t = time.perf_counter()
            sess.run(None, feeds)
            plain.append(time.perf_counter() - t)

    report = benchmark(path, inputs=feeds, runs=runs, warmup=warmup, threads=threads, progress=after_round)
    r = report.results[0]
    h = r["latency_ms"]["p50"]
    p = float(np.percentile(np.array(plain) * 1000, 50))
    table = Table(title="lockstep: harness run, plain run, harness run, ... (same process, same moments)")
    for col in ("runs (bench / plain)", "onnxopt bench p50 (ms)", "plain loop p50 (ms)", "bench / plain"):
        table.add_column(col, justify="right")
    table.add_row(f"{r['runs']} / {len(plain)}", f"{h:.3f}", f"{p:.3f}", f"[bold]{h / p:.3f}[/bold]")
    return table, h / p


def aa_check(path: str, feeds, *, runs: int, warmup: int, threads: int):
    """The same model twice through onnxopt bench: the speedup's interval should hold 1.0."""
    report = benchmark([path, path], inputs=feeds, runs=runs, warmup=warmup, threads=threads)
    table = Table(title="A/A: the det model against itself, interleaved (no difference to find)")
    for col in ("model", "p50 (ms)", "p90 (ms)", "speedup vs first [95% CI]"):
        table.add_column(col, justify="right")
    comp = report.comparisons[0]
    for r in report.results:
        lat = r["latency_ms"]
        speed = "baseline" if r["model"] == comp["baseline"] else (
            f"{comp['speedup']:.3f}x [{comp['speedup_interval'][0]:.3f}, {comp['speedup_interval'][1]:.3f}]")
        table.add_row(r["model"], f"{lat['p50']:.3f}", f"{lat['p90']:.3f}", speed)
    lo, hi = comp["speedup_interval"]
    table.caption = f"{runs} interleaved rounds; interval {'contains' if lo <= 1 <= hi else 'EXCLUDES'} 1.0"
    return table


def loadavg() -> str:
    """Other processes on the machine are the main source of noise here: say how busy it was."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=640, help="det input height and width")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--runs", type=int, default=8, help="timed runs per round and method")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    ap.add_argument("--tiny-runs", type=int, default=2000)
    ap.add_argument("--skip-tiny", action="store_true", help="only the det comparison")
    ap.add_argument("--aa-runs", type=int, default=40, help="rounds of the det A/A check (0: skip it)")
    ap.add_argument("--lockstep-runs", type=int, default=60, help="runs of the det lockstep comparison (0: skip it)")
    args = ap.parse_args(argv)
    threads = args.threads or physical_cores()
    console = Console()
    path, feeds, source = det_model_and_feeds(args.size)
    console.print(
        f"{cpu_model()}, {physical_cores()} physical cores, onnxruntime {ort.__version__}; intra-op {threads}, inter-op 1, "
        f"sequential; det input 1x3x{args.size}x{args.size} from {source}; load average {loadavg()}"
    )
    table, ratio = compare(
        f"PP-OCRv4 det {args.size}x{args.size}, CPU: onnxopt bench vs a plain session.run loop",
        path, feeds, rounds=args.rounds, runs=args.runs, warmup=args.warmup, threads=threads, unit="ms", scale=1.0,
    )
    console.print(table)
    console.print(f"load average after the det rounds: {loadavg()}")
    lratio = None
    if args.lockstep_runs:
        ltable, lratio = lockstep(path, feeds, runs=args.lockstep_runs, warmup=args.warmup, threads=threads)
        console.print(ltable)
    if args.aa_runs:
        console.print(aa_check(path, feeds, runs=args.aa_runs, warmup=args.warmup, threads=threads))
    tratio = float("nan")
    with tempfile.TemporaryDirectory() as tmp:
        if args.skip_tiny:
            return _verdict(console, ratio, tratio, lratio)
        tpath, tfeeds = tiny_model(tmp)
        ttable, tratio = compare(
            "one Identity node on 8 floats: per-run overhead of the harness",
            tpath, tfeeds, rounds=args.rounds, runs=args.tiny_runs, warmup=100, threads=threads, unit="µs", scale=1000.0,
        )
    console.print(ttable)
    return _verdict(console, ratio, tratio, lratio)


def _verdict(console, ratio: float, tratio: float, lratio: float | None) -> int:
    def verdict(x: float) -> str:
        return "within" if abs(x - 1) <= 0.05 else "OUTSIDE"

    console.print(
        f"det p50 ratio bench/plain: rounds {ratio:.3f} ({verdict(ratio)} the 5% target)"
        + (f", lockstep {lratio:.3f} ({verdict(lratio)})" if lratio is not None else "")
        + f"; one-node model {tratio:.3f}"
    )
    ok = all(abs(x - 1) <= 0.05 for x in (ratio, lratio) if x is not None)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
