"""``drop-key-bias``: remove the key projection's bias in softmax attention.

Rewrite::

    K = Reshape(Add(MatMul(X, Wk), bk), [0, 0, heads, d])     (heads or d may be -1; or [0, -1, h, d], [-1, 0, h, d])
    S = MatMul(Q, Transpose(K, perm=[0, 2, 3, 1]))            (any Transposes composing to it,
                                                               scalar Mul/Div anywhere between)
    P = Softmax(S  [* or / scalar constants, + any mask tensors], axis=-1)
      ->  the same with K = Reshape(MatMul(X, Wk), ...)

Why it is the same: the bias adds ``q_i . bk_h`` to every score of query ``i`` in head
``h``, the same amount for every key ``j``; scalar factors scale it and added masks do not
touch it, so it reaches the softmax as a per-row constant, and softmax over the key axis is
invariant to one (``exp(s + c) / sum exp(s + c) = exp(s) / sum exp(s)``). Exact in real
arithmetic; in float the scores round differently by ``|q . bk|``'s share of their ulp.
A fully masked row (-inf everywhere) stays all NaN either way.

Conditions: the axes are tracked from ``[batch, tokens, heads, d]``: after the Transposes the
tokens axis must be last and ``d`` second to last (so the MatMul contracts ``d`` and its
last axis is the key axis), and the Softmax must run over that last axis. Between the
scores and the Softmax only Mul by a scalar constant, Div by one (as the divisor) and Add
of any other tensor. ``bk`` a constant with one entry per channel ([N] = heads * d), Wk a
constant 2-D weight; every value from the bias Add to the Softmax input has that one reader
(they all change by the removed constant), none is a graph output.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxopt.passes._fusion_util import NodeRewritePass, attr, const_array, producer_op, sole_use
from onnxopt.passes.fold_residual_bias import biased_matmul
from onnxopt.passes.registry import register_pass

_STD = ("", "ai.onnx")


def _scalar_const(value: ir.Value | None) -> bool:
    arr = const_array(value)
    return arr is not None and arr.size == 1 and arr.dtype.kind == "f"


def _private(value: ir.Value, reader: ir.Node) -> bool:
    return sole_use(value) is reader


def _through_scalars(value: ir.Value, reader: ir.Node, allow_add: bool):
    """Walk up from ``value`` (read by ``reader``) through scalar Mul/Div (and mask Adds when
    ``allow_add``); returns (the first other producer, the value it makes) or None."""
    while True:
        if not _private(value, reader):
            return None
        node = value.producer()
        if node is None or node.domain not in _STD:
            return None
        if node.op_type == "Mul" and len(node.inputs) == 2:
            if _scalar_const(node.inputs[1]):
                reader, value = node, node.inputs[0]
                continue
            if _scalar_const(node.inputs[0]):
                reader, value = node, node.inputs[1]
                continue
            return None
        if node.op_type == "Div" and len(node.inputs) == 2 and _scalar_const(node.inputs[1]):
            reader, value = node, node.inputs[0]
            continue
        if node.op_type == "Add" and allow_add and len(node.inputs) == 2:
            # The score side is the one that leads to the MatMul through scalars.
            sides = [i for i in (0, 1) if producer_op(node.inputs[i], "MatMul", "Mul", "Div") is not None]
            if len(sides) != 1:
                return None
            reader, value = node, node.inputs[sides[0]]
            continue
        return node, value


@register_pass(
    "drop-key-bias",
    "Key projection bias in softmax attention: a per-query constant the softmax ignores -> removed",
    preset_order=312,
)
class DropKeyBiasPass(NodeRewritePass):
    __doc__ = __doc__
    op_types = frozenset({"Softmax"})

    def rewrite(self, graph, softmax: ir.Node) -> bool:
        opset = self.opset(graph) or 1
        if opset < 13:
            return False  # before 13 Softmax flattens the trailing axes: keep it simple
        up = _through_scalars(softmax.inputs[0], softmax, allow_add=True)
        if up is None or up[0].op_type != "MatMul":
            return False
        scores = up[0]
        key = _through_scalars(scores.inputs[1], scores, allow_add=False)
        if key is None:
            return False
        # Transposes back to the Reshape (``_through_scalars`` checked the first one's output
        # has one reader), composing their perms over [batch, tokens, heads, d].
        node, _ = key
        perms = []
        while node.op_type == "Transpose":
            perm = attr(node, "perm")
            value = node.inputs[0]
            if perm is None or value is None or not _private(value, node):
                return False
            perms.append(list(perm))
            node = value.producer()
            if node is None or node.domain not in _STD:
                return False
        if not perms or node.op_type != "Reshape":
            return False
        reshape = node
        labels = [0, 1, 2, 3]  # axes of the Reshape output: batch, tokens, heads, d
        for perm in reversed(perms):
            if sorted(perm) != list(range(len(labels))):
                return False
            labels = [labels[p] for p in perm]
        if labels[-1] != 1 or labels[-2] != 3:
            return False
        axis = attr(softmax, "axis", -1)
        if axis not in (-1, len(labels) - 1):
            return False
        target = const_array(reshape.inputs[1])
        if target is None or target.ndim != 1 or target.size != 4:
            return False
        t = [int(v) for v in target]
        if (t[0], t[1]) not in ((0, 0), (0, -1), (-1, 0)) or t.count(-1) > 1 or min(t[2], t[3]) == 0 or min(t[2], t[3]) < -1:
            return False
        if attr(reshape, "allowzero", 0) != 0:
            return False
        bias_add = producer_op(reshape.inputs[0], "Add")
        if bias_add is None or not _private(reshape.inputs[0], reshape) or len(bias_add.inputs) != 2:
            return False
        found = biased_matmul(bias_add)
        if found is None:
            return False
        proj, _, bk, _ = found
        # The tokens axis must come through the Reshape as axis 1: copied ([0, 0, ...]: the
        # bias varies along the input's last axis only, never axis 1), or inferred by -1 from
        # a rank-3 [batch, tokens, heads * d] input.
        x_shape = proj.inputs[0].shape
        if (t[0], t[1]) != (0, 0) and not (x_shape is not None and len(x_shape) == 3
                                           and bk.shape[0] == t[2] * t[3]):
            return False
        reshape.replace_input_with(0, proj.outputs[0])
        graph.remove(bias_add, safe=True)
        return True
