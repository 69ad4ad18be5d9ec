"""PP-OCRv4 det int8: which part of quantization moves the masks, measured by taking parts away.

    python benchmarks/det_error_sources.py
    python benchmarks/det_error_sources.py --json out.json

The defaults' int8 model is built once (calibration: the 10 ``images("calib")`` photos,
``det_preprocess`` 640x640), with the scalar-affine fold switched off so that every variant
below is exact where it says so (the fold's rounding residual goes into conv biases, which
is not exact on zero-padded border pixels; that model is measured too). Then pieces of the
quantization are removed from that one graph, the rest left as built:

* **weights float**: every int8 weight's DequantizeLinear replaced by the float weight;
* **activations clipped, not rounded**: every activation QuantizeLinear -> DequantizeLinear
  pair replaced by a Clip to the pair's representable range (what is left of the
  quantizer is its range: values outside the calibrated range are clipped, nothing is
  rounded);
* **activations neither** (ranges doubled on both sides, lower bounds at 0 kept: an absorbed
  Relu): what is left is the int32 bias grid and the float transforms.

Accuracy: ``det_mask_iou`` of fp32 vs each variant on the plain photos (``images("eval")``,
per image where the fp32 mask has >= 500 pixels), the text set (``images("eval-text")``)
and the calibration photos themselves. No latency: these variants are not deployable models.
See docs/quantization.md (PP-OCRv4 det).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

THREADS = 2


def _session(data: bytes):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def build(fp32: str, dst: str, calib, fold: bool) -> dict[str, np.ndarray]:
    """Quantize with the defaults (``fold``: the scalar-affine fold on); returns
    {int8 weight initializer name: the float weight it stands for}."""
    from onnxopt.quantization import qdq, quantize_file

    weights: dict[str, np.ndarray] = {}

    def remember_float_weights(qmodel, ctx):
        for layer in ctx.layers:
            weights[layer.quantized_weight.name] = np.array(layer.float_weight, np.float32)
        return f"{len(weights)} float weights noted"

    saved = qdq.FOLD_SCALAR_AFFINE
    qdq.FOLD_SCALAR_AFFINE = fold
    try:
        quantize_file(fp32, dst, calib=calib, progress=False, weight_transforms=[remember_float_weights])
    finally:
        qdq.FOLD_SCALAR_AFFINE = saved
    return weights


def float_weights(model, weights: dict[str, np.ndarray]):
    """The weights' DequantizeLinear nodes -> float initializers of the same output name."""
    from onnx import numpy_helper

    g = model.graph
    for node in [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in weights]:
        g.initializer.append(numpy_helper.from_array(weights[node.input[0]], node.output[0]))
        g.node.remove(node)
    return model


def unround_activations(model, widen: bool):
    """Every activation Q -> DQ pair -> Clip to its representable range (then the pair's affine
    map when Q and DQ parameters differ: a folded ``a*x + b``). ``widen``: ranges doubled on both
    sides, except a lower bound at 0."""
    from onnx import helper, numpy_helper

    g = model.graph
    init = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    quant = {n.output[0]: n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] not in init}
    for k, dq in enumerate([n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in quant]):
        q = quant[dq.input[0]]
        sq, zq = float(init[q.input[1]]), int(init[q.input[2]])
        sd, zd = float(init[dq.input[1]]), int(init[dq.input[2]])
        lo, hi = (0 - zq) * sq, (255 - zq) * sq
        if widen:
            lo, hi = (lo - 255 * sq if zq != 0 else lo), hi + 255 * sq
        a, b = sd / sq, (zq - zd) * sd
        consts = {f"_unround{k}_{n}": v for n, v in (("lo", lo), ("hi", hi), ("a", a), ("b", b))}
        g.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), n) for n, v in consts.items())
        at = list(g.node).index(dq)
        new = [helper.make_node("Clip", [q.input[0], f"_unround{k}_lo", f"_unround{k}_hi"],
                                [f"_unround{k}_clipped" if (a != 1.0 or b != 0.0) else dq.output[0]])]
        if a != 1.0 or b != 0.0:
            new += [helper.make_node("Mul", [f"_unround{k}_clipped", f"_unround{k}_a"], [f"_unround{k}_scaled"]),
                    helper.make_node("Add", [f"_unround{k}_scaled", f"_unround{k}_b"], [dq.output[0]])]
        for i, n in enumerate(new):
            g.node.insert(at + i, n)
        g.node.remove(dq)
    for q in quant.values():
        g.node.remove(q)
    return model


def main(argv=None) -> int:
    import os
    import tempfile

    import onnx

    from onnxopt.testing import real_models as rm

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)

    fp32 = str(rm.ppocr_model("det"))
    sets = {name: rm.images(name) for name in ("eval", "eval-text", "calib")}
    feeds = {name: [{"x": rm.det_preprocess(img, 640)} for _, img in imgs] for name, imgs in sets.items()}
    ref_sess = _session(open(fp32, "rb").read())
    refs = {name: [ref_sess.run(None, f)[0] for f in fs] for name, fs in feeds.items()}

    tmp = tempfile.mkdtemp(prefix="onnxopt-det-err-")
    with_fold, without = os.path.join(tmp, "fold.onnx"), os.path.join(tmp, "nofold.onnx")
    build(fp32, with_fold, feeds["calib"], fold=True)
    weights = build(fp32, without, feeds["calib"], fold=False)
    variants = {
        "int8, the defaults": lambda: onnx.load(with_fold),
        "int8, the defaults without the affine fold (the base below)": lambda: onnx.load(without),
        "activations rounded, weights float": lambda: float_weights(onnx.load(without), weights),
        "weights int8, activations clipped not rounded": lambda: unround_activations(onnx.load(without), False),
        "weights float, activations clipped not rounded": lambda: unround_activations(
            float_weights(onnx.load(without), weights), False),
        "weights float, activations neither (bias grid only)": lambda: unround_activations(
            float_weights(onnx.load(without), weights), True),
    }
    rows = []
    for label, make in variants.items():
        sess = _session(make().SerializeToString())
        row = {"variant": label}
        for name, fs in feeds.items():
            r = rm.det_mask_iou(refs[name], [sess.run(None, f)[0] for f in fs])
            row[name] = (r["mean_iou"], r["min_iou"])
            if name == "eval":
                row["per_image"] = {n: round(v, 3) for (n, _), v, ref in zip(sets[name], r["per_image_iou"], refs[name])
                                    if int((ref > 0.3).sum()) >= 500}
        rows.append(row)
        print(f"{label:62s} eval {row['eval'][0]:.3f} / {row['eval'][1]:.3f}  eval-text {row['eval-text'][0]:.3f} / "
              f"{row['eval-text'][1]:.3f}  calib {row['calib'][0]:.3f} / {row['calib'][1]:.3f}  "
              + " ".join(f"{n.split('.')[0]} {v:.2f}" for n, v in row["per_image"].items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
