"""Helpers shared by the fusion passes (fuse_*.py, chains.py).

Conventions every fusion follows, so each pass file only states its own algebra:

- A *constant* is an initializer or a Constant node's output, never a graph input (an
  initializer listed as a graph input can be overridden at run time, so it is not a
  constant). Values are read as numpy arrays; arithmetic on weights runs in float64 and is
  cast back to the weight's dtype once, so a fusion adds one rounding, not several.
- A weight is rewritten only when the node being fused is its sole user; a weight shared
  with another consumer is left alone (the pass does not fire) so no node sees changed
  weights it did not ask for.
- When a removed node's output is a graph output, the surviving value takes over that exact
  name, so graph output names never change. If the surviving value is itself a graph input or
  output the fusion is skipped (renaming it would change another interface name).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx_ir as ir


FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


# tensor id -> (tensor, array): a sweep asks for the same weights many times, and converting
# a TensorProto-backed tensor to numpy is not free. Keyed by the tensor object, which a
# rewrite replaces (never mutates), and cleared after every pass run.
_ARRAYS: dict[int, tuple[object, np.ndarray]] = {}


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents, or None when it is not a compile-time constant."""
    if value is None or value.is_graph_input():
        return None
    tensor = value.const_value
    if tensor is None:
        producer = value.producer()
        if producer is None or producer.op_type != "Constant":
            return None
        try:
            tensor = ir.convenience.get_const_tensor(value)
        except ValueError:
            return None
        if tensor is None:
            return None
    cached = _ARRAYS.get(id(tensor))
    if cached is not None and cached[0] is tensor:
        return cached[1]
    try:
        array = tensor.numpy()
    except Exception:  # e.g. an external file that cannot be read: not usable as a constant
        return None
    _ARRAYS[id(tensor)] = (tensor, array)
    return array


def scalar_value(value: ir.Value | None, *, max_rank: int | None = None) -> float | None:
    """The number in a one-element float constant (of rank <= ``max_rank`` when given: such a
    constant never raises the rank of what it broadcasts with), else None."""
    arr = const_array(value)
    if arr is None or arr.size != 1 or arr.dtype.kind != "f" or (max_rank is not None and arr.ndim > max_rank):
        return None
    return float(arr.reshape(-1)[0])


def is_float_array(arr: np.ndarray | None) -> bool:
    return arr is not None and arr.dtype.kind == "f"


def sole_use(value: ir.Value | None) -> ir.Node | None:
    """The single consumer of ``value``, if it has exactly one use and is not a graph output."""
    if value is None or value.is_graph_output():
        return None
    uses = list(value.uses())
    if len(uses) != 1:
        return None
    return uses[0].node


def owned(value: ir.Value | None) -> bool:
    """True when exactly one node input uses ``value`` (so it may be rewritten for that node)."""
    return value is not None and not value.is_graph_output() and len(value.uses()) == 1


def attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    if a is None:
        return default
    if a.is_ref():
        raise _RefAttribute(name)
    return a.value


class _RefAttribute(Exception):
    """An attribute that refers to a function attribute: its value is unknown here."""


def has_ref_attributes(node: ir.Node) -> bool:
    return any(a.is_ref() for a in node.attributes.values())


def producer_op(value: ir.Value | None, *op_types: str) -> ir.Node | None:
    """The standard-domain node of one of ``op_types`` that makes ``value``, or None (also
    when one of its attributes refers to a function attribute: its semantics are unknown)."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type not in op_types or node.domain not in ("", "ai.onnx") or has_ref_attributes(node):
        return None
    return node


def opset_of(model: ir.Model, graph: ir.Graph | ir.Function, domain: str = "") -> int | None:
    """Opset version in effect for ``graph`` (functions carry their own imports)."""
    imports = graph.opset_imports if isinstance(graph, ir.Function) else model.opset_imports
    version = imports.get(domain)
    if version is None and domain == "":
        version = imports.get("ai.onnx")
    if version is None and isinstance(graph, ir.Function):
        return opset_of(model, model.graph, domain)
    return version


def graphs_of(model: ir.Model) -> list[ir.Graph | ir.Function]:
    """The main graph, its subgraphs (depth first), then each function and its subgraphs.

    The same set as ``onnxopt.graph.all_graphs``, found with one plain walk over the
    nodes (a third of the cost of onnx-ir's recursive iterator on the real models).
    """
    found: list[ir.Graph | ir.Function] = []

    def walk(graph) -> None:
        found.append(graph)
        for node in graph:
            if node.attributes:
                for a in node.attributes.values():
                    if a.type == ir.AttributeType.GRAPH:
                        walk(a.value)
                    elif a.type == ir.AttributeType.GRAPHS:
                        for g in a.value:
                            walk(g)

    walk(model.graph)
    for func in model.functions.values():
        walk(func)
    return found


def nodes_of(model: ir.Model) -> Iterator[tuple[ir.Graph | ir.Function, ir.Node]]:
    """Every (graph, node) pair in the model, snapshotted per graph so rewrites are safe.

    A node removed by an earlier rewrite in the same sweep is skipped.
    """
    for graph in graphs_of(model):
        for node in list(graph):
            if node.graph is not None:
                yield graph, node


def set_const_input(names: Names, node: ir.Node, index: int, array: np.ndarray, name_hint: str | None = None) -> None:
    """Make input ``index`` of ``node`` the constant ``array``.

    An initializer used only here is updated in place (it keeps its name); otherwise a new
    initializer (or, inside a function, a Constant node) is created and the old value is
    left to unused-removal.
    """
    old = node.inputs[index] if index < len(node.inputs) else None
    if old is not None and old.is_initializer() and owned(old) and not old.is_graph_input():
        old.const_value = ir.tensor(np.ascontiguousarray(array), name=old.name)
        old.shape = ir.Shape(array.shape)
        old.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
        return
    new = make_const(names, node, array, name_hint or (old.name if old is not None and old.name else f"{node.name or node.op_type}_const"))
    if index < len(node.inputs):
        node.replace_input_with(index, new)
    else:
        _resize_inputs(node, index + 1)
        node.replace_input_with(index, new)


def _resize_inputs(node: ir.Node, n: int) -> None:
    if len(node.inputs) < n:
        node.resize_inputs(n)


def make_const(names: Names, anchor: ir.Node, array: np.ndarray, name_hint: str) -> ir.Value:
    """A new constant value visible to ``anchor`` (an initializer in its graph, or a Constant node in a function)."""
    graph = anchor.graph
    array = np.ascontiguousarray(array)
    name = names.new(f"{name_hint}_fused")
    if isinstance(graph, ir.Graph) and not names.in_function(graph):
        value = ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            const_value=ir.tensor(array, name=name),
        )
        graph.register_initializer(value)
        return value
    const = ir.node("Constant", [], attributes={"value": ir.tensor(array, name=name)}, outputs=[ir.Value(name=name)])
    const.outputs[0].shape = ir.Shape(array.shape)
    const.outputs[0].type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    graph.insert_before(anchor, const)
    return const.outputs[0]


class Names:
    """Value names already used anywhere in a model (all graphs and functions), for new names.

    Built once per pass run; every name it hands out is recorded, so names stay unique
    across the main graph and its subgraphs (which may refer to outer values by name).
    """

    def __init__(self, model: ir.Model):
        self._model = model
        self._taken: set[str] | None = None  # collected on first use: most sweeps rewrite nothing
        self._function_graphs: set[int] | None = None

    def in_function(self, graph: ir.Graph) -> bool:
        """Whether ``graph`` is a function body (or a subgraph in one): no initializers there."""
        if self._function_graphs is None:
            ids: set[int] = set()
            for func in self._model.functions.values():
                ids.add(id(func.graph))
                ids.update(id(g) for g in func.graph.subgraphs())
            self._function_graphs = ids
        return id(graph) in self._function_graphs

    def _collect(self) -> set[str]:
        names: set[str] = set()
        for g in graphs_of(self._model):
            names.update(v.name for v in g.inputs if v.name)
            names.update(v.name for v in g.outputs if v.name)
            if isinstance(g, ir.Graph):
                names.update(g.initializers)
            for n in g:
                names.update(o.name for o in n.outputs if o.name)
        return names

    def new(self, base: str) -> str:
        if self._taken is None:
            self._taken = self._collect()
        name = base
        i = 1
        while name in self._taken:
            name = f"{base}_{i}"
            i += 1
        self._taken.add(name)
        return name


def can_take_over(old: ir.Value, new: ir.Value) -> bool:
    """Whether ``new`` may replace ``old`` everywhere, keeping graph output names."""
    if not old.is_graph_output():
        return True
    return not (new.is_graph_output() or new.is_graph_input() or new.is_initializer())


def take_over(names: Names, old: ir.Value, new: ir.Value) -> None:
    """Replace every use of ``old`` by ``new``; if ``old`` is a graph output, ``new`` takes its name."""
    if new.type is None:
        new.type = old.type
    if new.shape is None and old.shape is not None:
        new.shape = old.shape
    if old.is_graph_output():
        name = old.name
        old.name = names.new(f"{name}_replaced") if name else None
        new.name = name
    old.replace_all_uses_with(new, replace_graph_outputs=True)


def remove_nodes(*nodes: ir.Node) -> None:
    """Remove nodes whose outputs are no longer used."""
    for node in nodes:
        if node.graph is not None:
            node.graph.remove(node, safe=True)


def output_rank(value: ir.Value) -> int | None:
    shape = value.shape
    return len(shape) if shape is not None else None


def broadcast_keeps_shape(const_shape: tuple[int, ...], out_rank: int, channel_axis: int, channels: int | None) -> str | None:
    """How a constant of ``const_shape`` broadcasts against an output of rank ``out_rank``.

    Returns "scalar" (every element size 1), "channel" (only the ``channel_axis`` dimension is
    non-1 and equals ``channels``), or None when it would change the output's shape or vary along
    another axis.
    """
    if len(const_shape) > out_rank:
        return None
    if all(d == 1 for d in const_shape):
        return "scalar"
    aligned = (1,) * (out_rank - len(const_shape)) + tuple(const_shape)
    for axis, d in enumerate(aligned):
        if axis == channel_axis:
            if d != 1 and (channels is None or d != channels):
                return None
        elif d != 1:
            return None
    return "channel"


def channel_vector(const: np.ndarray, out_rank: int, channel_axis: int, channels: int) -> np.ndarray:
    """A constant classified by :func:`broadcast_keeps_shape` as a 1-D vector of ``channels`` entries."""
    flat = const.reshape(-1)
    if flat.size == 1:
        return np.full(channels, flat[0], dtype=np.float64)
    return flat.astype(np.float64)


class NodeRewritePass(ir.passes.InPlacePass):
    """Base for the fusion passes: one sweep over every node of every graph and function.

    Subclasses implement :meth:`rewrite` (return True when the graph changed) and may list
    ``op_types`` so the sweep only calls it for nodes of those types in the default domain.
    Attributes that refer to function attributes make a node's semantics unknown here, so such
    nodes are never rewritten.
    """

    op_types: frozenset[str] = frozenset()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.model = model
        self.names = Names(model)
        count = 0
        try:
            for graph, node in nodes_of(model):
                if node.graph is None or node.domain not in ("", "ai.onnx"):
                    continue
                if self.op_types and node.op_type not in self.op_types:
                    continue
                if has_ref_attributes(node):
                    continue
                try:
                    if self.rewrite(graph, node):
                        count += 1
                except _RefAttribute:
                    continue
        finally:
            _ARRAYS.clear()  # do not keep weight copies alive between passes
        self.rewrites = count
        return ir.passes.PassResult(model, modified=count > 0)

    def opset(self, graph: ir.Graph | ir.Function) -> int | None:
        return opset_of(self.model, graph)

    def rewrite(self, graph: ir.Graph | ir.Function, node: ir.Node) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError


_RANK_PRESERVING = frozenset(
    {"Relu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "Clip", "Erf", "Gelu", "Elu", "Selu",
     "Softmax", "LogSoftmax", "Neg", "Abs", "Sqrt", "Exp", "Log", "Cast", "Identity", "Dropout", "LayerNormalization",
     "BatchNormalization", "Softplus", "Softsign", "Mish", "Reciprocal", "Floor", "Ceil", "Round", "Sign"}
)


def known_rank(value: ir.Value | None, depth: int = 6) -> int | None:
    """The rank of ``value`` when the graph determines it, without running shape inference.

    Uses the recorded shape, then a few producers whose output rank is fixed (Flatten, Gemm,
    Reshape to a constant shape, Conv) or equal to their first input's (element-wise unary ops).
    """
    if value is None:
        return None
    if value.shape is not None:
        return len(value.shape)
    const = const_array(value)
    if const is not None:
        return const.ndim
    node = value.producer()
    if node is None or depth <= 0 or node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    if op in ("Flatten", "Gemm"):
        return 2
    if op == "Reshape" and len(node.inputs) > 1:
        target = const_array(node.inputs[1])
        return int(target.size) if target is not None and target.ndim == 1 else None
    if op in ("Conv", "ConvTranspose") and len(node.inputs) > 1:
        w = node.inputs[1]
        if w is not None and w.shape is not None:
            return len(w.shape)
        w_arr = const_array(w)
        return w_arr.ndim if w_arr is not None else None
    if op in ("GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool") or op in _RANK_PRESERVING:
        return known_rank(node.inputs[0], depth - 1) if node.outputs[0] is value else None
    if op in ("Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "Sum"):
        ranks = [known_rank(v, depth - 1) for v in node.inputs]
        return None if any(r is None for r in ranks) else max(ranks)
    if op == "MatMul" and len(node.inputs) == 2:
        ra, rb = (known_rank(v, depth - 1) for v in node.inputs)
        if ra is None or rb is None:
            return None
        if ra == 1 and rb == 1:
            return 0
        if ra == 1 or rb == 1:
            return max(ra, rb) - 1
        return max(ra, rb)
    return None
