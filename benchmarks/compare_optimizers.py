"""onnxopt against onnxsim, onnxslim and onnxscript's optimizer, side by side in one run.

For each model: node count after optimizing, optimize time (the library call, in a fresh
subprocess per tool so a crash or a hang is a result, not the end of the run), max output
difference from the original on the same inputs, and ONNX Runtime CPU latency with graph
optimizations enabled and disabled, measured interleaved (original, tool A, tool B, ...
rotating the order each round) so machine drift cancels; latency is reported as the median
and as the ratio to the original (with the spread of the per-round ratios).

    python benchmarks/compare_optimizers.py                  # the four real models
    python benchmarks/compare_optimizers.py --quick          # fewer latency rounds
    python benchmarks/compare_optimizers.py --extra my.onnx:x:1x3x224x224
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

TOOLS = ["onnxopt", "onnxsim", "onnxslim", "onnxscript"]
SHAPES = {
    "det": {"x": (1, 3, 640, 640)},
    "rec": {"x": (1, 3, 48, 320)},
    "cls": {"x": (1, 3, 48, 192)},
    "minilm": {"input_ids": (1, 128)},
}


def run_tool(tool: str, src: str, dst: str) -> dict:
    """Runs inside the child process: optimize src into dst with one tool, time the call."""
    import onnx

    if tool == "onnxopt":
        import onnxopt

        start = time.perf_counter()
        onnxopt.optimize_file(src, dst)
        return {"seconds": time.perf_counter() - start}
    if tool == "onnxsim":
        import onnxsim

        model = onnx.load(src)
        start = time.perf_counter()
        out, ok = onnxsim.simplify(model)
        seconds = time.perf_counter() - start
        if not ok:
            raise RuntimeError("onnxsim's own check failed")
    elif tool == "onnxslim":
        import onnxslim

        model = onnx.load(src)
        start = time.perf_counter()
        out = onnxslim.slim(model)
        seconds = time.perf_counter() - start
    elif tool == "onnxscript":
        import onnxscript.optimizer

        model = onnx.load(src)
        start = time.perf_counter()
        out = onnxscript.optimizer.optimize(model)
        seconds = time.perf_counter() - start
    else:
        raise ValueError(tool)
    onnx.save(out, dst)
    return {"seconds": seconds}


def optimize_in_subprocess(tool: str, src: pathlib.Path, dst: pathlib.Path, timeout: int = 900) -> dict:
    cmd = [sys.executable, __file__, "--_child", tool, str(src), str(dst)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["exit code %d" % proc.returncode])[-1]
        return {"error": f"crashed: {tail[:160]}"}
    return json.loads(lines[-1][len("RESULT ") :])


def node_count(path: pathlib.Path) -> int:
    import onnx_ir as ir

    from onnxopt.graph import count_nodes

    return count_nodes(ir.load(path))


def make_feeds(path: pathlib.Path, shapes: dict) -> dict:
    from onnxopt.inputs import make_sample_inputs
    from onnxopt.model_io import load_model

    return make_sample_inputs(load_model(path), shapes, seed=0)


def session(path: pathlib.Path, threads: int, optimize: bool):
    import onnxruntime as ort

    from onnxopt.bench import session_options

    # Timed in turn with other sessions: each one's spinning must end with its run.
    so = session_options(threads, stop_spinning_after_run=True)
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def interleaved_latency(paths: dict[str, pathlib.Path], feeds: dict, threads: int, optimize: bool, rounds: int,
                        block: int = 1) -> dict:
    """Median latency (ms) per candidate and median/IQR of per-round ratios to 'original'.

    ``block``: runs of each candidate back to back per round (warm caches, as a deployed
    model runs); the k-th run of a block is paired with the original's k-th run.
    """
    sessions = {name: session(p, threads, optimize) for name, p in paths.items()}
    names = list(sessions)
    for s in sessions.values():  # warm-up
        for _ in range(3):
            s.run(None, feeds)
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            for _ in range(block):
                start = time.perf_counter()
                sessions[n].run(None, feeds)
                times[n].append((time.perf_counter() - start) * 1000)
    base = np.array(times["original"])
    out = {}
    for n in names:
        arr = np.array(times[n])
        ratios = arr / base
        out[n] = {
            "median_ms": float(np.median(arr)),
            "ratio": float(np.median(ratios)),
            "ratio_iqr": [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))],
        }
    return out


def max_diff(src: pathlib.Path, dst: pathlib.Path, feeds: dict) -> tuple[float, bool]:
    ref = session(src, 2, True).run(None, feeds)
    new = session(dst, 2, True).run(None, feeds)
    worst, ok = 0.0, True
    for a, b in zip(ref, new):
        if a.shape != b.shape:
            return float("inf"), False
        d = np.abs(a.astype(np.float64) - b.astype(np.float64))
        worst = max(worst, float(d.max()) if d.size else 0.0)
        ok = ok and bool(np.all(d <= 1e-5 + 1e-4 * np.abs(a)))
    return worst, ok


def resolve_models(names: list[str], extra: list[str]) -> list[tuple[str, pathlib.Path, dict]]:
    from onnxopt.inputs import parse_shape_specs
    from onnxopt.testing.real_models import RealModelUnavailable, minilm_model, ppocr_model

    models = []
    for name in names:
        try:
            path = minilm_model() if name == "minilm" else ppocr_model(name)
        except RealModelUnavailable as e:
            print(f"skipping {name}: {e}", file=sys.stderr)
            continue
        models.append((name, pathlib.Path(path), SHAPES[name]))
    for spec in extra:
        path, _, shape = spec.partition(":")
        models.append((pathlib.Path(path).stem, pathlib.Path(path), parse_shape_specs([shape]) if shape else {}))
    return models


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        tool, src, dst = sys.argv[2:5]
        result = run_tool(tool, src, dst)
        print("RESULT " + json.dumps(result))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="det,rec,cls,minilm")
    ap.add_argument("--extra", action="append", default=[], metavar="PATH[:NAME:DIMS]")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--rounds", type=int, default=30, help="interleaved latency rounds per setting")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="10 latency rounds")
    ap.add_argument("--block", type=int, default=1,
                    help="runs of each model back to back per round (1: alternate; larger: warm caches)")
    ap.add_argument("--json", help="write all numbers here")
    args = ap.parse_args()
    rounds = 10 if args.quick else args.rounds
    tools = [t for t in args.tools.split(",") if t]

    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    all_rows = []
    with tempfile.TemporaryDirectory(prefix="compare-optimizers-") as tmp:
        for name, src, shapes in resolve_models([m for m in args.models.split(",") if m], args.extra):
            feeds = make_feeds(src, shapes)
            rows = {"original": {"tool": "original", "nodes": node_count(src), "seconds": None, "diff": 0.0, "ok": True, "error": ""}}
            outputs = {"original": src}
            for tool in tools:
                dst = pathlib.Path(tmp) / f"{name}.{tool}.onnx"
                console.print(f"[dim]{name}: {tool}...[/dim]")
                res = optimize_in_subprocess(tool, src, dst)
                row = {"tool": tool, "nodes": None, "seconds": res.get("seconds"), "diff": None, "ok": False, "error": res.get("error", "")}
                if not row["error"]:
                    try:
                        row["nodes"] = node_count(dst)
                        row["diff"], row["ok"] = max_diff(src, dst, feeds)
                        if not row["ok"]:
                            row["error"] = "outputs differ beyond rtol 1e-4"
                        outputs[tool] = dst
                    except Exception as e:  # ORT rejects the model: that is the peer's failure
                        row["error"] = f"ORT rejects it: {str(e).strip().splitlines()[0][:140]}"
                rows[tool] = row
            for optimize, key in ((True, "lat_on"), (False, "lat_off")):
                lat = interleaved_latency(outputs, feeds, args.threads, optimize, rounds, block=args.block)
                for tool, v in lat.items():
                    rows[tool][key] = v
            table = Table(title=f"{name} ({src.name}), {args.threads} threads, {rounds} interleaved rounds"
                          + (f" of {args.block} back-to-back runs" if args.block > 1 else ""))
            for col in ("tool", "nodes", "optimize s", "max |diff|", "ORT opt on: ms (x orig)", "ORT opt off: ms (x orig)", "failure"):
                table.add_column(col)
            for tool, row in rows.items():
                def fmt(v):
                    if not v:
                        return "-"
                    return f"{v['median_ms']:.2f} ({v['ratio']:.3f} [{v['ratio_iqr'][0]:.3f}-{v['ratio_iqr'][1]:.3f}])"

                table.add_row(
                    tool,
                    str(row["nodes"]) if row["nodes"] is not None else "-",
                    f"{row['seconds']:.2f}" if row["seconds"] is not None else "-",
                    f"{row['diff']:.2e}" if row["diff"] is not None else "-",
                    fmt(row.get("lat_on")),
                    fmt(row.get("lat_off")),
                    row["error"],
                )
                all_rows.append({"model": name, **row})
            console.print(table)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(all_rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
