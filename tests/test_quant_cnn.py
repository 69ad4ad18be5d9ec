"""Cross-layer equalization and bias correction (onnxopt.quantization.equalization /
bias_correction): exactness on hand-built and real graphs, that CLE really equalizes,
that it refuses non-homogeneous activations and shared outputs, and that bias
correction reduces the output bias of an int8 conv on real activations."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.quantization.bias_correction import (
    bias_delta,
    correct_biases,
    correct_qdq_biases,
    quantize_weight,
)
from onnxopt.quantization.equalization import equalize_cross_layer, find_conv_pairs, fold_affine_into_conv

ort.set_default_logger_severity(3)


def _run(model: ir.Model | onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))


def _imbalanced_weights(rng, c_out, c_in_per_group, k, spread=3.0):
    """Conv weights whose output channels have ranges spread over ~10^spread (like a
    depthwise conv after BatchNorm folding)."""
    w = rng.standard_normal((c_out, c_in_per_group, k, k)).astype(np.float32)
    return w * (10.0 ** rng.uniform(-spread / 2, spread / 2, size=(c_out, 1, 1, 1))).astype(np.float32)


def _two_conv_model(act: str | None, *, depthwise2=False, depthwise1=False, extra_consumer=False, opset=14, seed=0):
    """x -> Conv1 -> [act] -> Conv2 -> y (NCHW, 8 channels, 3x3 padded convs)."""
    rng = np.random.default_rng(seed)
    c = 8
    w1 = _imbalanced_weights(rng, c, 1 if depthwise1 else 4, 3)
    b1 = rng.standard_normal(c).astype(np.float32)
    w2 = (_imbalanced_weights(rng, c, 1, 3, spread=1) if depthwise2 else rng.standard_normal((6, c, 1, 1)).astype(np.float32))
    b2 = rng.standard_normal(w2.shape[0]).astype(np.float32)
    c_in = c if depthwise1 else 4
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1], group=c if depthwise1 else 1, name="conv1")]
    mid = "h"
    if act == "Relu":
        nodes.append(helper.make_node("Relu", ["h"], ["a"], name="act"))
        mid = "a"
    elif act == "Relu6":
        inits += [numpy_helper.from_array(np.array(0, np.float32), "lo"), numpy_helper.from_array(np.array(6, np.float32), "hi")]
        nodes.append(helper.make_node("Clip", ["h", "lo", "hi"], ["a"], name="act"))
        mid = "a"
    elif act == "HardSwish":
        nodes.append(helper.make_node("HardSwish", ["h"], ["a"], name="act"))
        mid = "a"
    elif act == "PRelu":
        inits.append(numpy_helper.from_array(np.full((c, 1, 1), 0.1, np.float32), "slope"))
        nodes.append(helper.make_node("PRelu", ["h", "slope"], ["a"], name="act"))
        mid = "a"
    nodes.append(helper.make_node("Conv", [mid, "w2", "b2"], ["y"], pads=[1, 1, 1, 1] if depthwise2 else [0, 0, 0, 0],
                                  group=c if depthwise2 else 1, name="conv2"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])]
    if extra_consumer:
        nodes.append(helper.make_node("ReduceMean", ["h"], ["side"], keepdims=1, name="side"))
        outputs.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, ["n", "c", "h", "w"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, 16, 16])], outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(proto)
    return proto


def _weight_ranges(model: ir.Model, conv_name: str) -> np.ndarray:
    node = next(n for n in model.graph if n.name == conv_name)
    w = ir.convenience.get_const_tensor(node.inputs[1]).numpy()
    return np.abs(w).reshape(w.shape[0], -1).max(axis=1)


@pytest.mark.parametrize(
    "act,depthwise2,depthwise1",
    [("Relu", False, False), ("Relu", True, False), (None, False, True), ("PRelu", True, False), (None, True, True)],
    ids=["conv-relu-conv", "conv-relu-dwconv", "dwconv-conv", "conv-prelu-dwconv", "dwconv-dwconv"],
)
def test_cle_is_exact_and_equalizes(act, depthwise2, depthwise1):
    proto = _two_conv_model(act, depthwise2=depthwise2, depthwise1=depthwise1)
    x = np.random.default_rng(1).standard_normal((1, 8 if depthwise1 else 4, 16, 16)).astype(np.float32)
    ref = _run(proto, {"x": x})[0]
    model = ir.from_proto(proto)
    before = _weight_ranges(model, "conv1")
    stats = equalize_cross_layer(model)
    assert stats.pairs == 1
    new = _run(model, {"x": x})[0]
    assert _rel_err(ref, new) < 1e-4
    after = _weight_ranges(model, "conv1")
    # conv1's per-channel ranges spread over ~3 decades before; equalizing with conv2
    # (whose ranges are closer together) roughly takes the square root of that spread.
    assert np.log(after.max() / after.min()) < 0.6 * np.log(before.max() / before.min())
    assert stats.ratio_after[0] < 1.01 < stats.ratio_before[0]


@pytest.mark.parametrize("act", ["Relu6", "HardSwish"])
def test_cle_skips_non_homogeneous_activations(act):
    proto = _two_conv_model(act)
    model = ir.from_proto(proto)
    before = _weight_ranges(model, "conv1")
    stats = equalize_cross_layer(model)
    assert stats.pairs == 0
    assert any("homogeneous" in reason for reason in stats.skipped)
    np.testing.assert_array_equal(before, _weight_ranges(model, "conv1"))


def test_cle_skips_when_conv1_output_has_another_consumer():
    proto = _two_conv_model("Relu", extra_consumer=True)
    x = np.random.default_rng(1).standard_normal((1, 4, 16, 16)).astype(np.float32)
    ref = _run(proto, {"x": x})
    model = ir.from_proto(proto)
    stats = equalize_cross_layer(model)
    assert stats.pairs == 0
    for a, b in zip(ref, _run(model, {"x": x})):
        np.testing.assert_array_equal(a, b)


def test_fold_affine_into_conv_exact():
    """Conv -> Mul(scalar) -> Add(per-channel) -> Relu -> Mul(scalar) -> Add(scalar) -> 1x1 Conv:
    everything but the Relu folds, outputs unchanged."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.array(1.7, np.float32), "a"),
        numpy_helper.from_array(rng.standard_normal((1, 8, 1, 1)).astype(np.float32), "b"),
        numpy_helper.from_array(np.array(0.6, np.float32), "c"),
        numpy_helper.from_array(np.array(-0.3, np.float32), "d"),
        numpy_helper.from_array(rng.standard_normal((5, 8, 1, 1)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["a", "h"], ["h1"]),
        helper.make_node("Add", ["h1", "b"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["r"]),
        helper.make_node("Mul", ["c", "r"], ["r1"]),
        helper.make_node("Add", ["r1", "d"], ["r2"]),
        helper.make_node("Conv", ["r2", "w2"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = rng.standard_normal((1, 4, 12, 12)).astype(np.float32)
    ref = _run(proto, {"x": x})[0]
    model = ir.from_proto(proto)
    assert fold_affine_into_conv(model) == 4
    assert [n.op_type for n in model.graph] == ["Conv", "Relu", "Conv"]
    assert _rel_err(ref, _run(model, {"x": x})[0]) < 1e-5


def test_fold_keeps_add_before_padded_conv():
    """An Add in front of a zero-padded conv cannot fold (the border would see the shift)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "d"),
             numpy_helper.from_array(rng.standard_normal((3, 3, 3, 3)).astype(np.float32), "w")]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "d"], ["r1"]),
             helper.make_node("Conv", ["r1", "w"], ["y"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])], inits)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert fold_affine_into_conv(model) == 0


def test_cle_pass_registered_and_not_in_default_preset():
    from onnxopt.passes.registry import get_pass, preset_passes

    info = get_pass("equalize-cross-layer")
    assert info.preset_order is None
    assert "equalize-cross-layer" not in preset_passes("default")
    proto = _two_conv_model("Relu")
    model = ir.from_proto(proto)
    result = info.factory()(model)
    assert result.modified
    # Already equalized: a second run changes nothing, so fixed-point pipelines stop.
    again = info.factory()
    assert not again(model).modified and again.rewrites == 0


# ----------------------------------------------------------------------------
# real models
# ----------------------------------------------------------------------------


def _real(name):
    from onnxopt.testing.real_models import RealModelUnavailable, ppocr_model

    try:
        return ppocr_model(name)
    except RealModelUnavailable as exc:
        pytest.skip(str(exc))


def _det_input(size=320, split="calib", index=5):
    from onnxopt.testing.real_models import RealModelUnavailable, det_preprocess, images

    try:
        return det_preprocess(images(split)[index][1], size)
    except RealModelUnavailable as exc:
        pytest.skip(str(exc))


def test_cle_on_ppocr_det_is_exact():
    path = _real("det")
    x = _det_input(320)
    ref = _run(onnx.load(str(path)), {"x": x})[0]
    model = ir.load(str(path))
    stats = equalize_cross_layer(model)
    # The detector's hardswish blocks are not homogeneous: only the stem, the
    # depthwise->pointwise pairs without activation, the SE and head pairs qualify.
    assert stats.folded > 50 and stats.pairs >= 10
    assert any("not positive-homogeneous" in r for r in stats.skipped)
    assert max(stats.ratio_after) < 1.01 < max(stats.ratio_before)
    new = _run(model, {"x": x})[0]
    assert np.abs(ref - new).max() < 1e-4  # probabilities in [0, 1]


def test_cle_on_ppocr_cls_is_exact():
    path = _real("cls")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 48, 192)).astype(np.float32)
    ref = _run(onnx.load(str(path)), {"x": x})[0]
    model = ir.load(str(path))
    stats = equalize_cross_layer(model)
    assert stats.folded + stats.pairs > 0
    new = _run(model, {"x": x})[0]
    assert np.abs(ref - new).max() < 1e-4


def _det_activation(tensor: str, size=320, n_images=3) -> np.ndarray:
    """A real intermediate activation of the detector on calibration images."""
    path = _real("det")
    proto = onnx.load(str(path))
    proto.graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT, ["n", "c", "h", "w"]))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run([tensor], {"x": _det_input(size, "calib", i)})[0] for i in range(n_images)])


def _conv_model(weight, bias, group, pads):
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=group, pads=pads)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "c", "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_bias_correction_reduces_output_bias_on_real_activations():
    """The detector's pointwise conv p2o.Conv.4 (32 -> 48) after its depthwise conv, with
    per-TENSOR int8 weights (the case with a large rounding error): the per-channel mean
    output error on real images drops after correct_biases."""
    x = _det_activation("p2o.Add.19")  # input of p2o.Conv.4 (after the affine block)
    det = ir.load(str(_real("det")))
    conv = next(n for n in det.graph if n.name == "p2o.Conv.4")
    w = ir.convenience.get_const_tensor(conv.inputs[1]).numpy()
    b = ir.convenience.get_const_tensor(conv.inputs[2]).numpy()
    wq = quantize_weight(w, axis=None)
    y_ref = _run(_conv_model(w, b, 1, [0, 0, 0, 0]), {"x": x})[0]
    y_q = _run(_conv_model(wq, b, 1, [0, 0, 0, 0]), {"x": x})[0]

    model = ir.from_proto(_conv_model(wq, b, 1, [0, 0, 0, 0]))
    # correct_biases on the float graph: quantized weights given explicitly, E[x] from data
    float_model = ir.from_proto(_conv_model(w, b, 1, [0, 0, 0, 0]))
    assert correct_biases(float_model, {"": wq}, {"x": x.mean(axis=(0, 2, 3))}) == 1
    new_b = ir.convenience.get_const_tensor(next(iter(float_model.graph)).inputs[2]).numpy()
    y_bc = _run(_conv_model(wq, new_b, 1, [0, 0, 0, 0]), {"x": x})[0]
    del model

    def mean_bias(y):
        return np.abs((y - y_ref).mean(axis=(0, 2, 3)))

    before, after = mean_bias(y_q), mean_bias(y_bc)
    assert after.mean() < 0.2 * before.mean()
    assert np.abs(y_bc - y_ref).mean() < np.abs(y_q - y_ref).mean()


def test_bias_delta_grouped_matches_depthwise_formula():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 1, 3, 3))
    wq = quantize_weight(w.astype(np.float32)).astype(np.float64)
    mean = rng.standard_normal(6)
    expected = -((wq - w).reshape(6, -1).sum(axis=1) * mean)
    np.testing.assert_allclose(bias_delta(w, wq, mean, group=6), expected, rtol=1e-6)


def test_correct_qdq_biases_on_real_depthwise_conv():
    """A QDQ depthwise conv (int8 per-channel weights via DequantizeLinear, no bias) fed by
    real detector activations: correct_qdq_biases adds an int32 bias that removes most of
    the per-channel mean output error."""
    x = _det_activation("p2o.Add.15")  # input of the stride-2 depthwise conv p2o.Conv.3
    det = ir.load(str(_real("det")))
    conv = next(n for n in det.graph if n.name == "p2o.Conv.3")
    w = ir.convenience.get_const_tensor(conv.inputs[1]).numpy()
    c = w.shape[0]
    absmax = np.abs(w).reshape(c, -1).max(axis=1)
    scale = (absmax / 127).astype(np.float32)
    wint = np.clip(np.round(w / scale[:, None, None, None]), -127, 127).astype(np.int8)
    x_scale = np.float32(np.abs(x).max() / 127)

    def graphs():
        fl = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], group=c, pads=[1, 1, 1, 1], strides=[2, 2], name="dw")],
                               "f", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "c", "h", "w"])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])], [numpy_helper.from_array(w, "w")])
        q_nodes = [
            helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
            helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], axis=0),
            helper.make_node("Conv", ["xd", "wd"], ["y"], group=c, pads=[1, 1, 1, 1], strides=[2, 2], name="dw"),
        ]
        q_inits = [numpy_helper.from_array(np.array(x_scale), "xs"), numpy_helper.from_array(np.array(0, np.int8), "xz"),
                   numpy_helper.from_array(wint, "wq"), numpy_helper.from_array(scale, "ws")]
        qg = helper.make_graph(q_nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "c", "h", "w"])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])], q_inits)
        ops = [helper.make_opsetid("", 13)]
        return helper.make_model(fl, opset_imports=ops), helper.make_model(qg, opset_imports=ops)

    fproto, qproto = graphs()
    y_ref = _run(fproto, {"x": x})[0]
    y_q = _run(qproto, {"x": x})[0]
    qmodel = ir.from_proto(qproto)
    assert correct_qdq_biases(qmodel, ir.from_proto(fproto), [{"x": x[i:i + 1]} for i in range(len(x))]) == 1
    conv_node = next(n for n in qmodel.graph if n.op_type == "Conv")
    assert conv_node.inputs[2] is not None and conv_node.inputs[2].producer().op_type == "DequantizeLinear"
    y_bc = _run(qmodel, {"x": x})[0]
    before = np.abs((y_q - y_ref).mean(axis=(0, 2, 3)))
    after = np.abs((y_bc - y_ref).mean(axis=(0, 2, 3)))
    assert after.mean() < before.mean()


# ----------------------------------------------------------------------------
# GPTQ-style rounding
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("conv_name,input_name", [("p2o.Conv.2", "p2o.Add.7"), ("p2o.Conv.3", "p2o.Add.15")],
                         ids=["pointwise", "depthwise"])
def test_gptq_rounding_beats_round_to_nearest_on_held_out_image(conv_name, input_name):
    """H from two calibration images; the conv output error is measured on a third one."""
    from onnxopt.quantization.rounding import _conv_geometry, gptq_round, im2col_sample

    x = _det_activation(input_name, n_images=3)
    det = ir.load(str(_real("det")))
    conv = next(n for n in det.graph if n.name == conv_name)
    w = ir.convenience.get_const_tensor(conv.inputs[1]).numpy()
    b = ir.convenience.get_const_tensor(conv.inputs[2]).numpy()
    geo = _conv_geometry(conv, w.shape)
    g = geo["group"]
    cols = im2col_sample(x[:2], geo, 8192, np.random.default_rng(0))
    c, k, p = cols.shape
    cols = cols.reshape(g, (c // g) * k, p)
    h = cols @ cols.transpose(0, 2, 1) / p
    scale = np.abs(w).reshape(w.shape[0], -1).max(axis=1) / 127
    q = gptq_round(w, h, scale, g)
    assert q.dtype.kind == "f" and np.all(np.abs(q) <= 127) and np.all(q == np.rint(q))
    w_gptq = (q * scale[:, None, None, None]).astype(np.float32)
    w_rtn = quantize_weight(w, axis=0)
    pads = list(conv.attributes["pads"].value) if "pads" in conv.attributes else [0, 0, 0, 0]
    strides = list(conv.attributes["strides"].value) if "strides" in conv.attributes else [1, 1]

    def run(weight):
        m = _conv_model(weight, b, g, pads)
        m.graph.node[0].attribute.append(helper.make_attribute("strides", strides))
        return _run(m, {"x": x[2:]})[0]

    y_ref = run(w)
    err_rtn = np.mean((run(w_rtn) - y_ref) ** 2)
    err_gptq = np.mean((run(w_gptq) - y_ref) ** 2)
    assert err_gptq < 0.8 * err_rtn


def test_quantizer_hooks_run_on_a_conv_model():
    """CLE as a float transform, GPTQ + bias correction as weight transforms of onnxopt's
    quantizer: they run, report, and the int8 model stays close to fp32."""
    quantization = pytest.importorskip("onnxopt.quantization")
    if not hasattr(quantization, "quantize"):
        pytest.skip("onnxopt.quantization.quantize not available")
    from onnxopt.quantization.bias_correction import bias_correction
    from onnxopt.quantization.equalization import cross_layer_equalization
    from onnxopt.quantization.rounding import gptq_weight_rounding

    proto = _two_conv_model("Relu", depthwise2=True)
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((1, 4, 16, 16)).astype(np.float32)} for _ in range(6)]
    res = quantization.quantize(ir.from_proto(proto), feeds, float_transforms=[cross_layer_equalization],
                                weight_transforms=[gptq_weight_rounding, bias_correction], progress=False,
                                sensitivity=False)
    hooks = res.report["hooks"]
    assert hooks["float_transforms"][0]["name"] == "cross_layer_equalization"
    assert "equalized 1 conv pairs" in hooks["float_transforms"][0]["summary"]
    assert [h["name"] for h in hooks["weight_transforms"]] == ["gptq_weight_rounding", "bias_correction"]
    assert res.report["bias_correction"]["corrected"] == 2
    x = feeds[0]
    ref = _run(proto, x)[0]
    out = _run(res.model, x)[0]
    assert np.abs(out - ref).mean() < 0.05 * np.abs(ref).mean()
