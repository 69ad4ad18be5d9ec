"""Error-compensating rounding of int8 conv weights (GPTQ / Optimal Brain Quantization).

Round-to-nearest minimises each weight's own error, not the layer's output error.  With
calibration inputs ``X`` (the conv's input patches, im2col'd: one column per output
position), the output error of a row ``w`` of the weight matrix is
``(w_q - w) H (w_q - w)^T`` with ``H = X X^T``.  GPTQ (Frantar et al., "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", 2022, after OBQ,
Frantar & Alistarh 2022, and Optimal Brain Surgeon) quantizes the columns one at a
time and spreads each column's rounding error over the columns not yet quantized, in
the proportions that minimise that quadratic error::

    U = chol((H + damp I)^-1)^T                       (upper triangular)
    for j in 0..D-1:
        q_j   = clamp(round(w_j / s), -127, 127)      (s: the row's fixed scale)
        e     = (w_j - s q_j) / U[j, j]
        w_k  -= e * U[j, k]      for k > j

The scales stay the quantizer's (symmetric per output channel, absmax / 127), so the
result is an ordinary int8 tensor with ordinary scales: no runtime cost.  A grouped conv
has one ``H`` per group (a depthwise conv: one ``k*k x k*k`` matrix per channel); all
output channels of a group share it.  ``H`` is accumulated over a random subset of
output positions per sample (``max_positions``), enough for ``D <= ~1000`` columns.

A MatMul with a constant weight ``W`` [K, N] (per-channel along N) is the same problem
with ``X`` the input rows (every token of every sample, [..., K] flattened to rows),
``H = X^T X`` [K, K] shared by all N output columns, and the rows of ``W^T`` as the rows
rounded above.

Entry points: :func:`conv_input_hessians` / :func:`matmul_input_hessians` (stream
calibration data through ONNX Runtime), :func:`gptq_round` (one weight tensor),
:func:`gptq_weight_rounding` (the quantizer's ``weight_transforms`` hook: rewrites the int8
weights of the QDQ model in place).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

__all__ = ["conv_input_hessians", "gptq_round", "gptq_weight_rounding", "im2col_sample", "matmul_input_hessians"]


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _conv_geometry(node: ir.Node, weight_shape) -> dict | None:
    """Kernel/stride/pad/dilation of a 2-D Conv with explicit padding, else None."""
    if len(weight_shape) != 4 or _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    kh, kw = weight_shape[2:]
    pads = list(_attr(node, "pads", None) or [0, 0, 0, 0])
    return {
        "kernel": (int(kh), int(kw)),
        "strides": tuple(int(s) for s in (_attr(node, "strides", None) or [1, 1])),
        "pads": tuple(int(p) for p in pads),
        "dilations": tuple(int(d) for d in (_attr(node, "dilations", None) or [1, 1])),
        "group": int(_attr(node, "group", 1)),
    }


def im2col_sample(x: np.ndarray, geo: dict, max_positions: int, rng: np.random.Generator) -> np.ndarray:
    """Input patches of a 2-D conv at up to ``max_positions`` random output positions:
    [C, kh*kw, P] (channel-major, matching the weight layout [O, C/g, kh, kw])."""
    from numpy.lib.stride_tricks import sliding_window_view

    kh, kw = geo["kernel"]
    sh, sw = geo["strides"]
    dh, dw = geo["dilations"]
    pt, pl, pb, pr = geo["pads"]
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    win = sliding_window_view(xp, (eh, ew), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]  # N C Ho Wo kh kw
    n, c, ho, wo = win.shape[:4]
    total = n * ho * wo
    idx = rng.choice(total, size=min(max_positions, total), replace=False) if total > max_positions else np.arange(total)
    b, rest = np.divmod(idx, ho * wo)
    ys, xs = np.divmod(rest, wo)
    patches = win[b, :, ys, xs]  # P C kh kw
    return np.ascontiguousarray(patches.reshape(len(idx), c, kh * kw).transpose(1, 2, 0)).astype(np.float64)


def conv_input_hessians(
    model: ir.Model,
    feeds: Iterable[Mapping[str, np.ndarray]],
    convs: list[ir.Node],
    *,
    max_positions: int = 4096,
    threads: int | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """``H = X X^T / P`` per group for each conv: {node name: [G, D, D]}, D = C/G * kh * kw.

    The conv inputs are fetched as extra outputs of ``model`` (one ORT session), one feed
    at a time; nothing but the running sums is kept.
    """
    from onnxopt.quantization.qdq import with_outputs
    from onnxopt.verify import make_session

    geos = {}
    for node in convs:
        w = ir.convenience.get_const_tensor(node.inputs[1]) if node.inputs[1] is not None else None
        shape = tuple(w.shape) if w is not None else None
        if shape is None and node.inputs[1].producer() is not None:
            src = ir.convenience.get_const_tensor(node.inputs[1].producer().inputs[0])
            shape = tuple(src.shape) if src is not None else None
        geo = _conv_geometry(node, shape) if shape else None
        if geo is not None:
            geos[node.name] = (node.inputs[0].name, geo)
    sess = make_session(with_outputs(model, sorted({src for src, _ in geos.values()})), threads=threads)
    rng = np.random.default_rng(seed)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    try:
        for feed in feeds:
            out = sess.run(dict(feed))
            for conv, (src, geo) in geos.items():
                cols = im2col_sample(out[src], geo, max_positions, rng)  # C K P
                g = geo["group"]
                c, k, p = cols.shape
                cols = cols.reshape(g, (c // g) * k, p)
                h = cols @ cols.transpose(0, 2, 1)
                sums[conv] = sums.get(conv, 0) + h
                counts[conv] = counts.get(conv, 0) + p
    finally:
        sess.close()
    return {k: v / counts[k] for k, v in sums.items()}


def matmul_input_hessians(
    model: ir.Model,
    feeds: Iterable[Mapping[str, np.ndarray]],
    matmuls: list[ir.Node],
    *,
    threads: int | None = None,
) -> dict[str, np.ndarray]:
    """``H = X^T X / rows`` for each MatMul's first input: {node name: [1, K, K]}.

    Rows are the input's last axis flattened over all leading axes (every token of every
    sample).  One ORT session with the inputs as extra outputs, one feed at a time; only
    the running sums are kept.  MatMuls reading the same tensor share one sum.
    """
    from onnxopt.quantization.qdq import with_outputs
    from onnxopt.verify import make_session

    src_of = {n.name: n.inputs[0].name for n in matmuls if n.inputs[0] is not None}
    srcs = sorted(set(src_of.values()))
    sess = make_session(with_outputs(model, srcs), threads=threads)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    try:
        for feed in feeds:
            out = sess.run(dict(feed))
            for src in srcs:
                x = out[src]
                x = x.reshape(-1, x.shape[-1]).astype(np.float64)
                sums[src] = sums.get(src, 0) + x.T @ x
                counts[src] = counts.get(src, 0) + x.shape[0]
    finally:
        sess.close()
    return {name: (sums[src] / counts[src])[None] for name, src in src_of.items() if src in sums}


def gptq_round(
    weight: np.ndarray, hessian: np.ndarray, scale: np.ndarray, group: int = 1, *, damp: float = 0.01, qmax: int = 127
) -> np.ndarray:
    """Integer weights (same shape as ``weight``) chosen column by column with error
    compensation (module doc).  ``scale``: per output channel [O] (or a scalar);
    ``hessian``: [G, D, D] from :func:`conv_input_hessians`.  Falls back to
    round-to-nearest for a group whose damped H is not positive definite."""
    o = weight.shape[0]
    d = int(np.prod(weight.shape[1:]))
    w = weight.reshape(group, o // group, d).astype(np.float64).copy()
    s = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (o,)).reshape(group, o // group)
    h = hessian.astype(np.float64).copy()
    diag = np.einsum("gii->gi", h)
    dead = diag <= 0
    # A column that never sees signal cannot affect the output: zero it (as GPTQ does).
    w[np.broadcast_to(dead[:, None, :], w.shape)] = 0.0
    h[:, np.arange(d), np.arange(d)] += np.where(dead, 1.0, 0.0) + damp * np.maximum(diag.mean(axis=1, keepdims=True), 1e-12)
    q = np.empty_like(w)
    try:
        u = np.linalg.cholesky(np.linalg.inv(h)).transpose(0, 2, 1)  # upper: (H^-1) = U^T U
        ok = np.all(np.isfinite(u), axis=(1, 2))
    except np.linalg.LinAlgError:
        u, ok = None, np.zeros(group, bool)
    if u is None or not ok.all():
        return np.clip(np.rint(weight.reshape(group, o // group, d) / s[..., None]), -qmax, qmax).reshape(weight.shape)
    for j in range(d):
        col = w[:, :, j]
        qj = np.clip(np.rint(col / s), -qmax, qmax)
        q[:, :, j] = qj
        err = (col - qj * s) / u[:, j, j][:, None]
        w[:, :, j + 1:] -= err[:, :, None] * u[:, None, j, j + 1:]
    return q.reshape(weight.shape)


def gptq_weight_rounding(qmodel: ir.Model, ctx, *, max_positions: int = 4096,
                         op_types: tuple[str, ...] = ("Conv", "MatMul")) -> str:
    """``weight_transforms`` hook for :func:`onnxopt.quantization.quantize`: re-round the int8
    weights of every quantized 2-D Conv and MatMul (constant [K, N] weight, per-channel
    along N) with :func:`gptq_round`, keeping the scales.

    ``H`` comes from the FLOAT model's layer inputs on ``ctx.calib`` (``ctx.float_model``,
    same node names).  ``layer.dequantized_weight`` is updated so later hooks (bias
    correction) see the new rounding; run this hook before ``bias_correction``.
    """
    layers = [l for l in ctx.layers if l.op_type in op_types
              and ((l.op_type == "Conv" and l.axis == 0) or (l.op_type == "MatMul" and l.axis == 1
                                                               and l.float_weight.ndim == 2))]
    fnodes = {n.name: n for n in ctx.float_model.graph}
    convs = [fnodes[l.name] for l in layers if l.name in fnodes and l.op_type == "Conv"]
    mms = [fnodes[l.name] for l in layers if l.name in fnodes and l.op_type == "MatMul"]
    hess = conv_input_hessians(ctx.float_model, ctx.calib, convs, max_positions=max_positions) if convs else {}
    if mms:
        hess.update(matmul_input_hessians(ctx.float_model, ctx.calib, mms))
    n = 0
    gain = []
    for layer in layers:
        h = hess.get(layer.name)
        if h is None:
            continue
        scale = np.asarray(layer.weight_scale, np.float64).reshape(-1)
        # MatMul: the output channels are W's columns, so round W^T ([N, K]) and transpose back.
        transposed = layer.op_type == "MatMul"
        group = 1 if transposed else int(_attr(layer.node, "group", 1))
        w = layer.float_weight.T if transposed else layer.float_weight
        q = gptq_round(w, h, scale, group)
        # The int8 tensor is the data input of the DequantizeLinear feeding the layer's weight.
        wdq = layer.node.inputs[1].producer() if layer.node.inputs[1] is not None else None
        if wdq is None or wdq.op_type != "DequantizeLinear":
            continue
        wq_value = wdq.inputs[0]
        if wq_value is None or wq_value.const_value is None or not wq_value.is_initializer():
            continue
        old = wq_value.const_value.numpy()
        new_deq = (q * scale.reshape((-1,) + (1,) * (q.ndim - 1))).astype(np.float32)  # [O, ...] layout
        old_deq = layer.dequantized_weight.T if transposed else layer.dequantized_weight
        if transposed:
            q = q.T
        if old.shape != q.shape:
            continue
        wq_value.const_value = ir.tensor(q.astype(old.dtype), name=wq_value.name)
        gain.append(_output_error(w, old_deq, h, group) / max(_output_error(w, new_deq, h, group), 1e-30))
        layer.dequantized_weight = np.ascontiguousarray(new_deq.T) if transposed else new_deq
        n += 1
    if hasattr(ctx, "report"):
        ctx.report["gptq_rounding"] = {"layers": n, "median_error_reduction": float(np.median(gain)) if gain else None}
    return f"re-rounded {n} weights (median output-error reduction {np.median(gain) if gain else 1:.2f}x)"


def _output_error(w: np.ndarray, wq: np.ndarray, h: np.ndarray, group: int) -> float:
    """trace((Wq - W) H (Wq - W)^T): the expected squared output error (per position)."""
    o = w.shape[0]
    e = (wq.astype(np.float64) - w.astype(np.float64)).reshape(group, o // group, -1)
    return float(np.einsum("god,gde,goe->", e, h, e))
