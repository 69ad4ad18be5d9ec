"""Structured pruning of MiniLM-L6's FFN neurons, no retraining: accuracy and latency.

    python benchmarks/prune_minilm.py                      # ratio 0.25, 128 and 512 sentences
    python benchmarks/prune_minilm.py --ratios 0.125,0.25 --calib-sizes 512 --json out.json

For each ratio: ``onnxopt.pruning.prune`` without data (weight magnitude) and with N
calibration sentences (``sentences("calib", N)``, batches of 8 at sequence length 128:
activation ranking and the least-squares refit on the real tokens). Accuracy on 400
held-out sentences (``sentences("eval")``) as in ``compare_quantizers.py``: mask-pooled
embedding cosine (mean / min) and nearest-neighbour agreement. Latency: the pruned models
(one per ratio) interleaved with the original and the optimized, unpruned model, 2 threads,
20 runs per model per round (warm); speedups are medians of per-round ratios against the
original, and over the optimized model the ratio of the two speedups.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def main(argv=None) -> int:
    import onnx_ir as ir
    import onnxruntime as ort

    from onnxopt.bench import benchmark
    from onnxopt.optimize import optimize
    from onnxopt.pruning import prune
    from onnxopt.testing import real_models as rm

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratios", default="0.25")
    ap.add_argument("--calib-sizes", default="128,512")
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    fp32 = str(rm.minilm_model())
    tmp = tempfile.mkdtemp(prefix="onnxopt-prune-minilm-")
    ev = rm.encode_sentences(rm.sentences("eval", 400), 128)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3

    def embed(path):
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        return np.concatenate([rm.sentence_embeddings(s.run(None, {k: v[i:i + 25] for k, v in ev.items()})[0],
                                                      ev["attention_mask"][i:i + 25]) for i in range(0, 400, 25)])

    ref = embed(fp32)
    opt_path = os.path.join(tmp, "optimized.onnx")
    ir.save(optimize(fp32).model, opt_path)
    rows, timed = [], {}
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for n in [0] + [int(c) for c in args.calib_sizes.split(",")]:
            feeds = None
            if n:
                cal = rm.encode_sentences(rm.sentences("calib", n), 128)
                feeds = [{k: v[i:i + 8] for k, v in cal.items()} for i in range(0, n, 8)]
            t = time.perf_counter()
            res = prune(fp32, ratio=ratio, calib=feeds, progress=False)
            path = os.path.join(tmp, f"minilm_{ratio}_{n}.onnx")
            ir.save(res.model, path)
            agree = rm.embedding_agreement(ref, embed(path))
            row = {"ratio": ratio, "calibration_sentences": n, "params": res.report["params_after"],
                   "params_before": res.report["params_before"], "refit_layers": len(res.report["refit_layers"]),
                   "prune_s": round(time.perf_counter() - t, 1), **agree}
            rows.append(row)
            timed[ratio] = path  # the structure depends on the ratio only
            print(f"ratio {ratio:<6} {('%d sentences' % n) if n else 'magnitude':13s} params {row['params_before']:,} -> "
                  f"{row['params']:,}  cosine {agree['cosine_mean']:.3f} / {agree['cosine_min']:.3f}  "
                  f"NN {agree['nn_agreement']:.3f}  refit {row['refit_layers']}  ({row['prune_s']:.0f} s)", flush=True)
    one = {k: v[:1] for k, v in ev.items()}
    rep = benchmark([fp32, opt_path, *timed.values()], threads=2, runs=args.runs, warmup=5, inputs=one, block=20, memory=False)
    p50 = [r["latency_ms"]["p50"] for r in rep.results]
    print(f"\nlatency, warm (2 threads, {args.runs} rounds of 20): original {p50[0]:.2f} ms, optimized {p50[1]:.2f} ms")
    for i, c in enumerate(rep.comparisons):
        what = "optimized, not pruned" if i == 0 else f"pruned {list(timed)[i - 1]}"
        lo, hi = c["speedup_interval"] or (float("nan"), float("nan"))  # None: one round
        over = c["speedup"] / rep.comparisons[0]["speedup"]
        print(f"  {what:22s} {c['speedup']:.2f}x over the original [{lo:.2f}, {hi:.2f}]"
              + (f", {over:.2f}x over the optimized model" if i else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "latency_p50_ms": p50,
                       "speedups": [c["speedup"] for c in rep.comparisons]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
