"""Single-thread, interleaved ORT latency of a model and its rewritten versions.

Where compare_optimizers.py times every tool at 2 threads, this one isolates the graph:
one intra-op thread (so a busy shared machine perturbs it less), every candidate run once
per round in a rotating order, reported as the median of the per-round ratios to the first
model (the original) with its quartiles. Use it to check a fusion's effect on latency with
ONNX Runtime's own graph optimizations off (what the rewrite itself buys) and on (that it
does not hide a pattern ORT would have fused).

    python benchmarks/fusion_latency.py det.onnx det.opt.onnx det.slim.onnx --shape x:1x3x640x640 --rounds 15
    python benchmarks/fusion_latency.py minilm.onnx minilm.opt.onnx --shape input_ids:1x128 --ort-opt on
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from onnxopt.inputs import make_sample_inputs, parse_shape_specs  # noqa: E402
from onnxopt.model_io import load_model  # noqa: E402


def session(path: str, optimize: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="the original first, then its rewritten versions")
    ap.add_argument("--shape", action="append", default=[], metavar="NAME:DIMS")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--ort-opt", choices=["off", "on", "both"], default="both")
    args = ap.parse_args(argv)
    feeds = make_sample_inputs(load_model(args.models[0]), parse_shape_specs(args.shape), seed=0)
    settings = ["off", "on"] if args.ort_opt == "both" else [args.ort_opt]
    for setting in settings:
        runs = []
        for path in args.models:
            s = session(path, setting == "on")
            f = {i.name: feeds[i.name] for i in s.get_inputs()}
            for _ in range(3):
                s.run(None, f)
            runs.append((s, f))
        times = [[] for _ in args.models]
        n = len(args.models)
        for r in range(args.rounds):
            for k in range(n):
                i = (k + r) % n
                s, f = runs[i]
                start = time.perf_counter()
                s.run(None, f)
                times[i].append(time.perf_counter() - start)
        base = np.array(times[0])
        print(f"ORT graph optimizations {setting}, 1 thread, {args.rounds} interleaved rounds")
        for path, t in zip(args.models, times):
            t = np.array(t)
            ratio = t / base
            print(
                f"  {os.path.basename(path):32s} median {np.median(t) * 1e3:9.2f} ms  min {t.min() * 1e3:9.2f} ms  "
                f"x orig {np.median(ratio):.3f} [{np.percentile(ratio, 25):.3f}-{np.percentile(ratio, 75):.3f}]"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
