"""Bias fusions: ``fuse-conv-bias`` and ``fuse-matmul-add``.

``fuse-conv-bias`` (1) and ``fuse-conv-input-bias`` (2) land a constant addend in a Conv-like op's bias:

1. After the op::

       Add(P(X, W, b), c)   ->  P(X, W, b + c)        (also Add(c, P(...)))
       Sub(P(X, W, b), c)   ->  P(X, W, b - c)

   for P in Conv, ConvTranspose, Gemm, when ``c`` is a constant that is the same for every
   element of an output channel: a scalar, or a tensor whose only non-1 dimension is the
   channel axis (``[1, C, 1, 1]``, ``[C, 1, 1]``, ``[1, C]`` for Gemm) and whose rank does not
   exceed the output's (a larger rank would broadcast the output to a new shape). Exact, since
   P's bias is added per output channel.

2. Before a Conv without padding::

       Conv(Add(X, c), W, b)  ->  Conv(X, W, b')   with  b'[m] = b[m] + sum_{j,k} W[m, j, k] * c[g(m)*C/G + j]

   for ``c`` a scalar or per-input-channel constant. Convolution is linear, so
   ``Conv(X + c) = Conv(X) + Conv(c)`` and a constant input gives a constant per output
   channel: the weighted sum above. This holds only when no output sees padding (the pad
   value 0 is not shifted by ``c``), so it requires all ``pads`` 0 and ``auto_pad`` NOTSET or
   VALID. Not done for ConvTranspose (its border outputs sum fewer taps).

``fuse-matmul-add``::

    Add(MatMul(A, B), c)  ->  Gemm(A, B, c)

when A and B are known to be 2-D (N-D MatMul is never turned into Gemm: Gemm is 2-D only)
and ``c`` is a constant that broadcasts to the ``[M, N]`` output without changing its shape
(Gemm's C is broadcast one way only): a scalar, ``[N]``, ``[1, N]`` or ``[1, 1]``. Exact:
Gemm computes ``1.0 * A @ B + 1.0 * c``.

All rewrites require the intermediate value to have no other consumer and not be a graph
output; a removed node's output name is kept when it is a graph output. Float tensors only.
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
    has_ref_attributes,
    is_float_array,
    known_rank,
    owned,
    remove_nodes,
    set_const_input,
    sole_use,
    take_over,
)
from onnxopt.passes.fuse_batchnorm import fold_affine_into, output_channels
from onnxopt.passes.registry import register_pass

_CONV_LIKE = frozenset({"Conv", "ConvTranspose", "Gemm"})


def split_const_operand(node: ir.Node, commutative: bool = True) -> tuple[ir.Value, np.ndarray, int] | None:
    """For a binary node, (variable input, constant array, index of the constant) or None."""
    if len(node.inputs) != 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    c1 = const_array(node.inputs[1])
    if c1 is not None:
        return node.inputs[0], c1, 1
    if commutative:
        c0 = const_array(node.inputs[0])
        if c0 is not None:
            return node.inputs[1], c0, 0
    return None


def producer_of(value: ir.Value, op_types: frozenset[str], user: ir.Node) -> ir.Node | None:
    """The producer of ``value`` if it has one of ``op_types`` and ``user`` is the value's only consumer."""
    p = value.producer()
    if p is None or p.domain not in ("", "ai.onnx") or p.op_type not in op_types or has_ref_attributes(p):
        return None
    if sole_use(value) is not user:
        return None
    return p


def per_channel(const: np.ndarray, op: ir.Node) -> np.ndarray | None:
    """``const`` as a vector over ``op``'s output channels, if it broadcasts that way without reshaping the output."""
    w = const_array(op.inputs[1]) if len(op.inputs) > 1 else None
    if w is None:
        return None
    channels = output_channels(op, w)
    if channels is None:
        return None
    rank = 2 if op.op_type == "Gemm" else w.ndim
    if broadcast_keeps_shape(const.shape, rank, 1, channels) is None:
        return None
    return channel_vector(const, rank, 1, channels)


@register_pass(
    "fuse-conv-bias",
    "Fold a per-channel constant Add/Sub after Conv/ConvTranspose/Gemm into the bias",
    preset_order=315,
)
class FuseConvBiasPass(NodeRewritePass):
    __doc__ = __doc__
    op_types = frozenset({"Add", "Sub"})

    def rewrite(self, graph, node: ir.Node) -> bool:
        split = split_const_operand(node, commutative=node.op_type == "Add")
        if split is None:
            return False
        x, c, _ = split
        if not is_float_array(c):
            return False
        op = producer_of(x, _CONV_LIKE, node)
        if op is None:
            return False
        shift = per_channel(c, op)
        if shift is None:
            return False
        if node.op_type == "Sub":
            shift = -shift
        y = node.outputs[0]
        if not can_take_over(y, x) or not fold_affine_into(self.names, op, None, shift):
            return False
        take_over(self.names, y, x)
        remove_nodes(node)
        return True



@register_pass(
    "fuse-conv-input-bias",
    "Fold a per-channel constant Add before an unpadded Conv into its bias",
    preset_order=305,
)
class FuseConvInputBiasPass(NodeRewritePass):
    """Rewrite 2 of the bias fusions (see the module docstring): ``Conv(X + c) -> Conv(X)`` with ``b' = b + W * c``.

    It runs before fuse-scale, so a constant Mul left in front of the Conv folds into the
    weights in the same pipeline round.
    """

    op_types = frozenset({"Conv"})

    def rewrite(self, graph, conv: ir.Node) -> bool:
        return self._input_bias(conv)

    def _input_bias(self, conv: ir.Node) -> bool:
        if len(conv.inputs) < 2 or conv.inputs[0] is None:
            return False
        if attr(conv, "auto_pad", "NOTSET") not in ("NOTSET", "VALID") or any(int(p) for p in attr(conv, "pads", ()) or ()):
            return False
        add = conv.inputs[0].producer()
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or sole_use(conv.inputs[0]) is not conv:
            return False
        split = split_const_operand(add)
        w = const_array(conv.inputs[1])
        if split is None or not is_float_array(w) or w.ndim < 3:
            return False
        x, c, _ = split
        group = int(attr(conv, "group", 1))
        c_in = w.shape[1] * group
        if not is_float_array(c) or broadcast_keeps_shape(c.shape, w.ndim, 1, c_in) is None:
            return False
        b = conv.inputs[2] if len(conv.inputs) > 2 else None
        b_arr = const_array(b) if b is not None else None
        if b is not None and (not is_float_array(b_arr) or not owned(b)):
            return False
        cvec = channel_vector(c, w.ndim, 1, c_in)
        m = w.shape[0]
        wg = w.astype(np.float64).reshape((group, m // group, w.shape[1], -1))
        delta = np.einsum("gmjk,gj->gm", wg, cvec.reshape(group, w.shape[1])).reshape(m)
        new_b = (b_arr.astype(np.float64).reshape(-1) if b_arr is not None else 0.0) + delta
        set_const_input(self.names, conv, 2, new_b.astype(w.dtype), name_hint=f"{conv.inputs[1].name}_bias")
        conv.replace_input_with(0, x)
        remove_nodes(add)
        return True


@register_pass(
    "fuse-matmul-add",
    "MatMul + constant Add -> Gemm when both MatMul operands are 2-D (N-D MatMul is left alone)",
    preset_order=340,
)
class FuseMatMulAddPass(NodeRewritePass):
    __doc__ = __doc__
    op_types = frozenset({"Add"})

    def rewrite(self, graph, add: ir.Node) -> bool:
        if (self.opset(graph) or 0) < 7:
            return False
        split = split_const_operand(add)
        if split is None:
            return False
        x, c, _ = split
        mm = producer_of(x, frozenset({"MatMul"}), add)
        if mm is None or not is_float_array(c):
            return False
        a, b = mm.inputs
        if known_rank(a) != 2 or known_rank(b) != 2:
            return False
        n = _last_dim(b)
        if n is None or c.ndim > 2 or (c.ndim >= 1 and c.shape[-1] not in (1, n)) or (c.ndim == 2 and c.shape[0] != 1):
            return False
        if c.ndim >= 1 and c.shape[-1] == 1 and n != 1 and c.size != 1:
            return False
        y = add.outputs[0]
        if not can_take_over(y, x):
            return False
        c_value = add.inputs[1] if const_array(add.inputs[1]) is not None else add.inputs[0]
        gemm = ir.node("Gemm", [a, b, c_value], name=mm.name or None, outputs=[ir.Value(name=self.names.new(f"{y.name}_gemm"))])
        graph.insert_before(add, gemm)
        take_over(self.names, y, gemm.outputs[0])
        remove_nodes(add, mm)
        return True


def _last_dim(value: ir.Value) -> int | None:
    arr = const_array(value)
    if arr is not None:
        return arr.shape[-1]
    if value.shape is not None and len(value.shape) and isinstance(value.shape[-1], int):
        return value.shape[-1]
    return None
