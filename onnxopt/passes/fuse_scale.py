"""``fuse-scale``: constant Mul/Div folded into the weights of Conv, ConvTranspose, Gemm and MatMul.

Rewrites (``s`` a constant, ``P`` the op, ``W`` its constant weight):

1. Scale after the op, per output channel or scalar::

       Mul(P(X, W, b), s)  ->  P(X, W * s[m], b * s[m])          (Div: s -> 1/s)

   Conv/ConvTranspose/Gemm are linear in (W, b) with output channel ``m`` along one weight
   axis, so ``s[m] * P(X, W, b) = P(X, s[m] W, s[m] b)``. ``s`` must be a scalar or vary only
   along the channel axis (axis 1; for MatMul the last axis) without raising the output
   rank. MatMul ``X @ W`` with a constant 2-D ``W [K, N]``: ``(X @ W) * s[n] = X @ (W * s[n])``.

2. Scale before the op, per input channel or scalar::

       P(Mul(X, s), W)  ->  P(X, W')

   Conv: ``W'[m, j, ...] = W[m, j, ...] * s[g(m)*C/G + j]``; exact including padding, since
   the pad value 0 is unchanged by scaling. ConvTranspose: ``W'[c, ...] = W[c, ...] * s[c]``.
   Gemm: scalar ``s`` goes into ``alpha``; with ``transA = 0`` a scale along A's last axis
   (K) scales row ``k`` of ``op(B)``. MatMul with constant ``W [K, N]``: ``(X * s[k]) @ W =
   X @ (s[k] W)``.

3. Chains of constant scales::

       Mul(Mul(X, a), b) -> Mul(X, a*b)     Div(Mul(X, a), b) -> Mul(X, a/b)
       Mul(Div(X, a), b) -> Mul(X, b/a)     Div(Div(X, a), b) -> Div(X, a*b)

   Broadcasting is associative, so ``X * (a*b)`` has the shape ``(X * a) * b`` had.

A Mul that completes a decomposed GELU (``x * 0.5 * (1 + erf(x / sqrt 2))``) is never folded
or merged, even where the Gelu op does not exist: ONNX Runtime fuses that pattern itself when
its graph optimizations are on, and folding the 0.5 away hides it (measured slower on MiniLM).

Conditions: float tensors only (integer Div truncates); the intermediate value has no other
consumer and is not a graph output; a weight is only rewritten when this node is its only
user. Results differ from the original by float rounding only (constants are combined in
float64 and rounded once).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes._fusion_util import (
    NodeRewritePass,
    attr,
    broadcast_keeps_shape,
    can_take_over,
    channel_vector,
    const_array,
    is_float_array,
    known_rank,
    make_const,
    owned,
    remove_nodes,
    set_const_input,
    take_over,
)
from onnxopt.passes.fuse_batchnorm import fold_affine_into
from onnxopt.passes.fuse_bias import per_channel, producer_of, split_const_operand
from onnxopt.passes.fuse_transformer import is_gelu_product
from onnxopt.passes.registry import register_pass

_AFTER = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def _factor(node: ir.Node, c: np.ndarray) -> np.ndarray | None:
    """The multiplier a Mul/Div by constant ``c`` applies (float64), or None for 1/0 or a
    non-finite ``c``: ``(X @ W) * inf`` and ``X @ (W * inf)`` differ wherever a product is 0
    (inf vs NaN), so an inf/NaN scale is not moved (the fuzzer's case, seed 2718)."""
    c64 = c.astype(np.float64)
    if not np.all(np.isfinite(c64)):
        return None
    if node.op_type == "Div":
        if np.any(c64 == 0):
            return None
        return 1.0 / c64
    return c64


@register_pass(
    "fuse-scale",
    "Fold constant Mul/Div (scalar or per-channel) into Conv/ConvTranspose/Gemm/MatMul weights; merge constant Mul/Div chains",
    preset_order=310,
)
class FuseScalePass(NodeRewritePass):
    __doc__ = __doc__
    op_types = frozenset({"Mul", "Div", "Conv", "ConvTranspose", "Gemm", "MatMul"})

    def rewrite(self, graph, node: ir.Node) -> bool:
        if node.op_type in ("Mul", "Div"):
            return self._after(node) or self._chain(graph, node)
        return self._before(node)

    # -- 1. scale after the op ------------------------------------------------------------
    def _after(self, node: ir.Node) -> bool:
        split = split_const_operand(node, commutative=node.op_type == "Mul")
        if split is None:
            return False
        x, c, _ = split
        if not is_float_array(c):
            return False
        op = producer_of(x, _AFTER, node)
        if op is None:
            return False
        factor = _factor(node, c)
        if factor is None:
            return False
        y = node.outputs[0]
        if not can_take_over(y, x):
            return False
        if op.op_type == "MatMul":
            if not self._scale_matmul_columns(op, factor):
                return False
        else:
            f = per_channel(factor, op)
            if f is None or not fold_affine_into(self.names, op, f, None):
                return False
        take_over(self.names, y, x)
        remove_nodes(node)
        return True

    def _scale_matmul_columns(self, mm: ir.Node, factor: np.ndarray) -> bool:
        w_val = mm.inputs[1]
        w = const_array(w_val)
        if not is_float_array(w) or w.ndim != 2 or not owned(w_val):
            return False
        n = w.shape[1]
        rank = known_rank(mm.outputs[0])
        if rank is None:
            rank = 1  # unknown: only a scalar or an [N] vector keeps the output shape for sure
        if broadcast_keeps_shape(factor.shape, rank, rank - 1, n) is None:
            return False
        f = channel_vector(factor, rank, rank - 1, n)
        set_const_input(self.names, mm, 1, (w.astype(np.float64) * f.reshape(1, -1)).astype(w.dtype))
        return True

    # -- 2. scale before the op -----------------------------------------------------------
    def _before(self, op: ir.Node) -> bool:
        if len(op.inputs) < 2 or op.inputs[0] is None:
            return False
        x = op.inputs[0]
        mul = producer_of(x, frozenset({"Mul", "Div"}), op)
        if mul is None or is_gelu_product(mul):
            return False
        split = split_const_operand(mul, commutative=mul.op_type == "Mul")
        if split is None:
            return False
        z, c, _ = split
        if not is_float_array(c):
            return False
        factor = _factor(mul, c)
        if factor is None:
            return False
        w_val = op.inputs[1]
        w = const_array(w_val)
        if op.op_type == "Gemm" and factor.size == 1 and c.ndim <= 2:
            # A scalar goes into alpha, so the weight may be shared. Gemm's A is 2-D, and a
            # constant of rank <= 2 with size 1 cannot change a 2-D shape.
            op.attributes["alpha"] = ir.AttrFloat32("alpha", float(attr(op, "alpha", 1.0)) * float(factor.reshape(-1)[0]))
            op.replace_input_with(0, z)
            remove_nodes(mul)
            return True
        if not is_float_array(w) or not owned(w_val):
            return False
        new_w = self._scaled_weight(op, w, factor, z)
        if new_w is None:
            return False
        set_const_input(self.names, op, 1, new_w.astype(w.dtype))
        op.replace_input_with(0, z)
        remove_nodes(mul)
        return True

    def _scaled_weight(self, op: ir.Node, w: np.ndarray, factor: np.ndarray, z: ir.Value) -> np.ndarray | None:
        w64 = w.astype(np.float64)
        if op.op_type == "Conv":
            if w.ndim < 3:
                return None
            group = int(attr(op, "group", 1))
            c_in = w.shape[1] * group
            if broadcast_keeps_shape(factor.shape, w.ndim, 1, c_in) is None or not _rank_is(z, w.ndim, factor):
                return None
            s = channel_vector(factor, w.ndim, 1, c_in).reshape(group, 1, w.shape[1])
            m = w.shape[0]
            wg = w64.reshape((group, m // group, w.shape[1], -1)) * s[..., None]
            return wg.reshape(w.shape)
        if op.op_type == "ConvTranspose":
            if w.ndim < 3:
                return None
            c_in = w.shape[0]
            if broadcast_keeps_shape(factor.shape, w.ndim, 1, c_in) is None or not _rank_is(z, w.ndim, factor):
                return None
            return w64 * channel_vector(factor, w.ndim, 1, c_in).reshape((-1,) + (1,) * (w.ndim - 1))
        if op.op_type in ("Gemm", "MatMul"):
            if w.ndim != 2:
                return None
            if op.op_type == "Gemm" and int(attr(op, "transA", 0)):
                return None
            trans_b = op.op_type == "Gemm" and int(attr(op, "transB", 0))
            k = w.shape[1] if trans_b else w.shape[0]
            rank = known_rank(z)
            if op.op_type == "Gemm":
                rank = 2
            if rank is None:
                rank = 1  # unknown: only a scalar or a [K] vector surely keeps the input shape
            if rank < 1 or broadcast_keeps_shape(factor.shape, rank, rank - 1, k) is None:
                return None
            s = channel_vector(factor, rank, rank - 1, k)
            return w64 * (s.reshape(1, -1) if trans_b else s.reshape(-1, 1))
        return None

    # -- 3. chains --------------------------------------------------------------------------
    def _chain(self, graph, node: ir.Node) -> bool:
        split = split_const_operand(node, commutative=node.op_type == "Mul")
        if split is None:
            return False
        x, b, _ = split
        inner = producer_of(x, frozenset({"Mul", "Div"}), node)
        if inner is None or not is_float_array(b) or is_gelu_product(inner) or is_gelu_product(node):
            return False
        inner_split = split_const_operand(inner, commutative=inner.op_type == "Mul")
        if inner_split is None:
            return False
        z, a, _ = inner_split
        if not is_float_array(a) or a.dtype != b.dtype:
            return False
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        if node.op_type == "Div" and inner.op_type == "Div":
            op_type, combined = "Div", a64 * b64
        elif node.op_type == "Div":
            if np.any(b64 == 0):
                return False
            op_type, combined = "Mul", a64 / b64
        elif inner.op_type == "Div":
            if np.any(a64 == 0):
                return False
            op_type, combined = "Mul", b64 / a64
        else:
            op_type, combined = "Mul", a64 * b64
        y = node.outputs[0]
        const = make_const(self.names, node, np.asarray(combined, dtype=a.dtype), f"{y.name}_scale")
        new = ir.node(op_type, [z, const], name=node.name or None, outputs=[ir.Value(name=self.names.new(f"{y.name}_merged"))])
        if not can_take_over(y, new.outputs[0]):
            return False
        graph.insert_before(node, new)
        take_over(self.names, y, new.outputs[0])
        remove_nodes(node, inner)
        return True


def _rank_is(z: ir.Value, rank: int, factor: np.ndarray) -> bool:
    """Whether ``z * factor`` surely has ``z``'s shape when the consumer needs rank ``rank``.

    With ``z``'s rank unknown, a factor of rank <= 1 cannot raise the rank, and the consumer
    then proves ``z`` already has the rank it needs.
    """
    r = known_rank(z)
    return r == rank if r is not None else factor.ndim <= 1
