"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights.

For activations X [..., K] read by MatMuls X @ W_i (W_i [K, N_i], constant), pick per input
channel j

    s_j = max|X_j|^alpha / max_i max|W_i[j, :]|^(1 - alpha)

and compute (X / s) @ (diag(s) W_i): the product is unchanged, X's outlier channels shrink
(per-tensor activation quantization gets a finer grid) and W's rows grow where X was small
(per-channel weight quantization absorbs that). The division by s is folded where it is free:

- X produced by ``LayerNormalization`` (gamma, beta constant over K) whose output only feeds
  the group: gamma / s, beta / s;
- X produced by ``Mul`` with a constant operand broadcasting over K (GELU's final "* 0.5")
  and only feeding the group: constant / s;
- otherwise an explicit ``Mul(X, 1/s)`` is inserted in front of the group (a residual path
  that also reads X keeps the unscaled X). One elementwise op on [B, S, K].
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnxopt.passes.fuse_transformer import is_gelu_product
from onnxopt.quantization.analysis import Layer


def smoothing_groups(layers: list[Layer]) -> dict[str, list[Layer]]:
    """{activation tensor: MatMul layers reading it} (only MatMul: W rows are input channels)."""
    groups: dict[str, list[Layer]] = {}
    for layer in layers:
        if layer.op_type == "MatMul":
            groups.setdefault(layer.act_input, []).append(layer)
    return groups


def _set_const(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(array.astype(np.float32), name=value.name)
    value.shape = ir.Shape(array.shape)


def _scalar_or_last(arr: np.ndarray, k: int) -> bool:
    return arr.size == 1 or (arr.shape[-1] == k and arr.size == k)


ALPHAS = (0.5, 0.6, 0.7, 0.8, 0.9)
# "auto" smooths a group only where it lowers the group's output error (relative squared
# error, summed over the group's layers) by at least MIN_GAIN of itself and by MIN_ABS_GAIN
# in all: each smoothed group that cannot fold its scales costs an element-wise Mul, which a
# layer already near 30 dB SQNR does not pay back.
MIN_GAIN = 0.25
MIN_ABS_GAIN = 1e-3


def smoothing_scales(xmax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-channel s = max|X_j|^alpha / max|W_j|^(1 - alpha), kept in [1e-3, 1e3]."""
    s = np.power(np.maximum(xmax, 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1 - alpha)
    return np.clip(s, 1e-3, 1e3)


def choose_alphas(
    model: ir.Model,
    groups: Mapping[str, list[Layer]],
    rows: Mapping[str, np.ndarray],
    scheme,
    *,
    alphas=ALPHAS,
) -> dict[str, dict]:
    """Per group, the migration strength with the least output error on sampled rows.

    For activation rows X ([R, K], from calibration data) read by weights W_i, the error of
    a candidate is ``sum_i ||X W_i - fq(X / s) Q(diag(s) W_i)||^2 / ||X W_i||^2`` with the
    scheme's activation fake-quantization (min-max range of X / s) and per-channel weights.
    Returns {tensor: {"alpha": best or None, "error_unsmoothed", "error_best"}}, with None
    when no candidate improves on leaving the group alone. One alpha for every layer is a
    poor fit (measured on MiniLM, docs/quantization.md: 0.5 suits the LayerNorm outputs and
    ruins the GELU outputs, which want 0.8-0.9).
    """
    from onnxopt.quantization.scheme import dequantize_weight, quantize_weight
    from onnxopt.quantization.sensitivity import fake_quant

    out: dict[str, dict] = {}
    for x_name, group in groups.items():
        x = rows.get(x_name)
        if x is None or x.ndim != 2 or not np.all(np.isfinite(x)):
            continue
        weights = [model.graph.initializers[l.weight].const_value.numpy().astype(np.float32) for l in group]
        if any(w.ndim != 2 or w.shape[0] != x.shape[1] for w in weights):
            continue
        if not all(np.all(np.isfinite(w)) for w in weights):
            continue  # NaN/Inf weights: no scale can be derived from them; the group stays unsmoothed
        refs = [x @ w for w in weights]
        norms = [max(float(np.vdot(r, r)), 1e-30) for r in refs]
        xmax = np.abs(x).max(axis=0).astype(np.float64)
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64)

        def error(s: np.ndarray | None) -> float:
            xs = x if s is None else (x / s).astype(np.float32)
            xq = fake_quant(xs, float(xs.min()), float(xs.max()), scheme)
            total = 0.0
            for w, ref, norm in zip(weights, refs, norms):
                ws = w if s is None else (w * s[:, None]).astype(np.float32)
                q, sc = quantize_weight(ws, 1 if scheme.per_channel else None)
                d = xq @ dequantize_weight(q, sc, 1 if scheme.per_channel else None)
                d -= ref
                total += float(np.vdot(d, d)) / norm
            return total

        base = error(None)
        best_alpha, best = None, base
        for a in alphas:
            e = error(smoothing_scales(xmax, wmax, a))
            if e < best:
                best_alpha, best = a, e
        out[x_name] = {"alpha": best_alpha, "error_unsmoothed": base, "error_best": best}
    return out


def apply_smoothquant(
    model: ir.Model,
    layers: list[Layer],
    channel_absmax: Mapping[str, np.ndarray],
    *,
    alpha: float | Mapping[str, float] = 0.5,
    fold_only: bool = False,
    tensors=None,
    scales_out: dict | None = None,
) -> list[dict]:
    """Smooth every MatMul group in place (float model); returns one report entry per group.

    ``alpha``: one migration strength, or {activation: alpha} (groups missing are skipped).
    ``tensors``: smooth only the groups reading these activations (default: all).
    ``scales_out``: filled with {original activation: (s, the smoothed tensor's name)}, so a
    caller that calibrated the original per channel can derive the smoothed range.

    Layers whose activation input moved to an inserted Mul get ``act_input`` updated.
    """
    graph = model.graph
    values = {v.name: v for n in graph for v in n.outputs}
    values.update({v.name: v for v in graph.inputs})
    nodes = {n.name: n for n in graph}
    entries = []
    for x_name, group in smoothing_groups(layers).items():
        if tensors is not None and x_name not in tensors:
            continue
        a = alpha.get(x_name) if isinstance(alpha, Mapping) else alpha
        if a is None:
            continue
        xmax = channel_absmax.get(x_name)
        x = values.get(x_name)
        if xmax is None or x is None:
            continue
        xmax = np.asarray(xmax, np.float64)
        k = xmax.shape[0]
        weights = [graph.initializers[l.weight].const_value.numpy().astype(np.float64) for l in group]
        if any(w.shape[0] != k for w in weights) or len({l.weight for l in group}) != len(group):
            continue
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        s = smoothing_scales(xmax, wmax, a)
        group_nodes = {nodes[l.name] for l in group}
        only_group = all(user in group_nodes for user, _ in x.uses()) and not x.is_graph_output()
        producer = x.producer()
        how = None
        if only_group and producer is not None and producer.op_type == "LayerNormalization":
            gamma = producer.inputs[1]
            beta = producer.inputs[2] if len(producer.inputs) > 2 else None
            if gamma is not None and gamma.const_value is not None and len(list(gamma.uses())) == 1 and (
                beta is None or (beta.const_value is not None and len(list(beta.uses())) == 1)
            ):
                _set_const(gamma, gamma.const_value.numpy() / s)
                if beta is not None:
                    _set_const(beta, beta.const_value.numpy() / s)
                how = "folded into LayerNormalization"
        elif only_group and producer is not None and producer.op_type == "Mul" and not is_gelu_product(producer):
            # (not a GELU's final "* 0.5": ORT's Gelu fusion then leaves one Mul either way, so
            # folding saves nothing in ORT and would make the GELU unrecognisable to
            # is_gelu_product / fuse-gelu; the explicit Mul keeps it a plain GELU)
            for i, operand in enumerate(producer.inputs):
                c = operand.const_value if operand is not None else None
                if c is not None and operand.is_initializer() and len(list(operand.uses())) == 1 \
                        and _scalar_or_last(c.numpy(), k):
                    new = np.broadcast_to(c.numpy().reshape(-1), (k,)) / s
                    _set_const(operand, new)
                    how = "folded into Mul constant"
                    break
        if how is None:
            if fold_only:
                continue
            inv = ir.Value(name=f"{x_name}_smooth_inv_scale", const_value=ir.tensor((1.0 / s).astype(np.float32)))
            inv.shape = ir.Shape([k])
            inv.dtype = ir.DataType.FLOAT
            graph.register_initializer(inv)
            mul = ir.node("Mul", [x, inv], name=f"{x_name}_SmoothQuant")
            mul.outputs[0].name = f"{x_name}_smoothed"
            if x.dtype is not None:
                mul.outputs[0].dtype = x.dtype
                mul.outputs[0].shape = x.shape
            first = min(group_nodes, key=lambda n: list(graph).index(n))
            graph.insert_before(first, mul)
            for node in group_nodes:
                node.replace_input_with(0, mul.outputs[0])
            for l in group:
                l.act_input = mul.outputs[0].name
            how = "explicit Mul"
        for l, w in zip(group, weights):
            _set_const(graph.initializers[l.weight], w * s[:, None])
        if scales_out is not None:
            scales_out[x_name] = (s, group[0].act_input)
        entries.append({
            "tensor": x_name, "layers": [l.name for l in group], "how": how, "alpha": a,
            "act_absmax_before": float(xmax.max()), "act_absmax_after": float((xmax / s).max()),
        })
    return entries
