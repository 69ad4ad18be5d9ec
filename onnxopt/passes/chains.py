"""``fuse-chains``: collapse chains of layout and type ops into one op, or none.

Rewrites (``y`` = the chain's result, ``x`` its start):

- Transpose chain: ``Transpose(Transpose(x, p1), p2) = Transpose(x, p)`` with
  ``p[i] = p1[p2[i]]`` (output axis i of the outer reads axis ``p2[i]`` of the inner, which is
  axis ``p1[p2[i]]`` of x). If ``p`` is the identity the chain disappears. A missing ``perm``
  (reverse the axes) is used only when the rank is known.
- Reshape chain: ``Reshape(Reshape(x, s1), s2) = Reshape(x, s2)`` because a reshape only
  depends on the element count and the target; conditions: ``s2`` has no 0 entry unless
  ``allowzero = 1`` (a 0 copies the dim of the *intermediate*, which x does not share).
  ``Reshape(Flatten(x), s2)`` likewise. ``Flatten(Reshape(x, s1), axis)`` becomes
  ``Reshape(x, [prod(s1[:axis]), -1])`` when those leading entries are known positive.
- Squeeze/Unsqueeze: ``Squeeze(Unsqueeze(x, a), a) = x`` and ``Unsqueeze(Squeeze(x, a), a) = x``
  (Squeeze only removes size-1 axes, which Unsqueeze puts back at the same places; the two
  axis lists are compared as written, so a negative axis refers to the same rank in both);
  ``Unsqueeze(Unsqueeze(x, a), b)`` and ``Squeeze(Squeeze(x, a), b)`` merge into one op when
  all axes are non-negative.
- Cast chain: ``Cast(Cast(x, T1), T2)``: if every value of x's type is exact in T1 (a
  widening such as float->double, int32->int64, int8->float), the inner cast changes no value,
  so the chain equals ``Cast(x, T2)``, and ``x`` itself when ``T2`` is x's type. A narrowing
  intermediate (int32->float->int32, float->float16->float) is never removed.

Each rewrite needs the intermediate to feed only the outer op (except the cancelling cases,
which only drop the outer op) and keeps graph output names.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes._fusion_util import (
    NodeRewritePass,
    attr,
    can_take_over,
    const_array,
    known_rank,
    make_const,
    remove_nodes,
    sole_use,
    take_over,
)
from onnxopt.passes.registry import register_pass

D = ir.DataType
# (source, destination) pairs where every source value is exactly representable.
_EXACT: dict[D, frozenset[D]] = {
    D.BOOL: frozenset({D.INT8, D.UINT8, D.INT16, D.UINT16, D.INT32, D.UINT32, D.INT64, D.UINT64, D.FLOAT16, D.BFLOAT16, D.FLOAT, D.DOUBLE}),
    D.INT8: frozenset({D.INT16, D.INT32, D.INT64, D.FLOAT16, D.BFLOAT16, D.FLOAT, D.DOUBLE}),
    D.UINT8: frozenset({D.INT16, D.UINT16, D.INT32, D.UINT32, D.INT64, D.UINT64, D.FLOAT16, D.BFLOAT16, D.FLOAT, D.DOUBLE}),
    D.INT16: frozenset({D.INT32, D.INT64, D.FLOAT, D.DOUBLE}),
    D.UINT16: frozenset({D.INT32, D.UINT32, D.INT64, D.UINT64, D.FLOAT, D.DOUBLE}),
    D.INT32: frozenset({D.INT64, D.DOUBLE}),
    D.UINT32: frozenset({D.INT64, D.UINT64, D.DOUBLE}),
    D.FLOAT16: frozenset({D.FLOAT, D.DOUBLE}),
    D.BFLOAT16: frozenset({D.FLOAT, D.DOUBLE}),
    D.FLOAT: frozenset({D.DOUBLE}),
}


# Ops whose output has the element type of their first input.
_SAME_TYPE = frozenset(
    {"Squeeze", "Unsqueeze", "Reshape", "Flatten", "Transpose", "Identity", "Slice", "Gather", "Concat", "Expand",
     "Relu", "Neg", "Abs", "Add", "Sub", "Mul", "Div", "Tile", "Pad", "Split", "Max", "Min", "Clip"}
)


def _dtype(value: ir.Value, depth: int = 8) -> D | None:
    """The element type of ``value``: recorded, or followed back through type-preserving ops."""
    if value.dtype is not None:
        return value.dtype
    p = value.producer()
    if p is not None and p.domain in ("", "ai.onnx") and depth > 0:
        if p.op_type == "Cast" and "to" in p.attributes:
            return D(attr(p, "to"))
        if p.op_type in ("Shape", "Size"):
            return D.INT64
        if p.op_type in _SAME_TYPE and p.inputs and p.inputs[0] is not None:
            return _dtype(p.inputs[0], depth - 1)
    const = const_array(value)
    if const is not None:
        try:
            return D.from_numpy(const.dtype)
        except (TypeError, ValueError):
            return None
    return None


def _inner(node: ir.Node, op_types: set[str]) -> ir.Node | None:
    if not node.inputs or node.inputs[0] is None:
        return None
    p = node.inputs[0].producer()
    if p is None or p.domain not in ("", "ai.onnx") or p.op_type not in op_types:
        return None
    if any(a.is_ref() for a in p.attributes.values()):
        return None
    return p


def _axes(node: ir.Node, opset: int) -> list[int] | None:
    """Squeeze/Unsqueeze axes as written (attribute before opset 13, input after)."""
    if opset < 13:
        a = attr(node, "axes")
        return [int(v) for v in a] if a is not None else None
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    arr = const_array(node.inputs[1])
    return [int(v) for v in arr.reshape(-1)] if arr is not None else None


@register_pass(
    "fuse-chains",
    "Collapse Transpose/Reshape/Flatten/Squeeze/Unsqueeze/lossless-Cast chains into one op or none",
    preset_order=360,
)
class FuseChainsPass(NodeRewritePass):
    __doc__ = __doc__
    op_types = frozenset({"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"})

    def rewrite(self, graph, node: ir.Node) -> bool:
        handler = getattr(self, f"_{node.op_type.lower()}")
        return handler(graph, node)

    # The outer node disappears: y is x (or the inner's input).
    def _bypass(self, node: ir.Node, x: ir.Value) -> bool:
        y = node.outputs[0]
        if not can_take_over(y, x):
            return False
        take_over(self.names, y, x)
        remove_nodes(node)
        return True

    def _drop_inner(self, node: ir.Node, inner: ir.Node) -> bool:
        """Make ``node`` read the inner op's input; the inner op goes when nothing else uses it."""
        node.replace_input_with(0, inner.inputs[0])
        if not inner.outputs[0].uses() and not inner.outputs[0].is_graph_output():
            remove_nodes(inner)
        return True

    def _transpose(self, graph, node: ir.Node) -> bool:
        inner = _inner(node, {"Transpose"})
        if inner is None:
            return False
        p2 = attr(node, "perm")
        p1 = attr(inner, "perm")
        if p1 is None or p2 is None:
            rank = known_rank(inner.inputs[0])
            if rank is None:
                return False
            p1 = p1 if p1 is not None else list(range(rank))[::-1]
            p2 = p2 if p2 is not None else list(range(rank))[::-1]
        if len(p1) != len(p2):
            return False
        p = [int(p1[i]) for i in p2]
        if p == list(range(len(p))):
            return self._bypass(node, inner.inputs[0])
        if sole_use(inner.outputs[0]) is not node:
            return False
        node.attributes["perm"] = ir.AttrInt64s("perm", p)
        return self._drop_inner(node, inner)

    def _reshape(self, graph, node: ir.Node) -> bool:
        inner = _inner(node, {"Reshape", "Flatten"})
        if inner is None or sole_use(inner.outputs[0]) is not node or len(node.inputs) < 2:
            return False
        if not int(attr(node, "allowzero", 0)):
            target = const_array(node.inputs[1])
            if target is None or np.any(target == 0):
                return False
        return self._drop_inner(node, inner)

    def _flatten(self, graph, node: ir.Node) -> bool:
        inner = _inner(node, {"Reshape"})
        if inner is None or sole_use(inner.outputs[0]) is not node or len(inner.inputs) < 2:
            return False
        s1 = const_array(inner.inputs[1])
        if s1 is None or s1.ndim != 1:
            return False
        axis = int(attr(node, "axis", 1))
        if axis < 0:
            axis += s1.size
        if not 0 <= axis <= s1.size or np.any(s1[:axis] <= 0):
            return False
        if (self.opset(graph) or 0) < 5:
            return False  # Reshape's shape input exists from opset 5
        lead = int(np.prod(s1[:axis])) if axis else 1
        shape = make_const(self.names, node, np.array([lead, -1], dtype=np.int64), f"{node.outputs[0].name}_shape")
        reshape = ir.node("Reshape", [inner.inputs[0], shape], name=node.name or None, outputs=[ir.Value(name=self.names.new(f"{node.outputs[0].name}_reshape"))])
        graph.insert_before(node, reshape)
        y = node.outputs[0]
        if not can_take_over(y, reshape.outputs[0]):
            return False
        take_over(self.names, y, reshape.outputs[0])
        remove_nodes(node, inner)
        return True

    def _squeeze(self, graph, node: ir.Node) -> bool:
        return self._squeeze_pair(graph, node, "Squeeze", "Unsqueeze")

    def _unsqueeze(self, graph, node: ir.Node) -> bool:
        return self._squeeze_pair(graph, node, "Unsqueeze", "Squeeze")

    def _squeeze_pair(self, graph, node: ir.Node, op: str, inverse: str) -> bool:
        inner = _inner(node, {op, inverse})
        if inner is None:
            return False
        opset = self.opset(graph) or 1
        outer_axes = _axes(node, opset)
        inner_axes = _axes(inner, opset)
        if outer_axes is None or inner_axes is None:
            return False
        if inner.op_type == inverse:
            if sorted(outer_axes) == sorted(inner_axes):
                return self._bypass(node, inner.inputs[0])
            if op == "Squeeze" and min(outer_axes + inner_axes) >= 0 and set(outer_axes) < set(inner_axes):
                # Squeeze(Unsqueeze(x, a), b) with b inside a: only the axes a - b remain new.
                left = _unsqueeze_minus(inner_axes, outer_axes)
                if left is None or sole_use(inner.outputs[0]) is not node:
                    return False
                new = ir.node("Unsqueeze", [inner.inputs[0]], name=node.name or None,
                              outputs=[ir.Value(name=self.names.new(f"{node.outputs[0].name}_unsqueeze"))])
                if opset < 13:
                    new.attributes["axes"] = ir.AttrInt64s("axes", left)
                else:
                    new.resize_inputs(2)
                    new.replace_input_with(1, make_const(self.names, node, np.array(left, dtype=np.int64), f"{node.outputs[0].name}_axes"))
                graph.insert_before(node, new)
                take_over(self.names, node.outputs[0], new.outputs[0])
                remove_nodes(node, inner)
                return True
            return False
        # Same op twice: merge when every axis is non-negative.
        if sole_use(inner.outputs[0]) is not node or min(outer_axes + inner_axes) < 0:
            return False
        merged = _merge_unsqueeze(inner_axes, outer_axes) if op == "Unsqueeze" else _merge_squeeze(inner_axes, outer_axes)
        if merged is None:
            return False
        if opset < 13:
            node.attributes["axes"] = ir.AttrInt64s("axes", merged)
        else:
            node.replace_input_with(1, make_const(self.names, node, np.array(merged, dtype=np.int64), f"{node.outputs[0].name}_axes"))
        return self._drop_inner(node, inner)

    def _cast(self, graph, node: ir.Node) -> bool:
        inner = _inner(node, {"Cast"})
        if inner is None or "to" not in node.attributes or "to" not in inner.attributes:
            return False
        x = inner.inputs[0]
        src = _dtype(x)
        mid = D(attr(inner, "to"))
        dst = D(attr(node, "to"))
        if src is None or mid not in _EXACT.get(src, frozenset()):
            return False
        if dst == src:
            return self._bypass(node, x)
        if sole_use(inner.outputs[0]) is not node:
            return False
        return self._drop_inner(node, inner)


def _merge_unsqueeze(first: list[int], second: list[int]) -> list[int] | None:
    """Axes of one Unsqueeze equal to Unsqueeze(·, first) then Unsqueeze(·, second) (non-negative axes)."""
    if len(set(first)) != len(first) or len(set(second)) != len(second):
        return None
    width = max(first + second) + 1  # input axes past every insertion point are not affected
    dims: list[str] = ["x"] * width
    for axes in (first, second):
        out_rank = len(dims) + len(axes)
        if max(axes) >= out_rank:
            return None
        it = iter(dims)
        dims = ["new" if i in axes else next(it) for i in range(out_rank)]
    return [i for i, d in enumerate(dims) if d == "new"]


def _merge_squeeze(first: list[int], second: list[int]) -> list[int] | None:
    """Axes of one Squeeze equal to Squeeze(·, first) then Squeeze(·, second) (non-negative axes)."""
    if len(set(first)) != len(first) or len(set(second)) != len(second):
        return None
    width = max(first) + max(second) + len(first) + 2
    remaining = [i for i in range(width) if i not in first]
    if max(second) >= len(remaining):
        return None
    return sorted(set(first) | {remaining[j] for j in second})


def _unsqueeze_minus(added: list[int], removed: list[int]) -> list[int] | None:
    """Axes still new after Unsqueeze(·, added) then Squeeze(·, removed), removed within added."""
    if len(set(added)) != len(added):
        return None
    width = max(added) + 1
    dims = ["x"] * width
    it = iter(dims)
    out_rank = width + len(added)
    dims = ["new" if i in added else next(it) for i in range(out_rank)]
    kept = [d for i, d in enumerate(dims) if i not in removed]
    return [i for i, d in enumerate(kept) if d == "new"]
