"""Structured channel pruning on PP-OCRv4 det, no retraining: size, accuracy, latency.

    python benchmarks/prune_det.py                  # ratios 0.125, 0.25, 0.5
    python benchmarks/prune_det.py --ratios 0.25 --runs 40 --json out.json

For each ratio, three rankings/refits of ``onnxopt.pruning.prune``: weight magnitude (no
data), and activation ranking + sequential least-squares refit calibrated on the 10
``images("calib")`` photos or on ``images("calib-text")`` (the same photos with rendered
text: a text detector's own kind of input). Accuracy: ``det_mask_iou`` of the original fp32
model vs the pruned one on ``images("eval-text")`` and ``images("eval")`` (disjoint from
both calibration sets). Latency: every pruned model interleaved in rounds with the original
model and with the float-optimized, unpruned one (``onnxopt optimize``'s default pipeline,
which pruning starts from), 2 intra-op threads, ``--block`` runs each per round; speedups are
medians of per-round ratios against the original with bootstrap 95% intervals, and over the
optimized model the ratio of the two speedups.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    import onnx_ir as ir
    import onnxruntime as ort

    from onnxopt.bench import benchmark
    from onnxopt.optimize import optimize
    from onnxopt.pruning import prune
    from onnxopt.testing import real_models as rm

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratios", default="0.125,0.25,0.5")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--block", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    fp32 = str(rm.ppocr_model("det"))
    tmp = tempfile.mkdtemp(prefix="onnxopt-prune-")
    prep = lambda name: [{"x": rm.det_preprocess(img, 640)} for _, img in rm.images(name)]  # noqa: E731
    calib = {"photos": prep("calib"), "text": prep("calib-text")}
    evals = {"eval-text": prep("eval-text"), "eval": prep("eval")}
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    ref_sess = ort.InferenceSession(fp32, so, providers=["CPUExecutionProvider"])
    refs = {k: [ref_sess.run(None, f)[0] for f in v] for k, v in evals.items()}
    opt_path = os.path.join(tmp, "optimized.onnx")
    ir.save(optimize(fp32).model, opt_path)

    rows, paths = [], {}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for label, data in (("magnitude", None), ("calib photos", calib["photos"]), ("calib text", calib["text"])):
            t = time.perf_counter()
            res = prune(fp32, ratio=ratio, calib=data, progress=False)
            secs = time.perf_counter() - t
            path = os.path.join(tmp, f"det_{ratio}_{label.replace(' ', '_')}.onnx")
            ir.save(res.model, path)
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            row = {"ratio": ratio, "ranking": label, "params": res.report["params_after"],
                   "params_before": res.report["params_before"], "prune_s": round(secs, 1)}
            for k, feeds in evals.items():
                r = rm.det_mask_iou(refs[k], [sess.run(None, f)[0] for f in feeds])
                row[k] = (round(r["mean_iou"], 3), round(r["min_iou"], 3))
            rows.append(row)
            paths[(ratio, label)] = path
            print(f"ratio {ratio:<6} {label:13s} params {row['params_before']:,} -> {row['params']:,}  "
                  f"eval-text {row['eval-text'][0]:.3f} / {row['eval-text'][1]:.3f}  eval {row['eval'][0]:.3f} / "
                  f"{row['eval'][1]:.3f}  ({secs:.0f} s)", flush=True)

    # Latency: the structure depends on the ratio only (the rankings pick other channels).
    timed = [fp32, opt_path] + [paths[(row["ratio"], "magnitude")] for row in rows if row["ranking"] == "magnitude"]
    rep = benchmark(timed, threads=2, runs=args.runs, warmup=5, inputs=evals["eval-text"][0], block=args.block, memory=False)
    p50 = [r["latency_ms"]["p50"] for r in rep.results]
    print(f"\nlatency (2 threads, {args.runs} interleaved rounds of {args.block}): original {p50[0]:.1f} ms, "
          f"optimized {p50[1]:.1f} ms")
    ratios = [row["ratio"] for row in rows if row["ranking"] == "magnitude"]
    for i, c in enumerate(rep.comparisons):
        what = "optimized, not pruned" if i == 0 else f"pruned {ratios[i - 1]}"
        lo, hi = c["speedup_interval"] or (float("nan"), float("nan"))  # None: one round
        over_opt = c["speedup"] / rep.comparisons[0]["speedup"]  # both paired against the original
        print(f"  {what:22s} {c['speedup']:.2f}x over the original [{lo:.2f}, {hi:.2f}]"
              + (f", {over_opt:.2f}x over the optimized model" if i else ""))
        if i:
            for row in rows:
                if row["ratio"] == ratios[i - 1]:
                    row.update(speedup=c["speedup"], speedup_ci=[lo, hi], speedup_over_optimized=over_opt)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "original_ms": p50[0], "optimized_ms": p50[1]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
