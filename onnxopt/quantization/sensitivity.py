"""Per-layer sensitivity: SQNR of each quantized layer's output against fp32.

Cheap and local: one float run per sample captures every layer's input and output; each
layer is then re-run alone, as a one-node model, on its fake-quantized input (the input's
Q/DQ grid) with its dequantized weight, and, for a Conv whose output is quantized, the
output's Q/DQ grid (after an absorbed Relu/Clip). SQNR = 10 log10(sum ref^2 / sum
(ref - test)^2), pooled over the samples. Errors are not propagated, so a layer's number
says how much noise it adds by itself; the fallback then checks the whole model.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from onnxopt.quantization.analysis import Layer
from onnxopt.quantization.qdq import clone_model
from onnxopt.quantization.scheme import Scheme, activation_qparams, dequantize_weight, quantize_weight


def run_all(model: ir.Model, feeds: list[dict], extra_outputs: Iterable[str] = ()) -> list[dict]:
    from onnxopt.verify import make_session

    """Run ``model`` on each feed; ``extra_outputs`` (intermediate tensors) are returned too."""
    produced = {v.name for n in model.graph for v in n.outputs}
    extra = [e for e in extra_outputs if e in produced and e not in {o.name for o in model.graph.outputs}]
    if extra:
        model = clone_model(model)
        vals = {v.name: v for n in model.graph for v in n.outputs}
        for e in extra:
            model.graph.outputs.append(vals[e])
    sess = make_session(model, threads=None)
    try:
        return [sess.run(f) for f in feeds]
    finally:
        sess.close()

def fake_quant(x: np.ndarray, lo: float, hi: float, scheme: Scheme) -> np.ndarray:
    scale, zp = activation_qparams(lo, hi, scheme)
    qmin, qmax = (-128, 127) if scheme.symmetric_activations else (0, 255)
    q = np.clip(np.rint(x / scale) + zp, qmin, qmax)
    return ((q - zp) * scale).astype(np.float32)


def _single_node_session(node: ir.Node, weight: np.ndarray, bias: np.ndarray | None, opset: int):
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from onnxopt.verify import session_options

    inits = [numpy_helper.from_array(weight.astype(np.float32), "w")]
    inputs = ["x", "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "b"))
        inputs.append("b")
    attrs = {k: a.value for k, a in node.attributes.items()}
    n = helper.make_node(node.op_type, inputs, ["y"], **attrs)
    g = helper.make_graph([n], "layer", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    return ort.InferenceSession(m.SerializeToString(), session_options(1), providers=["CPUExecutionProvider"])


def _saturation_bounds(model: ir.Model, layer: Layer) -> tuple[float, float]:
    """The interval outside which a quantized output's readers saturate ((-inf, inf) when
    they do not, or when a Relu / Clip is absorbed: that output is already the activation's)."""
    from onnxopt.quantization import cnn

    if not layer.out_range_tensor or layer.absorbed_activation:
        return -np.inf, np.inf
    return cnn.clamp_to_consumers(model, layer.out_range_tensor, -np.inf, np.inf)


def layer_sqnr(
    model: ir.Model,
    layers: list[Layer],
    ranges: dict[str, tuple[float, float]],
    scheme: Scheme,
    feeds: list[dict],
) -> dict[str, float]:
    """{layer name: SQNR in dB} of each layer quantized alone (see the module docstring)."""
    from onnxopt.graph import opset_version

    nodes = {n.name: n for n in model.graph}
    opset = opset_version(model) or 13
    wanted = set()
    for layer in layers:
        wanted.add(layer.act_input)
        wanted.add(layer.out_range_tensor or nodes[layer.name].outputs[0].name)
    sessions = {}
    flat = {l.name: _saturation_bounds(model, l) for l in layers}
    for layer in layers:
        node = nodes[layer.name]
        w = model.graph.initializers[layer.weight].const_value.numpy().astype(np.float32)
        axis = layer.axis if scheme.per_channel else None
        q, s = quantize_weight(w, axis)
        bias = None
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].const_value is not None:
            bias = node.inputs[2].const_value.numpy()
        sessions[layer.name] = _single_node_session(node, dequantize_weight(q, s, axis), bias, opset)
    signal = {l.name: 0.0 for l in layers}
    noise = {l.name: 0.0 for l in layers}
    for feed in feeds:
        captured = run_all(model, [feed], sorted(wanted))[0]
        captured.update(feed)
        for layer in layers:
            x = captured[layer.act_input].astype(np.float32)
            xq = fake_quant(x, *ranges[layer.act_input], scheme)
            y = sessions[layer.name].run(None, {"x": xq})[0]
            if layer.out_range_tensor:
                # Read only by saturating ops (HardSwish, HardSigmoid, Sigmoid): values past
                # where they saturate give the same output, so both sides are compared as those
                # readers see them (the output grid is clamped there on purpose,
                # cnn.clamp_to_consumers).
                ref = np.clip(captured[layer.out_range_tensor], *flat[layer.name])
                y = fake_quant(y, *ranges[layer.out_range_tensor], scheme)
            else:
                ref = captured[nodes[layer.name].outputs[0].name]
            ref = ref.astype(np.float64)
            signal[layer.name] += float(np.sum(ref**2))
            noise[layer.name] += float(np.sum((ref - y) ** 2))
    out = {}
    for name in signal:
        out[name] = float("inf") if noise[name] == 0 else float(10 * np.log10(max(signal[name], 1e-30) / noise[name]))
    return out
