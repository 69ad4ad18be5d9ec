"""Shape facts for the cleanup passes: ONNX shape inference, run once per pass call.

Passes that must *prove* something about shapes (a Shape node is constant, a Reshape
changes nothing) read the shapes that :func:`infer_shapes` writes onto the IR values.
The facts come from ``onnx.shape_inference`` with data propagation, run from the
graph inputs' declared shapes only: the model's own ``value_info`` is dropped before
inference, because exporters sometimes declare intermediate or output shapes that are
wrong (a traced size baked in where the dimension is really dynamic), and a wrong
static dimension would let a pass fold across a dynamic one.

Where inference learns nothing about a value, its declared shape is kept (it is the
only information there is, e.g. after a custom-domain op). Declared *graph output*
shapes are never changed (they are the model's signature); their inferred shapes are
returned in the result mapping instead.

Large initializers are detached while the proto is built (as onnx-ir's own shape
inference pass does), so inference costs milliseconds even on big models.
"""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir

logger = logging.getLogger("onnxopt")

_BIG_TENSOR_BYTES = 1024


def static_dim(dim) -> int | None:
    """The dimension as a non-negative int, or None when it is not statically known."""
    if isinstance(dim, int) and dim >= 0:
        return dim
    return None


def static_shape(shape: ir.Shape | None) -> tuple[int, ...] | None:
    """The shape as a tuple of ints when every dimension is static, else None."""
    if shape is None:
        return None
    dims = tuple(static_dim(d) for d in shape)
    if any(d is None for d in dims):
        return None
    return dims  # type: ignore[return-value]


def _serialize_without_big_tensors(model: ir.Model) -> onnx.ModelProto:
    graph = model.graph
    detached: list[tuple[ir.Value, ir.TensorProtocol]] = []
    original_inputs = list(graph.inputs)
    # Intermediate types are dropped before inference anyway: not serializing them
    # at all halves the cost of this function.
    hidden: list[tuple[ir.Value, ir.TypeProtocol | None, ir.Shape | None]] = []
    try:
        for g in (graph, *graph.subgraphs()):
            for node in g:
                for value in node.outputs:
                    if (value.type is not None or value.shape is not None) and not value.is_graph_output():
                        hidden.append((value, value.type, value.shape))
                        value.type = None
                        value.shape = None
        for value in list(graph.initializers.values()):
            tensor = value.const_value
            if tensor is not None:
                if value.shape is None:
                    value.shape = ir.Shape(tensor.shape)
                if value.dtype is None:
                    value.dtype = tensor.dtype
            # An initializer that is also a graph input (old IR versions) can be fed a
            # different value at run time: inference must not see its data.
            if tensor is None or tensor.nbytes > _BIG_TENSOR_BYTES or value in original_inputs:
                if value not in original_inputs:
                    graph.inputs.append(value)
                graph.initializers.pop(value.name)
                if tensor is not None:
                    detached.append((value, tensor))
                    value.const_value = None
        proto = ir.serde.serialize_model(model)
    finally:
        for value, type_, shape in hidden:
            value.type = type_
            value.shape = shape
        for value, tensor in detached:
            value.const_value = tensor
            graph.register_initializer(value)
        graph.inputs.clear()
        graph.inputs.extend(original_inputs)
    return proto


def _strip_value_info(graph: onnx.GraphProto, subgraph: bool = False) -> None:
    if len(graph.value_info):
        del graph.value_info[:]
    for out in graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    if subgraph:
        # Loop/Scan body inputs: inference derives them from the node's inputs
        # (and knows a loop-carried value may change shape); declared ones may be wrong.
        for inp in graph.input:
            if inp.type.HasField("tensor_type"):
                inp.type.tensor_type.ClearField("shape")
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _strip_value_info(attr.g, True)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _strip_value_info(g, True)


def _collect_types(graph: onnx.GraphProto, into: dict[str, onnx.TypeProto], control_flow: frozenset[str]) -> None:
    for vi in (*graph.value_info, *graph.output):
        if vi.type.HasField("tensor_type"):
            into[vi.name] = vi.type
    if not control_flow:
        return
    for node in graph.node:
        if node.op_type not in control_flow:
            continue
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _collect_types(attr.g, into, control_flow)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _collect_types(g, into, control_flow)


_CACHE_KEY = "onnxopt.inferred_shapes"


def _fingerprint(graphs) -> tuple[tuple, list]:
    """What inference depends on: the nodes, their wiring, attributes and constant inputs.

    Objects are identified by ``id``; the returned keep-alive list holds them so that
    no id can be reused by a new object while the cache entry exists.
    """
    parts: list = []
    alive: list = []
    for graph in graphs:
        parts.append(id(graph))
        for value in graph.inputs:
            parts.append((id(value), value.dtype, str(value.shape)))
        for node in graph:
            attrs = tuple(node.attributes.values())
            consts = tuple(v.const_value if v is not None else None for v in node.inputs)
            alive.append((node, attrs, consts))
            parts.append(
                (
                    id(node),
                    tuple(id(v) if v is not None else 0 for v in node.inputs),
                    tuple(id(a) for a in attrs),
                    tuple(id(c) if c is not None else 0 for c in consts),
                )
            )
    return tuple(parts), alive


def infer_shapes(model: ir.Model) -> dict[ir.Value, ir.Shape | None]:
    """Run shape inference and write the results onto the model's values (in place).

    Returns the inferred shape of every value inference knew something about,
    graph outputs included (whose declared shapes are left as they are), and None
    for the inputs of subgraphs (unknown, whatever they declare).
    Functions are not inferred (their values keep what they had).
    The result is cached on the model and reused while no node, wiring, attribute
    or constant input has changed (passes that find nothing to do cost nothing).
    """
    graphs = [model.graph, *model.graph.subgraphs()]
    fingerprint, alive = _fingerprint(graphs)
    cached = model.meta.get(_CACHE_KEY)
    if cached is not None and cached[0] == fingerprint:
        if cached[1] is not None:
            return dict(cached[1])
        proto = cached[3]  # a pass left a proto describing this exact state
    else:
        proto = inference_proto(model)
    result = infer_from_proto(model, proto, graphs) if proto is not None else {}
    model.meta[_CACHE_KEY] = (fingerprint, result, alive, proto)
    return dict(result)


def cached_inference_proto(model: ir.Model) -> onnx.ModelProto | None:
    """A copy of the proto behind the last :func:`infer_shapes` result, if still current."""
    cached = model.meta.get(_CACHE_KEY)
    if cached is None or cached[3] is None:
        return None
    fingerprint, _ = _fingerprint([model.graph, *model.graph.subgraphs()])
    if cached[0] != fingerprint:
        return None
    proto = onnx.ModelProto()
    proto.CopyFrom(cached[3])
    return proto


def remember_inference_proto(model: ir.Model, proto: onnx.ModelProto) -> None:
    """Record that ``proto`` describes the model as it is now (inference not yet run)."""
    fingerprint, alive = _fingerprint([model.graph, *model.graph.subgraphs()])
    model.meta[_CACHE_KEY] = (fingerprint, None, alive, proto)


def inference_proto(model: ir.Model) -> onnx.ModelProto | None:
    """The proto shape inference runs on: big tensors detached, declared shapes dropped.

    A caller that edits the model in simple ways (see :class:`ProtoEditor`) can keep
    this proto in step and re-run :func:`infer_from_proto` without serializing again.
    """
    try:
        proto = _serialize_without_big_tensors(model)
    except Exception as e:
        logger.debug("cannot serialize for shape inference: %s", e)
        return None
    _strip_value_info(proto.graph)
    return proto


def infer_from_proto(
    model: ir.Model, proto: onnx.ModelProto, graphs: list[ir.Graph] | None = None
) -> dict[ir.Value, ir.Shape | None]:
    """Infer on ``proto`` (which must describe ``model``) and write the results onto it."""
    if graphs is None:
        graphs = [model.graph, *model.graph.subgraphs()]
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception as e:  # inference is an optimisation aid; without it passes just do less
        logger.debug("shape inference failed: %s", e)
        return {}
    # Op types that carry subgraphs, so the proto walk only looks inside those nodes.
    control_flow = frozenset(
        node.op_type
        for graph in graphs
        for node in graph
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())
    )
    types: dict[str, onnx.TypeProto] = {}
    _collect_types(inferred.graph, types, control_flow)
    result: dict[ir.Value, ir.Shape | None] = {}
    for graph in graphs[1:]:
        # A Loop/Scan body's declared input shapes are the exporter's claim, and a
        # loop-carried value may change shape between iterations: never rely on them.
        for value in graph.inputs:
            result[value] = None
    for graph in graphs:
        outputs = set(graph.outputs)
        for node in graph:
            for value in node.outputs:
                type_proto = types.get(value.name) if value.name else None
                if type_proto is None:
                    continue
                tensor_type = type_proto.tensor_type
                if value.dtype is None and tensor_type.elem_type:
                    value.dtype = ir.DataType(tensor_type.elem_type)
                if not tensor_type.HasField("shape"):
                    continue
                shape = _shape_from_proto(tensor_type.shape, value.shape)
                result[value] = shape
                if value not in outputs and shape is not value.shape:
                    value.shape = shape
    return result


def _shape_from_proto(shape_proto: onnx.TensorShapeProto, current: ir.Shape | None) -> ir.Shape:
    """ir.Shape of a TensorShapeProto; returns ``current`` itself when it is the same."""
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape_proto.dim]
    if current is not None and len(current) == len(dims):
        same = True
        for have, want in zip(current, dims):
            if isinstance(want, int):
                if have != want:
                    same = False
                    break
            elif not (isinstance(have, ir.SymbolicDim) and have.value == want):
                same = False
                break
        if same:
            return current
    return ir.Shape([d if isinstance(d, int) else ir.SymbolicDim(d) for d in dims])


class ProtoEditor:
    """Keeps an inference proto in step with simple edits of the model's main graph.

    Folding replaces nodes by initializers and rewires an input to a new initializer;
    mirroring those two edits on the proto lets the next inference round skip
    serializing the whole model again. Any other edit must set ``dirty``.
    """

    def __init__(self, proto: onnx.ModelProto):
        self.proto = proto
        self.dirty = False
        self._removed: set[str] = set()
        self._rewired: dict[str, tuple[int, str]] = {}

    def add_constant(self, name: str, array) -> None:
        graph = self.proto.graph
        try:
            if array.nbytes > _BIG_TENSOR_BYTES:
                elem_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
                graph.input.append(onnx.helper.make_tensor_value_info(name, elem_type, array.shape))
            else:
                graph.initializer.append(onnx.numpy_helper.from_array(array, name))
        except Exception:  # an exotic dtype: fall back to serializing the model again
            self.dirty = True

    def remove_node(self, first_output: str) -> None:
        self._removed.add(first_output)

    def rewire(self, first_output: str, index: int, new_name: str) -> None:
        self._rewired[first_output] = (index, new_name)

    def flush(self) -> None:
        """Apply the node removals and rewirings recorded since the last flush."""
        if not self._removed and not self._rewired:
            return
        nodes = self.proto.graph.node
        for i in range(len(nodes) - 1, -1, -1):
            key = nodes[i].output[0] if nodes[i].output else ""
            if key in self._removed:
                del nodes[i]
            elif key in self._rewired:
                index, new_name = self._rewired[key]
                nodes[i].input[index] = new_name
        self._removed.clear()
        self._rewired.clear()


def shape_of(value: ir.Value | None, inferred: dict[ir.Value, ir.Shape] | None = None) -> ir.Shape | None:
    """Best known shape: a constant's own, the inferred one, else the declared one."""
    if value is None:
        return None
    if value.const_value is not None:
        return ir.Shape(value.const_value.shape)
    if inferred is not None and value in inferred:
        return inferred[value]
    return value.shape
