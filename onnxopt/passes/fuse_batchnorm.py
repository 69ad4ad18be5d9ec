"""``fuse-batchnorm``: fold an inference-mode BatchNormalization into the op before it.

Rewrite::

    Y = BatchNormalization(P(X, W, b), scale, B, mean, var)  ->  Y = P(X, W', b')

with ``f = scale / sqrt(var + epsilon)`` (per channel) and ``shift = B - mean * f``:

- Conv:          ``W'[m, ...] = W[m, ...] * f[m]``, ``b' = b * f + shift``.
- ConvTranspose: the weight is ``[C_in, M/group, k...]`` and output channel ``m`` of group
  ``g`` is ``W[g*C_in/group : (g+1)*C_in/group, m - g*M/group]``, so the scale applies along
  axis 1 within each group; ``b' = b * f + shift``.
- Gemm (output ``[M, N]``, BN channel axis 1 = N): column ``n`` of ``op(B)`` is scaled by
  ``f[n]``; ``C' = beta * C * f + shift`` and ``beta' = 1``.
- MatMul with a constant 2-D weight ``[K, N]`` and an input known to be 2-D: the BN channel
  axis (1) is then the MatMul's last axis, so the weight's columns are scaled and the pair
  becomes ``Gemm(A, W', shift)``. For any other input rank the BN channel axis is not the
  MatMul's output axis and nothing is fused.

Because ``BN(y) = (y - mean) * f + B = y * f + shift`` and every listed op is linear in its
weight with the output channel along one weight axis, the result is exact up to float
rounding (weights are computed in float64 and rounded once).

Conditions:

- BN is in inference form: a single output (more declared outputs mean training mode in
  opsets 7-13), ``training_mode == 0`` (opset >= 14), ``is_test == 1`` (opset < 7, where
  ``is_test = 0`` means batch statistics), and ``spatial == 1`` (opset < 9; ``spatial = 0``
  normalises per element, not per channel). ``consumed_inputs`` (opset < 6) is irrelevant.
- scale, B, mean and var are constant 1-D float vectors with one entry per output channel.
- The producer's output feeds only this BN and is not a graph output; its weight (and bias)
  are constants used by this node alone (a shared weight is not changed).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes._fusion_util import (
    NodeRewritePass,
    attr,
    can_take_over,
    const_array,
    has_ref_attributes,
    is_float_array,
    known_rank,
    make_const,
    owned,
    remove_nodes,
    set_const_input,
    sole_use,
    take_over,
)
from onnxopt.passes.registry import register_pass


def bn_affine(node: ir.Node, opset: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(f, shift) with ``BN(y) = y * f + shift`` per channel, or None if not inference-form/constant."""
    if len(node.inputs) != 5 or node.inputs[0] is None:
        return None
    opset = opset or 15
    extras = [o for o in node.outputs[1:] if o is not None and o.name]
    if any(o.uses() or o.is_graph_output() for o in extras):
        return None
    if 7 <= opset < 14 and extras:
        return None  # opsets 7-13: more than one declared output means training mode
    if opset >= 14 and attr(node, "training_mode", 0) != 0:
        return None
    if opset < 7 and attr(node, "is_test", 0) != 1:
        return None
    if opset < 9 and attr(node, "spatial", 1) != 1:
        return None
    params = [const_array(v) for v in node.inputs[1:]]
    if not all(is_float_array(p) for p in params):
        return None
    if any(p.ndim != 1 for p in params) or len({p.size for p in params}) != 1:
        return None
    scale, bias, mean, var = (p.astype(np.float64) for p in params)
    eps = float(attr(node, "epsilon", 1e-5))
    denom = var + eps
    if not np.all(np.isfinite(params[0])) or not np.all(denom > 0) or not np.all(np.isfinite(denom)):
        # var + eps <= 0 (or NaN/Inf) would bake NaN/Inf weights into the layer: leave the
        # BatchNormalization as it is, the runtime computes what the model says.
        return None
    f = scale / np.sqrt(denom)
    if not np.all(np.isfinite(f)):
        return None
    return f, bias - mean * f


def scale_output_channels(op: ir.Node, weight: np.ndarray, f: np.ndarray) -> np.ndarray | None:
    """``weight`` with each output channel of Conv/ConvTranspose ``op`` multiplied by ``f``."""
    w = weight.astype(np.float64)
    if op.op_type == "Conv":
        if w.ndim < 3 or w.shape[0] != f.size:
            return None
        return w * f.reshape((-1,) + (1,) * (w.ndim - 1))
    # ConvTranspose: [C_in, M/group, k...]
    group = int(attr(op, "group", 1))
    if w.ndim < 3 or w.shape[0] % group or w.shape[1] * group != f.size:
        return None
    grouped = w.reshape((group, w.shape[0] // group, w.shape[1]) + w.shape[2:])
    fg = f.reshape((group, 1, w.shape[1]) + (1,) * (w.ndim - 2))
    return (grouped * fg).reshape(w.shape)


def output_channels(op: ir.Node, weight: np.ndarray) -> int | None:
    """Output channels of Conv/ConvTranspose/Gemm ``op`` with constant ``weight``."""
    if op.op_type == "Conv":
        return weight.shape[0] if weight.ndim >= 3 else None
    if op.op_type == "ConvTranspose":
        return weight.shape[1] * int(attr(op, "group", 1)) if weight.ndim >= 3 else None
    if op.op_type == "Gemm" and weight.ndim == 2:
        return weight.shape[0] if int(attr(op, "transB", 0)) else weight.shape[1]
    return None


def fold_affine_into(names, op: ir.Node, f: np.ndarray | None, shift: np.ndarray | None, *, check_only: bool = False) -> bool:
    """Fold ``y * f + shift`` (per output channel) into Conv/ConvTranspose/Gemm ``op``.

    ``f`` None means 1 (only the bias changes, so the weight may be shared); ``shift`` None
    means 0. Returns True when done (or, with ``check_only``, when possible). Shared by
    fuse-batchnorm, fuse-conv-bias and fuse-scale.
    """
    if has_ref_attributes(op):
        return False
    if op.op_type in ("Conv", "ConvTranspose"):
        if len(op.inputs) < 2:
            return False
        w = const_array(op.inputs[1])
        if not is_float_array(w) or (f is not None and not owned(op.inputs[1])):
            return False
        channels = output_channels(op, w)
        if channels is None or (f is not None and f.size != channels) or (shift is not None and shift.size != channels):
            return False
        b = op.inputs[2] if len(op.inputs) > 2 else None
        b_arr = const_array(b) if b is not None else None
        if b is not None and (not is_float_array(b_arr) or not owned(b) or b_arr.size != channels):
            return False
        new_w = scale_output_channels(op, w, f) if f is not None else w
        if new_w is None:
            return False
        if check_only:
            return True
        new_b = b_arr.astype(np.float64).reshape(-1) if b_arr is not None else np.zeros(channels)
        if f is not None:
            new_b = new_b * f
            set_const_input(names, op, 1, new_w.astype(w.dtype))
        if shift is not None:
            new_b = new_b + shift
        if b is not None or shift is not None:
            set_const_input(names, op, 2, new_b.astype(w.dtype), name_hint=f"{op.inputs[1].name}_bias")
        return True
    if op.op_type == "Gemm":
        return _fold_into_gemm(names, op, f, shift, check_only)
    return False


def _fold_into_gemm(names, op: ir.Node, f: np.ndarray | None, shift: np.ndarray | None, check_only: bool) -> bool:
    if len(op.inputs) < 2:
        return False
    w = const_array(op.inputs[1])
    if not is_float_array(w) or w.ndim != 2 or (f is not None and not owned(op.inputs[1])):
        return False
    trans_b = int(attr(op, "transB", 0))
    n = w.shape[0] if trans_b else w.shape[1]
    if (f is not None and n != f.size) or (shift is not None and shift.size != n):
        return False
    c = op.inputs[2] if len(op.inputs) > 2 else None
    c_arr = const_array(c) if c is not None else None
    if c is not None and (not is_float_array(c_arr) or not owned(c) or c_arr.ndim > 2):
        return False
    if c_arr is not None and c_arr.ndim >= 1 and c_arr.shape[-1] not in (1, n):
        return False
    if check_only:
        return True
    beta = float(attr(op, "beta", 1.0))
    new_c = np.zeros(n) if c_arr is None else beta * c_arr.astype(np.float64)
    if f is not None:
        new_w = w.astype(np.float64) * (f.reshape(-1, 1) if trans_b else f.reshape(1, -1))
        set_const_input(names, op, 1, new_w.astype(w.dtype))
        new_c = new_c * f
    if shift is not None:
        new_c = new_c + shift
    if c is not None or shift is not None:
        set_const_input(names, op, 2, np.asarray(new_c).astype(w.dtype), name_hint=f"{op.inputs[1].name}_bias")
        op.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    return True


@register_pass(
    "fuse-batchnorm",
    "Fold inference BatchNormalization into the preceding Conv/ConvTranspose/Gemm (or 2-D MatMul -> Gemm)",
    preset_order=320,
)
class FuseBatchNormPass(NodeRewritePass):
    __doc__ = __doc__
    op_types = frozenset({"BatchNormalization"})

    def rewrite(self, graph, bn: ir.Node) -> bool:
        affine = bn_affine(bn, self.opset(graph))
        if affine is None:
            return False
        f, shift = affine
        x = bn.inputs[0]
        producer = x.producer()
        if producer is None or producer.domain not in ("", "ai.onnx") or sole_use(x) is not bn:
            return False
        y = bn.outputs[0]
        if not can_take_over(y, x):
            return False
        if producer.op_type in ("Conv", "ConvTranspose", "Gemm"):
            if not fold_affine_into(self.names, producer, f, shift):
                return False
            take_over(self.names, y, x)
            remove_nodes(bn)
            return True
        if producer.op_type == "MatMul":
            return self._matmul(graph, producer, bn, f, shift)
        return False

    def _matmul(self, graph, mm: ir.Node, bn: ir.Node, f: np.ndarray, shift: np.ndarray) -> bool:
        if (self.opset(graph) or 0) < 7 or len(mm.inputs) != 2:
            return False  # Gemm broadcasts C one way only from opset 7
        a, w_val = mm.inputs
        w = const_array(w_val)
        # Only when the BN channel axis (1) is the MatMul's output axis: A and the output 2-D.
        if known_rank(a) != 2 or not is_float_array(w) or w.ndim != 2:
            return False
        if w.shape[1] != f.size or not owned(w_val):
            return False
        if mm.outputs[0].is_graph_output():
            return False
        new_w = (w.astype(np.float64) * f.reshape(1, -1)).astype(w.dtype)
        set_const_input(self.names, mm, 1, new_w)
        bias = make_const(self.names, mm, shift.astype(w.dtype), f"{w_val.name}_bias")
        gemm = ir.node("Gemm", [a, mm.inputs[1], bias], name=mm.name, outputs=[ir.Value(name=self.names.new(f"{mm.outputs[0].name}_gemm"))])
        graph.insert_after(bn, gemm)
        take_over(self.names, bn.outputs[0], gemm.outputs[0])
        remove_nodes(bn, mm)
        return True
