"""Remove nodes that provably return their (first) input unchanged.

Rewrite: ``y = Op(x, ...)`` -> uses of ``y`` read ``x``; the node is removed. Each
case below needs its condition *proven* from constant inputs, dtypes and shapes
(shapes from ONNX shape inference run from the graph inputs, see
:mod:`onnxopt.passes._shapes`); a symbolic dimension is never assumed to have a value.

- ``Dropout``: inference semantics (no ``training_mode`` input, or a constant false
  one; ``is_test=1`` before opset 7) and the mask output unused.
- ``Cast``/``CastLike`` to the dtype ``x`` already has.
- ``Reshape``/``Expand`` to the shape ``x`` already has: Reshape with a constant target
  of the same rank whose entries are each ``x``'s static size, a 0 (copy, allowzero=0)
  or a single -1; Expand whose constant target has rank <= ``x``'s and whose entries
  (right-aligned) are 1 or ``x``'s static size (broadcasting then changes nothing).
- ``Transpose`` with the identity permutation (or no perm on a rank <= 1 tensor).
- ``Pad`` with all-zero pads (constant input or attribute).
- ``Slice`` that keeps everything: step 1, start 0 (or <= -size), end >= size (or >= 2**31-1).
- ``Concat``/``Sum``/``Max``/``Min``/``Mean`` of a single input; ``Split`` into one output.
- ``Squeeze`` without axes of a tensor whose static shape has no 1. (An empty axes list
  is not a no-op to rely on: Unsqueeze rejects it and Squeeze reads it as "all 1-dims".)
- ``Mul``/``Div`` by 1, ``Add``/``Sub`` of 0, ``And`` with true, ``Or`` with false (``x - 0``,
  ``x / 1``, either side for the commutative ones): the constant is all neutral, of x's dtype, and every
  one of its dims is 1 or x's static size at that (right-aligned) position, so
  broadcasting does not change the output shape. (``-0.0 + 0.0`` is ``+0.0``: equal
  values, which is what the safety net and every consumer compare.)

Graph outputs keep their names: when ``y`` is an output, ``x`` takes ``y``'s name if
``x`` is produced by a node of the same graph and is not itself an output; otherwise
the node stays. Subgraphs (If/Loop/Scan bodies) and functions are processed too.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes._shapes import infer_shapes, shape_of
from onnxopt.passes.registry import register_pass

_STANDARD_DOMAINS = ("", "ai.onnx")
_INT32_MAX = 2**31 - 1


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    try:
        return value.const_value.numpy()
    except Exception:
        return None


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    if attr is None or attr.is_ref():
        return default
    return attr.value


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


class _NoopFinder:
    def __init__(self, model: ir.Model, inferred):
        self.inferred = inferred
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))

    def shape(self, value):
        return shape_of(value, self.inferred)

    def noop_source(self, node: ir.Node) -> ir.Value | None:
        """The input that output 0 provably equals (any other output unused), else None."""
        op = node.op_type
        x = _input(node, 0)
        if x is None or not node.outputs:
            return None
        y = node.outputs[0]
        name = _HANDLERS.get(op)
        if name is None:
            return None
        handler = getattr(self, name)
        if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
            return None
        result = handler(node, x, y)
        if isinstance(result, ir.Value):
            return result
        return x if result else None

    # -- cases -----------------------------------------------------------------

    def _dropout(self, node, x, y):
        if self.opset < 7 and _attr(node, "is_test", 0) != 1:
            return False
        training = _input(node, 2)
        if training is not None:
            value = _const(training)
            return value is not None and value.size == 1 and not bool(value.reshape(-1)[0])
        return True

    def _cast(self, node, x, y):
        to = _attr(node, "to")
        return x.dtype is not None and to is not None and int(x.dtype) == int(to) and "saturate" not in node.attributes

    def _castlike(self, node, x, y):
        like = _input(node, 1)
        return like is not None and x.dtype is not None and x.dtype == like.dtype

    def _reshape(self, node, x, y):
        target = _const(_input(node, 1))
        shape = self.shape(x)
        if target is None or shape is None or target.ndim != 1 or len(target) != len(shape):
            return False
        allowzero = _attr(node, "allowzero", 0)
        minus_one = 0
        for t, d in zip(target.tolist(), shape):
            if t == -1:
                minus_one += 1
            elif t == 0 and allowzero == 0:
                continue
            elif not (isinstance(d, int) and d == t):
                return False
        return minus_one <= 1

    def _expand(self, node, x, y):
        target = _const(_input(node, 1))
        shape = self.shape(x)
        if target is None or shape is None or target.ndim != 1 or len(target) > len(shape):
            return False
        for t, d in zip(target.tolist()[::-1], list(shape)[::-1]):
            if t != 1 and not (isinstance(d, int) and d == t):
                return False
        return True

    def _transpose(self, node, x, y):
        perm = _attr(node, "perm")
        if perm is None:
            shape = self.shape(x)
            return shape is not None and len(shape) <= 1
        return list(perm) == list(range(len(perm)))

    def _pad(self, node, x, y):
        pads = _const(_input(node, 1)) if len(node.inputs) > 1 else None
        if pads is None:
            pads_attr = _attr(node, "pads")
            if pads_attr is None:
                return False
            pads = np.array(pads_attr)
        return pads.size > 0 and not np.any(pads)

    def _slice(self, node, x, y):
        shape = self.shape(x)
        starts, ends = _const(_input(node, 1)), _const(_input(node, 2))
        axes = _const(_input(node, 3)) if _input(node, 3) is not None else None
        steps = _const(_input(node, 4)) if _input(node, 4) is not None else None
        if self.opset < 10:
            starts, ends, axes = _attr(node, "starts"), _attr(node, "ends"), _attr(node, "axes")
            starts = np.array(starts) if starts is not None else None
            ends = np.array(ends) if ends is not None else None
            axes = np.array(axes) if axes is not None else None
        if shape is None or starts is None or ends is None:
            return False
        if (_input(node, 3) is not None and axes is None) or (_input(node, 4) is not None and steps is None):
            return False
        starts, ends = starts.reshape(-1).tolist(), ends.reshape(-1).tolist()
        axes = axes.reshape(-1).tolist() if axes is not None else list(range(len(starts)))
        steps = steps.reshape(-1).tolist() if steps is not None else [1] * len(starts)
        rank = len(shape)
        for s, e, a, st in zip(starts, ends, axes, steps):
            if st != 1:
                return False
            a = a + rank if a < 0 else a
            if not 0 <= a < rank:
                return False
            d = shape[a]
            static = isinstance(d, int) and d >= 0
            if not (s == 0 or (static and s <= -d)):
                return False
            if not (e >= _INT32_MAX or (static and e >= d)):
                return False
        return True

    def _single_input(self, node, x, y):
        return len([v for v in node.inputs]) == 1

    def _split(self, node, x, y):
        return len(node.outputs) == 1

    def _squeeze(self, node, x, y):
        axes_value = _input(node, 1)
        axes = _attr(node, "axes")
        if axes_value is not None:
            return False
        if axes is not None:
            return False
        shape = self.shape(x)
        return shape is not None and all(isinstance(d, int) and d >= 0 and d != 1 for d in shape)

    def _arith(self, node, x, y, neutral: int, commutative: bool):
        a, b = node.inputs[0], _input(node, 1)
        if b is None:
            return False
        candidates = [(a, b)]
        if commutative:
            candidates.append((b, a))
        for data, const_value in candidates:
            c = _const(const_value)
            if c is None or data is None or data.dtype is None or const_value.dtype != data.dtype:
                continue
            if c.size == 0 or not np.all(c == neutral):
                continue
            if c.ndim == 0:
                return data  # a scalar broadcasts to any shape without changing it
            shape = self.shape(data)
            if shape is None or c.ndim > len(shape):
                continue
            if all(k == 1 or (isinstance(d, int) and d == k) for k, d in zip(c.shape[::-1], list(shape)[::-1])):
                return data  # the input that survives
        return False

    def _mul(self, node, x, y):
        return self._arith(node, x, y, 1, True)

    def _div(self, node, x, y):
        return self._arith(node, x, y, 1, False)

    def _add(self, node, x, y):
        return self._arith(node, x, y, 0, True)

    def _sub(self, node, x, y):
        return self._arith(node, x, y, 0, False)

    def _and(self, node, x, y):
        return self._arith(node, x, y, True, True)

    def _or(self, node, x, y):
        return self._arith(node, x, y, False, True)


_HANDLERS = {
    "Dropout": "_dropout",
    "Cast": "_cast",
    "CastLike": "_castlike",
    "Reshape": "_reshape",
    "Expand": "_expand",
    "Transpose": "_transpose",
    "Pad": "_pad",
    "Slice": "_slice",
    "Concat": "_single_input",
    "Sum": "_single_input",
    "Max": "_single_input",
    "Min": "_single_input",
    "Mean": "_single_input",
    "Split": "_split",
    "Squeeze": "_squeeze",
    "Mul": "_mul",
    "Div": "_div",
    "Add": "_add",
    "Sub": "_sub",
    "And": "_and",
    "Or": "_or",
}


def _bypass(graph, node: ir.Node, source: ir.Value) -> bool:
    """Make uses of node.outputs[0] read ``source`` and remove the node, keeping output names."""
    out = node.outputs[0]
    owner = graph.graph if isinstance(graph, ir.Function) else graph
    if out.is_graph_output():
        producer = source.producer()
        if producer is None or producer.graph is not owner or source.is_graph_output():
            return False
        # A graph output's name is part of the model's interface: x takes it over.
        name = out.name
        out.name = f"{name}__noop"
        source.name = name
        if source.shape is None:
            source.shape = out.shape
    if source.type is None:
        source.type = out.type
    out.replace_all_uses_with(source, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    return True


def remove_noops(model: ir.Model) -> int:
    """Remove no-op nodes in place (all graphs and functions); returns how many."""
    finder = _NoopFinder(model, infer_shapes(model))
    count = 0
    graphs = [model.graph, *model.graph.subgraphs(), *model.functions.values()]
    for graph in graphs:
        owner = graph.graph if isinstance(graph, ir.Function) else graph
        for node in list(graph):
            if node.graph is not owner or node.domain not in _STANDARD_DOMAINS:
                continue
            source = finder.noop_source(node)
            if source is not None and _bypass(graph, node, source):
                count += 1
    return count


@register_pass(
    "remove-noops",
    "Remove nodes proven to return their input unchanged (Dropout, same-type Cast, same-shape Reshape, x*1, ...)",
    preset_order=200,
)
class RemoveNoops(ir.passes.InPlacePass):
    """See the module docstring for the rewrites and their conditions."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.rewrites = remove_noops(model)
        return ir.passes.PassResult(model, modified=self.rewrites > 0)
