"""Transformer fusions into standard ONNX ops: ``fuse-layernorm`` and ``fuse-gelu``.

``fuse-layernorm`` (opset >= 17, where LayerNormalization exists)::

    mean = ReduceMean(x, axes=[-1])          d = Sub(x, mean)
    var  = ReduceMean(Pow(d, 2) | Mul(d, d), axes=[-1])
    n    = Div(d, Sqrt(Add(var, eps)))       (or Mul(d, Reciprocal(Sqrt(...))))
    y    = Add(Mul(n, gamma), beta)          (Mul and Add optional, either operand order)
      ->  y = LayerNormalization(x, gamma, beta, axis=-1, epsilon=eps)

This is the definition of LayerNormalization over the last axis (biased variance, eps
inside the square root), so the result differs by float rounding only. Conditions: both
ReduceMeans reduce exactly the last axis (``[-1]``, or ``[rank-1]`` with the rank known) with
``keepdims = 1``, as attribute (opset < 18) or constant input (opset >= 18); ``eps`` a constant
scalar read from the graph, finite and >= 0; the exponent exactly 2; gamma/beta constants
with one entry per element of the last axis (or a scalar when that size is known) whose rank
does not exceed x's; every intermediate feeds only the pattern and is not a graph output;
float types.

``fuse-gelu`` (opset >= 20, where Gelu exists)::

    x * 0.5 * (1 + Erf(x / sqrt(2)))                                   ->  Gelu(x)
    x * 0.5 * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))            ->  Gelu(x, approximate="tanh")

in any association of the outer products (``(x * b) * 0.5``, ``(x * 0.5) * b``,
``x * (b * 0.5)``), with ``x / sqrt(2)`` or ``x * (1/sqrt(2))`` and ``x^3`` as ``Pow(x, 3)`` or
``x * x * x``. Constants must equal the formula's within 1e-5 relative (exporters round them to
float32). Intermediates must feed only the pattern.

Older opsets get neither op; ``--target-opset`` (the ``upgrade-opset`` pass) converts a model
first when the user opts in.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxopt.passes._fusion_util import (
    NodeRewritePass,
    attr,
    const_array,
    is_float_array,
    known_rank,
    make_const,
    producer_op,
    remove_nodes,
    scalar_value,
    sole_use,
    take_over,
)
from onnxopt.passes.registry import register_pass


def _close(a: float | None, b: float, rel: float = 1e-5) -> bool:
    return a is not None and abs(a - b) <= rel * abs(b)


def _only_for(value: ir.Value, *users: ir.Node) -> bool:
    """Every use of ``value`` is by one of ``users``, and it is not a graph output."""
    if value.is_graph_output():
        return False
    allowed = {id(u) for u in users}
    return all(id(u.node) in allowed for u in value.uses())


def _const_and_other(node: ir.Node) -> tuple[ir.Value, ir.Value] | None:
    """(constant input, other input) of a binary node, whichever order."""
    if len(node.inputs) != 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    if const_array(node.inputs[1]) is not None:
        return node.inputs[1], node.inputs[0]
    if const_array(node.inputs[0]) is not None:
        return node.inputs[0], node.inputs[1]
    return None


class _Fusion(NodeRewritePass):
    min_opset = 1

    def call(self, model):
        if (model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)) or 1) < self.min_opset and not model.functions:
            self.rewrites = 0
            return ir.passes.PassResult(model, modified=False)
        return super().call(model)


@register_pass(
    "fuse-layernorm",
    "ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div(/Mul/Add) over the last axis -> LayerNormalization (opset >= 17)",
    preset_order=302,
)
class FuseLayerNormPass(_Fusion):
    __doc__ = __doc__
    op_types = frozenset({"Div", "Mul"})
    min_opset = 17

    def rewrite(self, graph, node: ir.Node) -> bool:
        opset = self.opset(graph) or 1
        if opset < 17:
            return False
        m = self._match_core(node, opset)
        if m is None:
            return False
        x, d, eps, pattern_nodes = m
        last = node
        gamma = beta = None
        mul = sole_use(node.outputs[0])
        if mul is not None and mul.op_type == "Mul" and mul.domain in ("", "ai.onnx"):
            split = _const_and_other(mul)
            if split is not None and split[1] is node.outputs[0]:
                gamma = split[0]
                last = mul
        if gamma is not None:
            add = sole_use(last.outputs[0])
            if add is not None and add.op_type == "Add" and add.domain in ("", "ai.onnx"):
                split = _const_and_other(add)
                if split is not None and split[1] is last.outputs[0]:
                    beta = split[0]
        rank = known_rank(x)
        size = x.shape[-1] if x.shape is not None and len(x.shape) and isinstance(x.shape[-1], int) else None
        params = []
        for p in (gamma, beta):
            if p is None:
                params.append(None)
                continue
            arr = const_array(p)
            if not is_float_array(arr) or arr.ndim > (rank if rank is not None else 1):
                return False
            if any(dim != 1 for dim in arr.shape[:-1]):
                return False
            if arr.size != 1:
                size = size or arr.shape[-1]
                if arr.shape[-1] != size:
                    return False
            params.append(arr)
        if size is None:
            return False
        dtype = params[0].dtype if params[0] is not None else (params[1].dtype if params[1] is not None else None)
        if dtype is None:
            dtype = ir.DataType(x.dtype).numpy() if x.dtype is not None else None
            if dtype is None or np.dtype(dtype).kind != "f":
                return False
        if any(p is not None and p.dtype != dtype for p in params):
            return False
        scale = np.broadcast_to(params[0].reshape(-1), (size,)) if params[0] is not None else np.ones(size, dtype)
        out_value = (add.outputs[0] if beta is not None else last.outputs[0])
        inputs = [x, make_const(self.names, node, np.ascontiguousarray(scale, dtype=dtype), f"{out_value.name}_scale")]
        if beta is not None:
            bias = np.broadcast_to(params[1].reshape(-1), (size,))
            inputs.append(make_const(self.names, node, np.ascontiguousarray(bias, dtype=dtype), f"{out_value.name}_bias"))
        ln = ir.node(
            "LayerNormalization",
            inputs,
            attributes={"axis": -1, "epsilon": float(eps)},
            name=node.name or None,
            outputs=[ir.Value(name=self.names.new(f"{out_value.name}_ln"))],
        )
        anchor = add if beta is not None else last
        graph.insert_before(anchor, ln)
        take_over(self.names, out_value, ln.outputs[0])
        removed = [anchor]
        if last is not anchor:
            removed.append(last)
        if node is not last:
            removed.append(node)
        remove_nodes(*removed, *pattern_nodes)
        return True

    def _match_core(self, node: ir.Node, opset: int):
        """Match the normalisation up to Div; returns (x, d, eps, nodes above the Div) or None."""
        if node.op_type == "Div":
            if len(node.inputs) != 2:
                return None
            d, std = node.inputs
            recip = None
        else:
            if len(node.inputs) != 2:
                return None
            recip = producer_op(node.inputs[1], "Reciprocal") or producer_op(node.inputs[0], "Reciprocal")
            if recip is None:
                return None
            d = node.inputs[0] if recip.outputs[0] is node.inputs[1] else node.inputs[1]
            std = recip.inputs[0]
        sqrt = producer_op(std, "Sqrt")
        add = producer_op(sqrt.inputs[0] if sqrt else None, "Add")
        sub = producer_op(d, "Sub")
        if sqrt is None or add is None or sub is None:
            return None
        split = _const_and_other(add)
        if split is None:
            return None
        eps = scalar_value(split[0])
        var = split[1]
        rm2 = producer_op(var, "ReduceMean")
        # LayerNormalization's epsilon must be a finite number >= 0 (ONNX Runtime refuses
        # the model otherwise); a NaN, inf or negative eps stays in the decomposed form.
        if eps is None or not math.isfinite(eps) or eps < 0 or rm2 is None:
            return None
        sq = rm2.inputs[0].producer() if rm2.inputs[0] is not None else None
        if sq is None or sq.domain not in ("", "ai.onnx"):
            return None
        if sq.op_type == "Pow":
            if sq.inputs[0] is not d or scalar_value(sq.inputs[1]) != 2.0:
                return None
        elif sq.op_type == "Mul":
            if sq.inputs[0] is not d or sq.inputs[1] is not d:
                return None
        else:
            return None
        x, mean = sub.inputs
        rm1 = producer_op(mean, "ReduceMean")
        if rm1 is None or rm1.inputs[0] is not x:
            return None
        rank = known_rank(x)
        if not (_last_axis(rm1, opset, rank) and _last_axis(rm2, opset, rank)):
            return None
        # Every intermediate must serve only the pattern.
        checks = [
            (mean, (sub,)),
            (d, (sq, node)),
            (sq.outputs[0], (rm2,)),
            (var, (add,)),
            (add.outputs[0], (sqrt,)),
            (std, (recip or node,)),
        ]
        if recip is not None:
            checks.append((recip.outputs[0], (node,)))
        if not all(_only_for(v, *users) for v, users in checks):
            return None
        nodes = [n for n in (recip, sqrt, add, rm2, sq, sub, rm1) if n is not None]
        return x, d, eps, nodes


def _last_axis(rm: ir.Node, opset: int, rank: int | None) -> bool:
    if int(attr(rm, "keepdims", 1)) != 1:
        return False
    if opset >= 18:
        if len(rm.inputs) < 2 or rm.inputs[1] is None:
            return False
        axes = const_array(rm.inputs[1])
        axes = [int(a) for a in axes.reshape(-1)] if axes is not None else None
    else:
        a = attr(rm, "axes")
        axes = [int(v) for v in a] if a is not None else None
    if axes is None or len(axes) != 1:
        return False
    return axes[0] == -1 or (rank is not None and axes[0] == rank - 1)


_SQRT2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@register_pass(
    "fuse-gelu",
    "Erf and tanh forms of GELU -> Gelu (opset >= 20)",
    preset_order=304,
)
class FuseGeluPass(_Fusion):
    __doc__ = __doc__
    op_types = frozenset({"Mul"})
    min_opset = 20

    def rewrite(self, graph, node: ir.Node) -> bool:
        if (self.opset(graph) or 1) < 20 or len(node.inputs) != 2:
            return False
        for factors, inner in self._factorings(node):
            m = self._match(factors)
            if m is None:
                continue
            x, approximate, nodes = m
            if inner is not None and not _only_for(inner.outputs[0], node):
                continue
            y = node.outputs[0]
            attrs = {"approximate": "tanh"} if approximate else {}
            gelu = ir.node("Gelu", [x], attributes=attrs, name=node.name or None, outputs=[ir.Value(name=self.names.new(f"{y.name}_gelu"))])
            graph.insert_before(node, gelu)
            take_over(self.names, y, gelu.outputs[0])
            remove_nodes(node, *([inner] if inner is not None else []), *nodes)
            return True
        return False

    @staticmethod
    def _factorings(node: ir.Node):
        """Ways to see ``node`` as a product of three factors: (factors, inner Mul)."""
        a, b = node.inputs
        for outer, other in ((a, b), (b, a)):
            inner = producer_op(other, "Mul")
            if inner is not None and len(inner.inputs) == 2:
                yield [outer, inner.inputs[0], inner.inputs[1]], inner

    def _match(self, factors: list[ir.Value]):
        """(x, approximate, nodes of the ``1 + erf/tanh(...)`` branch) if factors are x, 0.5, that branch."""
        half = [f for f in factors if _close(scalar_value(f), 0.5)]
        if not half:
            return None
        rest = list(factors)
        rest.remove(half[0])
        for x, b in ((rest[0], rest[1]), (rest[1], rest[0])):
            add = producer_op(b, "Add")
            if add is None:
                continue
            split = _const_and_other(add)
            if split is None or not _close(scalar_value(split[0]), 1.0):
                continue
            inner = split[1]
            erf = producer_op(inner, "Erf")
            if erf is not None:
                nodes = self._erf_branch(erf, x)
                if nodes is not None and self._private(b, inner, nodes):
                    return x, False, [add, erf, *nodes]
            tanh = producer_op(inner, "Tanh")
            if tanh is not None:
                nodes = self._tanh_branch(tanh, x)
                if nodes is not None and self._private(b, inner, nodes):
                    return x, True, [add, tanh, *nodes]
        return None

    @staticmethod
    def _private(b: ir.Value, inner: ir.Value, nodes: list[ir.Node]) -> bool:
        """The branch's values feed only the branch (b only the final product)."""
        if b.is_graph_output() or len(b.uses()) != 1 or inner.is_graph_output() or len(inner.uses()) != 1:
            return False
        for n in nodes:
            for out in n.outputs:
                if out.is_graph_output() or len(out.uses()) != 1:
                    return False
        return True

    @staticmethod
    def _erf_branch(erf: ir.Node, x: ir.Value) -> list[ir.Node] | None:
        scaled = producer_op(erf.inputs[0], "Div")
        if scaled is not None:
            if scaled.inputs[0] is x and _close(scalar_value(scaled.inputs[1]), _SQRT2):
                return [scaled]
            return None
        scaled = producer_op(erf.inputs[0], "Mul")
        if scaled is not None:
            split = _const_and_other(scaled)
            if split is not None and split[1] is x and _close(scalar_value(split[0]), 1 / _SQRT2):
                return [scaled]
        return None

    @staticmethod
    def _tanh_branch(tanh: ir.Node, x: ir.Value) -> list[ir.Node] | None:
        s = producer_op(tanh.inputs[0], "Mul")
        split = _const_and_other(s) if s is not None else None
        if split is None or not _close(scalar_value(split[0]), _SQRT_2_OVER_PI):
            return None
        r = producer_op(split[1], "Add")
        if r is None or len(r.inputs) != 2:
            return None
        q_val = r.inputs[1] if r.inputs[0] is x else (r.inputs[0] if r.inputs[1] is x else None)
        q = producer_op(q_val, "Mul")
        split = _const_and_other(q) if q is not None else None
        if split is None or not _close(scalar_value(split[0]), 0.044715):
            return None
        cube = split[1].producer()
        if cube is None:
            return None
        if cube.op_type == "Pow" and cube.inputs[0] is x and scalar_value(cube.inputs[1]) == 3.0:
            return [s, r, q, cube]
        if cube.op_type == "Mul":
            a, b = cube.inputs
            sq = producer_op(a if b is x else b if a is x else None, "Mul")
            if sq is not None and sq.inputs[0] is x and sq.inputs[1] is x:
                return [s, r, q, cube, sq]
        return None


def is_gelu_product(node: ir.Node) -> bool:
    """Whether Mul ``node`` is the final product of a decomposed GELU (erf or tanh form).

    fuse-scale leaves such a Mul alone even below opset 20: folding its 0.5 into the next
    MatMul hides the GELU from ONNX Runtime's own GeluFusion, which measurably slows the
    model when ORT's graph optimizations are on.
    """
    if node.op_type != "Mul" or len(node.inputs) != 2:
        return False
    finder = FuseGeluPass()
    return any(finder._match(factors) is not None for factors, _ in finder._factorings(node))
