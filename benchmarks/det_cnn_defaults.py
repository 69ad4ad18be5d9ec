"""PP-OCRv4 det: what each of ``quantize``'s CNN defaults does, step by step, measured.

    python benchmarks/det_cnn_defaults.py                 # steps + interleaved latency
    python benchmarks/det_cnn_defaults.py --noise-floor   # also the fp32 model's noise floor
    python benchmarks/det_cnn_defaults.py --runs 60 --json out.json

Calibration: the 10 ``images("calib")`` photos (``det_preprocess`` 640x640). Accuracy:
``det_mask_iou`` of fp32 vs int8 on ``images("eval-text")`` (photos with rendered
sentences + page.png) and ``images("eval")`` (the plain photos). Latency: every step's
int8 model interleaved with the ORIGINAL fp32 model in rounds (2 intra-op threads, ORT
default optimizations), speedup = median over rounds of fp32 / int8.

Steps are cumulative: each switches one more default on (the switches are the module
functions and flags of onnxopt.quantization.cnn / glue / qdq, patched here for the run);
the last row is ``quantize``'s defaults as shipped plus cross-layer equalization
(``equalize=True``), which is not a default. See docs/quantization.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

THREADS = 2
STEPS = ("plain", "hardswish", "affine_fold", "clamp", "mse", "glue", "float_stem", "float_front", "convt_pair",
         "float_encoder")
LABELS = {
    "plain": "none of the CNN defaults (= the old defaults)",
    "hardswish": "+ hard-swish fused (opset 14)",
    "affine_fold": "+ scalar affine blocks folded into the quantizer",
    "clamp": "+ conv output ranges clamped at HardSwish's -3",
    "mse": "+ MSE ranges on hard-swish outputs",
    "glue": "+ QDQ glue (QLinearAdd/Mul/Concat, uint8 Resize)",
    "float_stem": "+ float stem conv",
    "float_front": "+ float high-resolution front (stride <= 8)",
    "convt_pair": "+ ConvTranspose pair fused",
    "float_encoder": "+ float encoder = defaults",
    "cle": "defaults + cross-layer equalization (equalize=True)",
}


def _session(model):
    import onnx_ir as ir
    import onnxruntime as ort

    from onnxopt.bench import session_options

    # Timed in turn with other sessions: each one's spinning must end with its run.
    so = session_options(THREADS, stop_spinning_after_run=True)
    data = model if isinstance(model, (str, bytes)) else ir.to_proto(model).SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def build(step: str, calib):
    """``quantize`` with the defaults up to ``step`` switched on (the others patched off)."""
    from onnxopt.quantization import cnn, glue, qdq, quantize
    from onnxopt.testing import real_models as rm

    on = set(STEPS[: STEPS.index(step) + 1]) if step in STEPS else set(STEPS)
    saved = (cnn.prepare_opset, cnn.clamp_to_consumers, cnn.tailed_activation_tensors, glue.find_glue,
             cnn.float_front_layers, cnn.fuse_convtranspose_pair, qdq.FOLD_SCALAR_AFFINE, cnn.ENCODER_MAX_MAC_SHARE)
    try:
        if "float_encoder" not in on:
            cnn.ENCODER_MAX_MAC_SHARE = 0.0  # rule 1 off: the stride <= 8 front rule decides
        if "hardswish" not in on:
            cnn.prepare_opset = lambda model, feed, report: model
        qdq.FOLD_SCALAR_AFFINE = "affine_fold" in on
        if "clamp" not in on:
            cnn.clamp_to_consumers = lambda model, tensor, lo, hi: (lo, hi)
        if "mse" not in on:
            cnn.tailed_activation_tensors = lambda model, tensors, layers=(): []
        if "glue" not in on:
            glue.find_glue = lambda model, layers: []
        if "float_stem" not in on:
            cnn.float_front_layers = lambda model, layers, feed=None: {}
        elif "float_front" not in on:  # the stem alone: the conv reading the image input
            front = saved[4]
            inputs = lambda model: {v.name for v in model.graph.inputs}  # noqa: E731
            cnn.float_front_layers = lambda model, layers, feed=None: {
                k: v for k, v in front(model, layers, feed).items()
                if any(l.name == k and l.act_input in inputs(model) for l in layers)}
        if "convt_pair" not in on:
            cnn.fuse_convtranspose_pair = lambda model, ctx=None: "off"
        t = time.perf_counter()
        res = quantize(str(rm.ppocr_model("det")), calib, progress=False, equalize=(step == "cle"))
        return res.model, time.perf_counter() - t, res.report["ort_fused_kernels"]
    finally:
        (cnn.prepare_opset, cnn.clamp_to_consumers, cnn.tailed_activation_tensors, glue.find_glue,
         cnn.float_front_layers, cnn.fuse_convtranspose_pair, qdq.FOLD_SCALAR_AFFINE, cnn.ENCODER_MAX_MAC_SHARE) = saved


def noise_floor(sets, refs, fp32_path) -> list[dict]:
    """fp32 vs fp32 under tiny perturbations: input noise, fp16-rounded conv weights."""
    import onnx

    from onnxopt.testing import real_models as rm

    sess = _session(fp32_path)
    rows = []
    for label, sd, uniform in (("input + uniform +-0.5 grey level", 1 / 255, True),
                               ("input + Gaussian sd 0.5 grey level", 1 / 255, False),
                               ("input + Gaussian sd 1 grey level", 2 / 255, False)):
        row = {"perturbation": label}
        for name, feeds in sets.items():
            rng = np.random.default_rng(1)
            noise = (lambda s: rng.uniform(-sd, sd, s)) if uniform else (lambda s: rng.normal(0, sd, s))
            out = [sess.run(None, {"x": (f["x"] + noise(f["x"].shape)).astype(np.float32)})[0] for f in feeds]
            r = rm.det_mask_iou(refs[name], out)
            row[name] = (r["mean_iou"], r["min_iou"])
        rows.append(row)
    proto = onnx.load(fp32_path)
    consts = {t.name: t for t in proto.graph.initializer}
    consts.update({n.output[0]: n.attribute[0].t for n in proto.graph.node if n.op_type == "Constant"})
    for n in proto.graph.node:
        if n.op_type in ("Conv", "ConvTranspose") and n.input[1] in consts:
            t = consts[n.input[1]]
            a = onnx.numpy_helper.to_array(t)
            t.CopyFrom(onnx.numpy_helper.from_array(a.astype(np.float16).astype(np.float32), t.name))
    sess16 = _session(proto.SerializeToString())
    row = {"perturbation": "fp16-rounded conv weights"}
    for name, feeds in sets.items():
        r = rm.det_mask_iou(refs[name], [sess16.run(None, f)[0] for f in feeds])
        row[name] = (r["mean_iou"], r["min_iou"])
    rows.append(row)
    return rows


def main(argv=None) -> int:
    from onnxopt.testing import real_models as rm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=40, help="interleaved latency rounds")
    ap.add_argument("--steps", default=",".join((*STEPS, "cle")))
    ap.add_argument("--noise-floor", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    fp32_path = str(rm.ppocr_model("det"))
    calib = [{"x": rm.det_preprocess(img)} for _, img in rm.images("calib")]
    sets = {name: [{"x": rm.det_preprocess(img)} for _, img in rm.images(name)] for name in ("eval-text", "eval")}
    ref_sess = _session(fp32_path)
    refs = {name: [ref_sess.run(None, f)[0] for f in feeds] for name, feeds in sets.items()}
    out: dict = {"steps": []}
    if args.noise_floor:
        out["noise_floor"] = noise_floor(sets, refs, fp32_path)
        for row in out["noise_floor"]:
            print(f"floor  {row['perturbation']:40s} " + "  ".join(
                f"{k} {v[0]:.4f} / {v[1]:.4f}" for k, v in row.items() if k != "perturbation"), flush=True)

    models = {}
    for step in filter(None, args.steps.split(",")):
        model, seconds, kernels = build(step, calib)
        sess = _session(model)
        row = {"step": step, "label": LABELS[step], "quantize_s": round(seconds, 1), "kernels": kernels}
        for name, feeds in sets.items():
            r = rm.det_mask_iou(refs[name], [sess.run(None, f)[0] for f in feeds])
            row[name] = (r["mean_iou"], r["min_iou"])
        models[step] = sess
        out["steps"].append(row)
        print(f"{LABELS[step]:55s} eval-text {row['eval-text'][0]:.4f} / {row['eval-text'][1]:.4f}   "
              f"eval {row['eval'][0]:.4f} / {row['eval'][1]:.4f}", flush=True)

    # Latency: fp32 then every step, in rounds; ratio to the fp32 run of the same round.
    feed = sets["eval-text"][0]
    sessions = {"fp32": ref_sess, **models}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, feed)
    times = {k: [] for k in sessions}
    for _ in range(args.runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[k].append(time.perf_counter() - t)
    print(f"\nlatency, {args.runs} interleaved rounds, {THREADS} threads (fp32 p50 "
          f"{1000 * statistics.median(times['fp32']):.1f} ms):")
    for row in out["steps"]:
        k = row["step"]
        row["p50_ms"] = 1000 * statistics.median(times[k])
        row["speedup"] = statistics.median(a / b for a, b in zip(times["fp32"], times[k]))
        print(f"  {row['label']:55s} {row['p50_ms']:6.1f} ms  {row['speedup']:.2f}x", flush=True)
    if args.json:
        from onnxopt.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
