"""Bias correction for quantized convolutions (empirical, needs calibration data).

Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction"
(ICCV 2019), section 4.2.  Rounding the weights to int8 biases a layer's output:

    E[y_q - y] = E[(W_q - W) x] = (W_q - W) E[x]

which is not zero when ``E[x]`` is not zero (after a ReLU / hardswish it never is), and
the shift accumulates through the network.  Subtracting it from the bias removes it::

    b[o] -= sum_{i,k} (W_q - W)[o, i, k] * E[x_i]

``E[x_i]`` is the mean of input channel ``i`` over the batch and spatial positions,
measured on calibration data (the standard per-channel version: at a zero-padded border
the conv sees fewer non-zero inputs, which this ignores).  For a grouped conv the sum
runs over the input channels of the output channel's group; a depthwise conv's output
``o`` only sees channel ``o``.

Two entry points:

* :func:`correct_biases` works on a FLOAT model, given the quantized weights the quantizer
  will produce (``quantize_weight`` simulates per-channel symmetric int8) and the
  per-channel input means (``collect_stats(..., mean_for=...)`` gives them as
  ``TensorStats.mean_per_channel``).  The quantizer quantizes the corrected biases as
  usual (the weights and their scales do not change).
* :func:`correct_qdq_biases` works on a QDQ model directly: the quantized weights are
  read from the ``DequantizeLinear`` in front of each Conv, the float weights from the
  float model (same node names), and ``E[x]`` is measured on the QDQ model itself, i.e.
  on what the int8 conv really sees.  The correction goes into the int32 bias
  (``DequantizeLinear(b_int32, scale = s_x * s_w)``), a float bias, or a new int32 bias
  for a conv that had none (so ORT still fuses the conv into ``QLinearConv``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

__all__ = [
    "bias_delta",
    "conv_input_means",
    "correct_biases",
    "correct_qdq_biases",
    "quantize_weight",
]


def quantize_weight(weight: np.ndarray, axis: int | None = 0, bits: int = 8) -> np.ndarray:
    """``weight`` rounded as the quantizer does it: symmetric, per channel along ``axis``
    (per tensor if None), range [-(2^(b-1)-1), 2^(b-1)-1], scale = absmax / qmax; returned
    dequantized (float), so ``quantize_weight(W) - W`` is the rounding error."""
    qmax = 2 ** (bits - 1) - 1
    w = weight.astype(np.float64)
    if axis is None:
        absmax = np.abs(w).max()
    else:
        absmax = np.abs(np.moveaxis(w, axis, 0)).reshape(w.shape[axis], -1).max(axis=1)
        absmax = absmax.reshape([-1 if k == axis else 1 for k in range(w.ndim)])
    scale = np.where(absmax > 0, absmax / qmax, 1.0)
    return (np.clip(np.round(w / scale), -qmax, qmax) * scale).astype(weight.dtype)


def bias_delta(weight: np.ndarray, weight_q: np.ndarray, input_mean: np.ndarray, group: int = 1) -> np.ndarray:
    """The change to a Conv's bias that removes ``(W_q - W) E[x]``: ``-(W_q - W) E[x]``
    summed over the kernel and the input channels of each output channel's group.

    ``weight``, ``weight_q``: [C_out, C_in/group, k...]; ``input_mean``: [C_in].
    """
    err = (weight_q.astype(np.float64) - weight.astype(np.float64)).reshape(weight.shape[0], weight.shape[1], -1).sum(axis=2)
    c_out, c_in_g = err.shape
    mean = np.asarray(input_mean, dtype=np.float64).reshape(group, c_in_g)
    out_per_group = c_out // group
    group_of_out = np.arange(c_out) // out_per_group
    return -(err * mean[group_of_out]).sum(axis=1)


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _group(node: ir.Node) -> int:
    attr = node.attributes.get("group")
    return 1 if attr is None else int(attr.value)


def _new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    taken = set(graph.initializers) | {v.name for n in graph for v in n.outputs} | {v.name for v in graph.inputs}
    base, k = name, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.from_numpy(array.dtype)
    graph.register_initializer(value)
    return value


def correct_biases(
    model: ir.Model,
    quantized_weights: Mapping[str, np.ndarray] | None,
    input_means: Mapping[str, np.ndarray],
) -> int:
    """Correct the biases of a FLOAT model's Convs in place; returns how many were corrected.

    ``quantized_weights``: Conv node name -> dequantized int8 weight (None: simulate the
    per-channel symmetric int8 rounding with :func:`quantize_weight`).
    ``input_means``: name of the Conv's data input -> per-channel mean [C_in] (e.g.
    ``{n: s.mean_per_channel for n, s in collect_stats(..., mean_for=names).items()}``).
    Convs whose weight is not constant or whose input mean is missing are skipped; a Conv
    without bias gets one.
    """
    n = 0
    graph = model.graph
    for node in graph:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        weight = _const(node.inputs[1])
        mean = input_means.get(node.inputs[0].name) if node.inputs[0] is not None else None
        if weight is None or mean is None:
            continue
        if quantized_weights is None:
            weight_q = quantize_weight(weight, axis=0)
        elif node.name in quantized_weights:
            weight_q = quantized_weights[node.name]
        else:
            continue
        delta = bias_delta(weight, weight_q, mean, _group(node))
        bias = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if len(node.inputs) > 2 and node.inputs[2] is not None and bias is None:
            continue  # computed bias: leave it
        new_bias = (np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)) + delta
        value = _new_initializer(graph, f"{node.name or 'conv'}_B_bc", new_bias.astype(weight.dtype))
        if len(node.inputs) < 3:
            node.resize_inputs(3)
        node.replace_input_with(2, value)
        n += 1
    return n


# ----------------------------------------------------------------------------
# on a QDQ model
# ----------------------------------------------------------------------------


def _dequantize(dq: ir.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """(float values, raw integer tensor, scale, axis) of a DequantizeLinear with constant inputs."""
    if dq.op_type != "DequantizeLinear":
        return None
    q = _const(dq.inputs[0])
    scale = _const(dq.inputs[1])
    zp = _const(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    if q is None or scale is None:
        return None
    axis_attr = dq.attributes.get("axis")
    axis = 1 if axis_attr is None else int(axis_attr.value)
    axis = axis % q.ndim if q.ndim else 0
    shape = [1] * q.ndim
    if scale.size > 1:
        shape[axis] = -1
    zp_arr = np.zeros(1) if zp is None else zp.astype(np.float64).reshape(shape if zp.size > 1 else [1] * max(q.ndim, 1))
    deq = (q.astype(np.float64) - zp_arr) * scale.astype(np.float64).reshape(shape if scale.size > 1 else [1] * max(q.ndim, 1))
    return deq, q, scale, axis


def conv_input_means(model: ir.Model, feeds: Iterable[Mapping[str, np.ndarray]], names: list[str], threads: int | None = None) -> dict[str, np.ndarray]:
    """Per-channel mean (over all axes but 1) of the named tensors, streamed over ``feeds``
    through ONNX Runtime (the tensors are added as extra outputs of a copy of the model)."""
    from onnxopt.quantization.qdq import with_outputs
    from onnxopt.verify import make_session

    sess = make_session(with_outputs(model, names), threads=threads)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    try:
        for feed in feeds:
            out = sess.run(dict(feed))
            for name in names:
                a = out[name]
                axes = tuple(k for k in range(a.ndim) if k != 1)
                sums[name] = sums.get(name, 0) + a.astype(np.float64).sum(axis=axes)
                counts[name] = counts.get(name, 0) + a.size // a.shape[1]
    finally:
        sess.close()
    return {name: sums[name] / counts[name] for name in sums}


def correct_qdq_biases(
    qdq_model: ir.Model,
    float_model: ir.Model,
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    threads: int | None = None,
) -> int:
    """Bias-correct every quantized Conv of a QDQ model in place; returns the count.

    A Conv qualifies when its weight is ``DequantizeLinear`` of a constant integer tensor
    and the float model has a Conv of the same name with a constant weight of the same
    shape (the float weight before rounding).  ``E[x]`` is measured on ``qdq_model`` over
    ``feeds`` (so it includes the upstream quantization, as in the empirical variant of
    the paper).  The correction is written into the int32 bias (rounded to its scale),
    into a float bias, or as a new int32 bias (scale = input scale * weight scale) so
    ONNX Runtime still fuses the Conv into QLinearConv.
    """
    float_weights = {}
    for node in float_model.graph:
        if node.op_type == "Conv" and len(node.inputs) > 1:
            w = _const(node.inputs[1])
            if w is not None:
                float_weights[node.name] = w
    todo = []
    for node in qdq_model.graph:
        if node.op_type != "Conv" or node.name not in float_weights or len(node.inputs) < 2:
            continue
        wdq = node.inputs[1].producer() if node.inputs[1] is not None else None
        deq = _dequantize(wdq) if wdq is not None else None
        if deq is None or deq[0].shape != float_weights[node.name].shape:
            continue
        todo.append((node, deq[0]))
    if not todo:
        return 0
    means = conv_input_means(qdq_model, feeds, sorted({n.inputs[0].name for n, _ in todo}), threads=threads)
    graph = qdq_model.graph
    n = 0
    for node, weight_q in todo:
        delta = bias_delta(float_weights[node.name], weight_q, means[node.inputs[0].name], _group(node))
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        if bias_value is not None:
            bdq = bias_value.producer()
            bias_deq = _dequantize(bdq) if bdq is not None else None
            if bias_deq is not None:
                # int32 bias: add the correction in units of its scale.
                _, raw, scale, _ = bias_deq
                new_raw = raw.astype(np.int64) + np.round(delta / scale.astype(np.float64)).astype(np.int64)
                new_raw = np.clip(new_raw, np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(raw.dtype)
                bdq.replace_input_with(0, _new_initializer(graph, f"{bdq.inputs[0].name}_bc", new_raw))
                n += 1
                continue
            bias = _const(bias_value)
            if bias is None:
                continue
            node.replace_input_with(2, _new_initializer(graph, f"{node.name}_B_bc", (bias + delta).astype(bias.dtype)))
            n += 1
            continue
        # No bias: add an int32 one, quantized like ORT's own (scale = s_x * s_w, zero point 0).
        xdq = node.inputs[0].producer()
        x_deq = _dequantize(xdq) if xdq is not None and xdq.op_type == "DequantizeLinear" else None
        x_scale = _const(xdq.inputs[1]) if xdq is not None and xdq.op_type == "DequantizeLinear" else None
        w_scale = _const(node.inputs[1].producer().inputs[1])
        if x_scale is None or w_scale is None or x_scale.size != 1:
            bias_val = _new_initializer(graph, f"{node.name}_B_bc", delta.astype(np.float32))
            node.resize_inputs(3)
            node.replace_input_with(2, bias_val)
            n += 1
            continue
        del x_deq
        b_scale = (float(x_scale.reshape(())) * w_scale.astype(np.float64)).reshape(-1)
        b_scale = np.broadcast_to(b_scale, delta.shape).astype(np.float32)
        raw = np.round(delta / b_scale).astype(np.int32)
        raw_v = _new_initializer(graph, f"{node.name}_B_bc_quantized", raw)
        scale_v = _new_initializer(graph, f"{node.name}_B_bc_scale", b_scale)
        dq = ir.node("DequantizeLinear", [raw_v, scale_v], attributes={"axis": 0}, name=f"{node.name}_B_bc_DequantizeLinear")
        dq.outputs[0].name = f"{node.name}_B_bc_dequantized"
        dq.outputs[0].dtype = ir.DataType.FLOAT
        graph.insert_before(node, dq)
        node.resize_inputs(3)
        node.replace_input_with(2, dq.outputs[0])
        n += 1
    return n


def bias_correction(qmodel: ir.Model, ctx) -> str:
    """``weight_transforms`` hook for :func:`onnxopt.quantization.quantize`.

    Runs after the weights are quantized and before the biases are: for every quantized
    Conv of ``ctx.layers``, ``E[x]`` of its input is measured on the QDQ model itself over
    ``ctx.calib`` (so upstream quantization is included, the empirical variant), and
    ``-(W_q - W) E[x]`` is added to its float bias (created when absent), which the
    quantizer then quantizes to int32 as usual.
    """
    from onnxopt.calibration import collect_stats

    layers = [l for l in ctx.layers if l.op_type == "Conv" and l.node.inputs[0] is not None]
    if not layers:
        return "no Conv layers"
    names = sorted({l.node.inputs[0].name for l in layers})
    stats = collect_stats(qmodel, ctx.calib, [], mean_for=names, progress=False)
    graph = qmodel.graph
    n, shifts = 0, []
    for layer in layers:
        st = stats.get(layer.node.inputs[0].name)
        mean = getattr(st, "mean_per_channel", None)
        if mean is None:
            continue
        delta = bias_delta(layer.float_weight, layer.dequantized_weight, mean, _group(layer.node))
        bias_value = ctx.ensure_bias(layer)
        bias = bias_value.const_value.numpy()
        new = _new_initializer(graph, f"{bias_value.name}_bc", (bias.astype(np.float64) + delta).astype(bias.dtype))
        layer.node.replace_input_with(2, new)
        if not bias_value.uses() and bias_value.is_initializer():
            graph.initializers.pop(bias_value.name, None)
        layer.bias_name = new.name
        shifts.append(float(np.abs(delta).max()))
        n += 1
    ctx.report["bias_correction"] = {"corrected": n, "max_shift": max(shifts, default=0.0)}
    return f"corrected {n} conv biases (largest shift {max(shifts, default=0.0):.3g})"


def _qdq_source(value: ir.Value | None) -> ir.Value | None:
    """The float tensor x of ``value = DequantizeLinear(QuantizeLinear(x))``, else None."""
    dq = value.producer() if value is not None else None
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = dq.inputs[0].producer() if dq.inputs[0] is not None else None
    if q is None or q.op_type != "QuantizeLinear":
        return None
    return q.inputs[0]


def empirical_bias_correction(qmodel: ir.Model, ctx) -> str:
    """``weight_transforms`` hook: remove the mean shift each quantized Conv INTRODUCES
    (measured on ``ctx.calib`` through the QDQ model itself), by adjusting its float bias.

    For a Conv computing ``W_q * dq(q(x)) + b`` instead of ``W * x + b``, the shift it adds
    to its output mean, given its actual input, is::

        (W_q - W) E[dq(x)]  +  W (E[dq(x)] - E[x])          (weight rounding + input rounding/clipping)

    and, when its output is quantized for a non-ReLU reader, ``E[dq(y)] - E[y]`` (output
    clipping).  All three are subtracted.  Each layer corrects only what it introduces,
    so correcting every layer at once does not count an upstream shift twice (measuring
    the total shift ``E[y_int8] - E[y_fp32]`` per layer and subtracting it everywhere at
    once would: we tried, it destroys the detector).  One pass over the calibration data.
    """
    from onnxopt.calibration import collect_stats

    float_nodes = {n.name: n for n in ctx.float_model.graph}
    plan = []
    names: set[str] = set()
    for layer in ctx.layers:
        if layer.op_type != "Conv":
            continue
        x_dq = layer.node.inputs[0]
        x = _qdq_source(x_dq)
        y = layer.node.outputs[0]
        y_dq = None
        fnode = float_nodes.get(layer.name)
        relu_after = fnode is not None and any(u.op_type in ("Relu", "Clip") for u in fnode.outputs[0].consumers())
        if not relu_after:
            for user in y.consumers():
                if user.op_type == "QuantizeLinear":
                    for dq in user.outputs[0].consumers():
                        if dq.op_type == "DequantizeLinear":
                            y_dq = dq.outputs[0]
        plan.append((layer, x, x_dq, y, y_dq))
        names.update(v.name for v in (x, x_dq, y, y_dq) if v is not None)
    if not plan:
        return "no Conv layers"
    stats = collect_stats(qmodel, ctx.calib, [], mean_for=sorted(names), progress=False)

    def mean(v):
        return None if v is None or v.name not in stats else stats[v.name].mean_per_channel

    graph = qmodel.graph
    shifts = []
    for layer, x, x_dq, y, y_dq in plan:
        group = _group(layer.node)
        m_dq = mean(x_dq)
        if m_dq is None:
            continue
        delta = bias_delta(layer.float_weight, layer.dequantized_weight, m_dq, group)
        m_x = mean(x)
        if m_x is not None:
            delta += bias_delta(np.zeros_like(layer.float_weight), layer.float_weight, m_dq - m_x, group)
        m_y, m_ydq = mean(y), mean(y_dq)
        if m_y is not None and m_ydq is not None:
            delta -= m_ydq - m_y
        bias_value = ctx.ensure_bias(layer)
        bias = bias_value.const_value.numpy()
        new = _new_initializer(graph, f"{layer.name}_bias_ebc", (bias.astype(np.float64) + delta).astype(bias.dtype))
        layer.node.replace_input_with(2, new)
        if not bias_value.uses() and bias_value.is_initializer():
            graph.initializers.pop(bias_value.name, None)
        layer.bias_name = new.name
        shifts.append(float(np.abs(delta).max()))
    ctx.report["empirical_bias_correction"] = {"layers": len(shifts), "largest_shift": max(shifts, default=0.0)}
    return f"corrected the mean shift of {len(shifts)} convs (largest {max(shifts, default=0.0):.3g})"
