"""Constant folding, including shape arithmetic that the model's static dimensions fix.

Rewrite::

    y = Op(c1, c2, ...)        with every input a constant (initializer / Constant)
    ->  y = <initializer holding Op(c1, c2, ...)>

    s = Shape(x); d = Gather(s, 1)      with x's dimension 1 statically known (say 384)
    ->  d = <initializer 384>           even when x's other dimensions are dynamic

Shape values are tracked symbolically: ``Shape``/``Size`` of a tensor give a vector of
dimensions, some static ints, some symbolic; ``Gather``/``Slice``/``Concat``/
``Unsqueeze``/``Squeeze``/``Cast``/``Identity``/``Reshape`` move those vectors around,
``Equal`` against a constant uses the one fact every dimension has (it is >= 0, so it
never equals -1), and ``Where`` on a known condition picks elements. As soon as a
vector is all ints it becomes an initializer, and ordinary folding carries on from
there (Range, ConstantOfShape, Expand, Reshape of constants...).

Static dimensions come from ONNX shape inference run from the graph inputs' declared
shapes (see :mod:`onnxopt.passes._shapes`); declared intermediate shapes are not
trusted. A dimension that is symbolic or unknown is never replaced by a number, so
the folded model stays correct for every input size the original accepted.

Conditions (a node is left alone unless all hold):

- standard ONNX domain (custom-domain semantics are unknown here);
- no graph attributes (If/Loop/Scan are not evaluated, but their bodies are folded;
  see ``fold-if`` for a constant If condition);
- deterministic (no Random*, Multinomial, Bernoulli), and not QuantizeLinear /
  DequantizeLinear (a DequantizeLinear of a constant weight *is* the quantized model),
  not Dropout (``remove-noops`` handles it);
- no input is a graph input (old models list initializers as inputs, which a caller
  may override);
- size: an output of up to 16 Ki elements always folds; up to 1 Mi elements when it
  is at most 4x the constant inputs it reads; any size when it is no larger than the
  constant inputs that only this node reads (a weight transform: Transpose, Cast,
  Mul of a weight replaces that weight). The size is checked *before* evaluating
  wherever it can be known (static inferred shape; the shape/repeats/range inputs of
  ConstantOfShape, Expand, Tile, Range, OneHot, Resize), and those generating ops are
  not evaluated at all without such an estimate, so folding never allocates a
  tensor it would then refuse;
- the evaluation succeeds and yields the dtype shape inference expects.

Evaluation uses numpy for the common cheap ops and onnx's reference implementation
for the rest. Folded values become initializers in graphs (subgraph initializers in
If/Loop/Scan bodies) and Constant nodes in functions; a folded graph output stays an
output with its name, produced by a Constant node.
"""

from __future__ import annotations

import logging
import math
import re

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.graph import ANONYMOUS_DIM_NAMES
from onnxopt.passes._shapes import (
    ProtoEditor,
    cached_inference_proto,
    infer_from_proto,
    infer_shapes,
    inference_proto,
    remember_inference_proto,
    shape_of,
)
from onnxopt.passes.registry import register_pass

logger = logging.getLogger("onnxopt")

ALWAYS_FOLD_ELEMENTS = 16 * 1024
MAX_HINT_ROUNDS = 3
MAX_FOLD_ELEMENTS = 1 << 20
MAX_GROWTH = 4

_STANDARD_DOMAINS = ("", "ai.onnx")
_NEVER_FOLD = frozenset(
    {
        "RandomNormal",
        "RandomUniform",
        "RandomNormalLike",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "Dropout",
        "Constant",
        # Sequence / optional values are not tensors; leave them to the runtime.
        "SequenceConstruct",
        "SequenceEmpty",
        "SequenceInsert",
        "SequenceErase",
        "SplitToSequence",
        "Optional",
        "OptionalGetElement",
        "OptionalHasElement",
    }
)
_INT_TYPES = (ir.DataType.INT64, ir.DataType.INT32)
# Ops whose output size is set by input *values*, not input sizes: never evaluated
# without an estimate of how much they would allocate.
_GENERATIVE = frozenset({"ConstantOfShape", "Expand", "Tile", "Range", "OneHot", "Resize", "Upsample", "EyeLike"})




class _Sym:
    """A dimension whose value is not statically known.

    Two are equal when they are the same dimension of the same value (``origin``), or
    carry the same symbolic name from shape inference (which gives equal dims equal
    names). Names like "?" that exporters use for "anything" never count as equal.
    """

    __slots__ = ("name", "origin")

    def __init__(self, name: str | None, origin: tuple | None = None):
        self.name = name if name not in ANONYMOUS_DIM_NAMES else None
        self.origin = origin

    def __eq__(self, other):
        if self is other:
            return True
        if not isinstance(other, _Sym):
            return False
        if self.name is not None and self.name == other.name:
            return True
        return self.origin is not None and self.origin == other.origin

    # Equality mixes two criteria, so no hash is consistent with it: keep them out of sets.
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self):
        return f"<{self.name or '?'}>"


def _dim_to_sym(dim, origin: tuple | None = None) -> int | _Sym:
    if isinstance(dim, int):
        return dim if dim >= 0 else _Sym(None, origin)
    if isinstance(dim, ir.SymbolicDim) and dim.value:
        return _Sym(dim.value, origin)
    return _Sym(None, origin)


class ShapeValue:
    """A 0-d or 1-d integer tensor whose elements are dims (static ints or symbols)."""

    __slots__ = ("dims", "scalar")

    def __init__(self, dims, scalar: bool = False):
        self.dims = tuple(dims)
        self.scalar = scalar

    @property
    def static(self) -> bool:
        return all(isinstance(d, int) for d in self.dims)

    def array(self, dtype: np.dtype) -> np.ndarray:
        arr = np.array(self.dims, dtype=dtype)
        return arr.reshape(()) if self.scalar else arr

    def __repr__(self):
        return f"ShapeValue({list(self.dims)}{', scalar' if self.scalar else ''})"


def _const_array(value: ir.Value | None) -> np.ndarray | None:
    # An initializer that is also a graph input (old IR versions) can be overridden
    # by the caller: it is not a constant.
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    try:
        return value.const_value.numpy()
    except Exception:  # external data missing, odd dtypes
        return None


def _int_list(value: ir.Value | None) -> list[int] | None:
    arr = _const_array(value)
    if arr is None or arr.dtype.kind not in "iu" or arr.ndim > 1:
        return None
    return [int(x) for x in arr.reshape(-1)]


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    if attr is None or attr.is_ref():
        return default
    return attr.value


def _has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values())


# ---------------------------------------------------------------- numpy fast paths
# Each takes (node, input arrays) and returns a list of output arrays, or None to fall
# back to the reference implementation. Only cases whose semantics numpy matches
# exactly are handled here.


def _np_binary(fn):
    def run(node, xs):
        a, b = xs
        if a.dtype != b.dtype:
            return None
        out = fn(a, b)
        return [np.asarray(out, dtype=a.dtype) if out.dtype != np.bool_ else out]

    return run


def _np_div(node, xs):
    a, b = xs
    if a.dtype != b.dtype or a.dtype.kind not in "f":
        return None  # integer Div truncates toward zero: leave it to the reference
    with np.errstate(divide="ignore", invalid="ignore"):
        return [np.asarray(a / b, dtype=a.dtype)]


def _np_cast(node, xs):
    to = _attr(node, "to")
    if to is None or "saturate" in node.attributes:
        return None
    try:
        dtype = ir.DataType(to).numpy()
    except Exception:
        return None
    x = xs[0]
    if x.dtype.kind == "f" and dtype.kind in "iub":
        return None  # float -> int conversions of out-of-range values differ; use the reference
    if x.dtype == np.dtype("O") or dtype == np.dtype("O"):
        return None
    return [x.astype(dtype)]


def _axes_input_or_attr(node, xs, index):
    if len(xs) > index and xs[index] is not None:
        return [int(a) for a in np.asarray(xs[index]).reshape(-1)]
    axes = _attr(node, "axes")
    return list(axes) if axes is not None else None


def _np_unsqueeze(node, xs):
    axes = _axes_input_or_attr(node, xs, 1)
    if axes is None:
        return None
    x = xs[0]
    rank = x.ndim + len(axes)
    axes = sorted(a + rank if a < 0 else a for a in axes)
    shape = list(x.shape)
    for a in axes:
        shape.insert(a, 1)
    return [x.reshape(shape)]


def _np_squeeze(node, xs):
    axes = _axes_input_or_attr(node, xs, 1)
    x = xs[0]
    if axes is None:
        return [np.squeeze(x)]
    axes = tuple(a + x.ndim if a < 0 else a for a in axes)
    return [np.squeeze(x, axis=axes)]


def _np_concat(node, xs):
    axis = _attr(node, "axis")
    if axis is None or len({x.dtype for x in xs}) != 1:
        return None
    return [np.concatenate(xs, axis=axis)]


def _np_gather(node, xs):
    data, idx = xs
    axis = _attr(node, "axis", 0)
    axis = axis + data.ndim if axis < 0 else axis
    dim = data.shape[axis]
    if idx.size and (idx.min() < -dim or idx.max() >= dim):
        return None
    idx = np.where(idx < 0, idx + dim, idx)
    return [np.take(data, idx, axis=axis)]


def _np_reshape(node, xs):
    data, shape = xs
    shape = [int(s) for s in shape.reshape(-1)]
    if _attr(node, "allowzero", 0) == 0:
        shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [data.reshape(shape)]


def _np_transpose(node, xs):
    perm = _attr(node, "perm")
    return [np.transpose(xs[0], perm).copy() if perm is not None else np.transpose(xs[0]).copy()]


def _np_shape(node, xs):
    shape = np.array(xs[0].shape, dtype=np.int64)
    start = _attr(node, "start", 0)
    end = _attr(node, "end", None)
    return [shape[start:end]]


def _np_constant_of_shape(node, xs):
    shape = [int(d) for d in xs[0].reshape(-1)]
    attr = node.attributes.get("value")
    if attr is None:
        return [np.zeros(shape, dtype=np.float32)]
    value = attr.value.numpy().reshape(-1)
    if value.size != 1:
        return None
    return [np.full(shape, value[0], dtype=value.dtype)]


def _np_where(node, xs):
    cond, a, b = xs
    if a.dtype != b.dtype or cond.dtype != np.bool_:
        return None
    return [np.where(cond, a, b)]


def _np_unary(fn):
    def run(node, xs):
        x = xs[0]
        if x.dtype.kind != "f":
            return None
        with np.errstate(all="ignore"):
            return [np.asarray(fn(x), dtype=x.dtype)]

    return run


_NUMPY_OPS = {
    "Add": _np_binary(np.add),
    "Sub": _np_binary(np.subtract),
    "Mul": _np_binary(np.multiply),
    "Div": _np_div,
    "Equal": _np_binary(np.equal),
    "Less": _np_binary(np.less),
    "Greater": _np_binary(np.greater),
    "Cast": _np_cast,
    "Unsqueeze": _np_unsqueeze,
    "Squeeze": _np_squeeze,
    "Concat": _np_concat,
    "Gather": _np_gather,
    "Reshape": _np_reshape,
    "Transpose": _np_transpose,
    "Shape": _np_shape,
    "Sqrt": _np_unary(np.sqrt),
    "Neg": _np_unary(np.negative),
    "Reciprocal": _np_unary(np.reciprocal),
    "Identity": lambda node, xs: [xs[0].copy()],
    "ConstantOfShape": _np_constant_of_shape,
    "Where": _np_where,
}


def _convert_attr(attr: ir.Attr):
    if attr.type == ir.AttributeType.TENSOR:
        return ir.serde.serialize_tensor(attr.value)
    if attr.type == ir.AttributeType.TENSORS:
        return [ir.serde.serialize_tensor(t) for t in attr.value]
    if attr.type in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
        return list(attr.value)
    return attr.value


def evaluate_node(node: ir.Node, inputs: list[np.ndarray | None], opset: int) -> list[np.ndarray] | None:
    """Outputs of a standard-domain node on constant inputs, or None if it cannot be evaluated."""
    fast = _NUMPY_OPS.get(node.op_type)
    if fast is not None and all(x is not None for x in inputs):
        try:
            out = fast(node, inputs)
        except Exception:
            out = None
        if out is not None:
            return out
    # Imported here: it loads every op implementation (a few hundred ms), which only
    # matters to models that need an op the numpy fast paths do not cover.
    import onnx.reference.ops

    try:
        impl = onnx.reference.ops.load_op("", node.op_type, opset)
    except Exception:
        return None
    # Trailing omitted optional inputs are dropped; inner ones are passed as None.
    args = list(inputs)
    while args and args[-1] is None:
        args.pop()
    try:
        attrs = {name: _convert_attr(a) for name, a in node.attributes.items() if not a.is_ref()}
        with np.errstate(all="ignore"):
            out = impl.eval(*args, n_outputs=len(node.outputs), **attrs)
    except Exception as e:
        logger.debug("cannot evaluate %s: %s", node.op_type, e)
        return None
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    if len(outs) != len(node.outputs) or not all(isinstance(o, (np.ndarray, np.generic)) for o in outs):
        return None
    return [np.asarray(o) for o in outs]


class _Folder:
    """One sweep over the graphs in order: symbolic shape tracking, then evaluation."""

    def __init__(self, model: ir.Model, inferred: dict[ir.Value, ir.Shape], editor: ProtoEditor | None = None):
        self.model = model
        self.inferred = inferred
        self.editor = editor
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self.sym: dict[ir.Value, ShapeValue] = {}
        self.folded = 0
        self.shape_folds = 0
        self._names: set[str] = set()
        for graph in (model.graph, *model.graph.subgraphs()):
            for v in (*graph.inputs, *graph.initializers.values()):
                if v.name:
                    self._names.add(v.name)
            for node in graph:
                for v in node.outputs:
                    if v.name:
                        self._names.add(v.name)

    # ---------------------------------------------------------------- symbolic shapes

    def shape_value(self, value: ir.Value | None) -> ShapeValue | None:
        if value is None:
            return None
        if value in self.sym:
            return self.sym[value]
        tensor = value.const_value
        if tensor is not None and not value.is_graph_input() and tensor.dtype in _INT_TYPES and len(tensor.shape) <= 1 and tensor.size <= 64:
            arr = _const_array(value)
            if arr is None:
                return None
            return ShapeValue([int(x) for x in arr.reshape(-1)], scalar=arr.ndim == 0)
        return None

    def symbolic(self, node: ir.Node) -> ShapeValue | None:
        """The output of a shape-manipulating node as a ShapeValue, when it can be tracked."""
        op = node.op_type
        ins = node.inputs
        if op == "Shape":
            shape = shape_of(ins[0], self.inferred)
            if shape is None:
                return None
            dims = [_dim_to_sym(d, (ins[0], i)) for i, d in enumerate(shape)]
            rank = len(dims)
            start = _attr(node, "start", 0)
            end = _attr(node, "end", rank)
            start = min(max(start + rank if start < 0 else start, 0), rank)
            end = min(max(end + rank if end < 0 else end, 0), rank)
            return ShapeValue(dims[start:end])
        if op == "Size":
            shape = shape_of(ins[0], self.inferred)
            if shape is None:
                return None
            dims = [_dim_to_sym(d) for d in shape]
            if all(isinstance(d, int) for d in dims):
                return ShapeValue([math.prod(dims)], scalar=True)
            return None
        if op in ("Identity", "Cast"):
            if op == "Cast" and _attr(node, "to") not in (ir.DataType.INT64, ir.DataType.INT32):
                return None
            return self.shape_value(ins[0])
        src = self.shape_value(ins[0]) if ins else None
        if op == "Gather":
            idx = _const_array(ins[1])
            if src is None or src.scalar or idx is None or idx.ndim > 1 or _attr(node, "axis", 0) not in (0, -1):
                return None
            n = len(src.dims)
            picked = []
            for i in idx.reshape(-1):
                i = int(i)
                if not -n <= i < n:
                    return None
                picked.append(src.dims[i])
            return ShapeValue(picked, scalar=idx.ndim == 0)
        if op == "Slice":
            if src is None or src.scalar:
                return None
            starts, ends = _int_list(ins[1]), _int_list(ins[2])
            axes = _int_list(ins[3]) if len(ins) > 3 and ins[3] is not None else [0]
            steps = _int_list(ins[4]) if len(ins) > 4 and ins[4] is not None else [1]
            if starts is None or ends is None or axes not in ([0], [-1]) or steps is None or len(starts) != 1:
                return None
            if steps[0] <= 0:
                return None
            return ShapeValue(src.dims[slice(starts[0], ends[0], steps[0])])
        if op == "Concat":
            if _attr(node, "axis") not in (0, -1):
                return None
            parts = [self.shape_value(v) for v in ins]
            if any(p is None or p.scalar for p in parts):
                return None
            return ShapeValue([d for p in parts for d in p.dims])
        if op == "Unsqueeze":
            axes = _int_list(ins[1]) if len(ins) > 1 and ins[1] is not None else _attr(node, "axes")
            if src is None or axes is None or list(axes) not in ([0], [-1]) or not src.scalar:
                return None
            return ShapeValue(src.dims)
        if op == "Squeeze":
            axes = _int_list(ins[1]) if len(ins) > 1 and ins[1] is not None else _attr(node, "axes")
            if src is None or src.scalar or len(src.dims) != 1:
                return None
            if axes is not None and list(axes) not in ([0], [-1]):
                return None
            return ShapeValue(src.dims, scalar=True)
        if op == "Reshape":
            target = _int_list(ins[1])
            if src is None or target is None:
                return None
            n = len(src.dims)
            if target in ([-1], [n]) or (src.scalar and target == [1]):
                return ShapeValue(src.dims)
            if target == [] and n == 1:
                return ShapeValue(src.dims, scalar=True)
            return None
        if op == "Equal":
            a, b = self.shape_value(ins[0]), self.shape_value(ins[1])
            if a is None or b is None:
                return None
            da, db = _broadcast_1d(a, b)
            if da is None:
                return None
            out = []
            for x, y in zip(da, db):
                if isinstance(x, int) and isinstance(y, int):
                    out.append(int(x == y))
                elif isinstance(x, _Sym) and isinstance(y, int) and y < 0:
                    out.append(0)  # a dimension is never negative
                elif isinstance(y, _Sym) and isinstance(x, int) and x < 0:
                    out.append(0)
                elif isinstance(x, _Sym) and x == y:
                    out.append(1)
                else:
                    return None
            return ShapeValue(out, scalar=a.scalar and b.scalar)
        if op == "Where":
            cond = _const_array(ins[0])
            a, b = self.shape_value(ins[1]), self.shape_value(ins[2])
            if cond is None or cond.ndim > 1 or a is None or b is None:
                return None
            n = max(cond.size, len(a.dims), len(b.dims))
            c = np.broadcast_to(cond.reshape(-1), (n,)) if cond.size in (1, n) else None
            da, db = _broadcast_1d(a, b, n)
            if c is None or da is None:
                return None
            return ShapeValue([x if bool(k) else y for k, x, y in zip(c, da, db)], scalar=a.scalar and b.scalar and cond.ndim == 0)
        return None

    # ---------------------------------------------------------------- rewriting

    def fresh_name(self, base: str) -> str:
        name = base
        i = 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        self._names.add(name)
        return name

    def _mirror(self, graph, node: ir.Node) -> str | None:
        """The node's first output name as the inference proto knows it, or None (then dirty)."""
        if self.editor is None:
            return None
        first = node.outputs[0].name if node.outputs else None
        if graph is not self.model.graph or not first or any(o.is_graph_output() for o in node.outputs):
            self.editor.dirty = True
            return None
        return first

    def replace_with_constants(self, graph: ir.Graph | ir.Function, node: ir.Node, arrays: list[np.ndarray]) -> None:
        in_function = isinstance(graph, ir.Function)
        mirror = self._mirror(graph, node)
        if mirror is not None:
            self.editor.remove_node(mirror)
        for old, array in zip(node.outputs, arrays):
            if not old.uses() and not old.is_graph_output():
                continue  # an unused (often unnamed optional) output needs no constant
            name = old.name or self.fresh_name("folded")
            old.name = self.fresh_name(f"{name}__unfolded")
            tensor = ir.tensor(array, name=name)
            if in_function or old.is_graph_output():
                const = ir.Node(
                    "",
                    "Constant",
                    [],
                    attributes=[ir.AttrTensor("value", tensor)],
                    outputs=[ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape))],
                    name=self.fresh_name(f"{name}__const"),
                )
                new_value = const.outputs[0]
                new_value.const_value = tensor
                graph.insert_before(node, const)
            else:
                new_value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape), const_value=tensor)
                graph.register_initializer(new_value)
                if mirror is not None:
                    self.editor.add_constant(name, array)
            old.replace_all_uses_with(new_value, replace_graph_outputs=True)
        graph.remove(node, safe=True)

    def estimated_elements(self, node: ir.Node, arrays: list[np.ndarray | None]) -> int | None:
        """Output elements known before evaluating, or None.

        Ops that generate data from a shape (ConstantOfShape, Expand, Tile, Range, ...)
        could allocate far more than memory holds, so their size is computed from the
        constant inputs first; any op with a statically inferred output shape is also
        checked before it runs.
        """
        total = 0
        for out in node.outputs:
            shape = self.inferred.get(out)
            if shape is None:
                shape = out.shape
            dims = [d if isinstance(d, int) and d >= 0 else None for d in shape] if shape is not None else [None]
            if any(d is None for d in dims):
                total = None
                break
            total += math.prod(dims)
        if total is not None:
            return total
        op = node.op_type
        try:
            if op == "ConstantOfShape":
                return math.prod(int(d) for d in arrays[0].reshape(-1))
            if op == "Expand":
                return math.prod(np.broadcast_shapes(arrays[0].shape, tuple(int(d) for d in arrays[1].reshape(-1))))
            if op == "Tile":
                return arrays[0].size * math.prod(int(r) for r in arrays[1].reshape(-1))
            if op == "Range":
                start, limit, delta = (float(a.reshape(-1)[0]) for a in arrays[:3])
                return max(math.ceil((limit - start) / delta), 0) if delta else None
            if op == "OneHot":
                return arrays[0].size * int(arrays[1].reshape(-1)[0])
            if op in ("Resize", "Upsample"):
                sizes = arrays[3] if op == "Resize" and len(arrays) > 3 else None
                if sizes is not None and sizes.size:
                    return math.prod(int(d) for d in sizes.reshape(-1))
                scales = arrays[2] if op == "Resize" and len(arrays) > 2 else (arrays[1] if len(arrays) > 1 else None)
                if scales is not None and scales.size == arrays[0].ndim:
                    return math.prod(math.floor(d * float(f)) for d, f in zip(arrays[0].shape, scales.reshape(-1)))
                return None
        except (ValueError, TypeError, IndexError, OverflowError, ZeroDivisionError):
            return None
        if op in _GENERATIVE:
            return None
        return sum(a.size for a in arrays if a is not None)  # other ops produce about what they read

    def size_ok(self, node: ir.Node, arrays: list[np.ndarray]) -> bool:
        return self.count_ok(node, sum(a.size for a in arrays))

    def count_ok(self, node: ir.Node, out: int) -> bool:
        if out <= ALWAYS_FOLD_ELEMENTS:
            return True
        inputs = [v for v in node.inputs if v is not None and v.const_value is not None]
        total_in = sum(v.const_value.size for v in {id(v): v for v in inputs}.values())
        freed = sum(
            v.const_value.size
            for v in {id(v): v for v in inputs}.values()
            if len(v.uses()) == len([u for u in v.uses() if u.node is node]) and not v.is_graph_output()
        )
        if out <= freed:
            return True
        return out <= MAX_FOLD_ELEMENTS and out <= MAX_GROWTH * total_in

    def dtype_ok(self, node: ir.Node, arrays: list[np.ndarray]) -> bool:
        for value, arr in zip(node.outputs, arrays):
            if arr.dtype == np.dtype("O"):
                return False
            if value.dtype is not None:
                try:
                    if value.dtype.numpy() != arr.dtype:
                        return False
                except Exception:
                    return False
            shape = self.inferred.get(value)
            if shape is None:
                shape = value.shape
            if shape is not None:
                if len(shape) != arr.ndim:
                    return False
                for d, n in zip(shape, arr.shape):
                    if isinstance(d, int) and d >= 0 and d != n:
                        return False
        return True

    @staticmethod
    def _shape_array(node: ir.Node, sv: ShapeValue) -> np.ndarray | None:
        out = node.outputs[0]
        if node.op_type == "Equal":
            return sv.array(np.dtype(np.int64)).astype(np.bool_)
        if out.dtype in _INT_TYPES:
            return sv.array(out.dtype.numpy())
        if out.dtype is None and node.op_type in ("Shape", "Size"):
            return sv.array(np.dtype(np.int64))
        return None

    def dims_of(self, value: ir.Value) -> list | None:
        shape = shape_of(value, self.inferred)
        if shape is None:
            return None
        return [_dim_to_sym(d, (value, i)) for i, d in enumerate(shape)]

    def static_target(self, node: ir.Node) -> np.ndarray | None:
        """A constant equivalent of a Reshape/Expand shape input that is only partly static.

        Reshape (allowzero=0): an entry equal to the data's own dim i becomes 0 ("copy
        dim i"); then if exactly one entry is still unknown and every other entry is a
        known size > 0, it becomes -1 (the only value that makes the sizes match).
        Expand: an entry equal to the input's dim at the same (right-aligned) position
        becomes 1, since broadcasting d against 1 gives d.
        """
        target = self.shape_value(node.inputs[1])
        data = node.inputs[0]
        if target is None or target.scalar or target.static or data is None:
            return None
        dims = self.dims_of(data)
        if dims is None:
            return None
        out: list = []
        if node.op_type == "Reshape":
            if _attr(node, "allowzero", 0) != 0:
                return None
            for i, t in enumerate(target.dims):
                if isinstance(t, _Sym) and i < len(dims) and t == dims[i]:
                    out.append(0)
                else:
                    out.append(t)
            unknown = [i for i, t in enumerate(out) if isinstance(t, _Sym)]
            if unknown:
                # -1 is only equivalent when every other entry is a known non-zero size
                # (a 0-sized dimension at run time would make -1 ambiguous).
                if len(unknown) > 1:
                    return None
                for i, t in enumerate(out):
                    if i == unknown[0]:
                        continue
                    size = (dims[i] if i < len(dims) else None) if t == 0 else t
                    if not (isinstance(size, int) and size > 0):
                        return None
                out[unknown[0]] = -1
        else:  # Expand
            offset = len(target.dims) - len(dims)
            for i, t in enumerate(target.dims):
                j = i - offset
                if isinstance(t, _Sym):
                    if j >= 0 and t == dims[j]:
                        out.append(1)
                    else:
                        return None
                else:
                    out.append(t)
        dtype = node.inputs[1].dtype.numpy() if node.inputs[1].dtype in _INT_TYPES else np.dtype(np.int64)
        return np.array(out, dtype=dtype)

    def set_static_target(self, graph, node: ir.Node, array: np.ndarray) -> None:
        old = node.inputs[1]
        name = self.fresh_name(f"{old.name or 'shape'}__static")
        mirror = self._mirror(graph, node)
        if mirror is not None:
            self.editor.add_constant(name, array)
            self.editor.rewire(mirror, 1, name)
        tensor = ir.tensor(array, name=name)
        if isinstance(graph, ir.Function):
            const = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", tensor)], name=self.fresh_name(name))
            const.outputs[0].name = name
            const.outputs[0].const_value = tensor
            graph.insert_before(node, const)
            new_value = const.outputs[0]
        else:
            new_value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape), const_value=tensor)
            graph.register_initializer(new_value)
        node.replace_input_with(1, new_value)

    def fold_node(self, graph, node: ir.Node) -> bool:
        if node.domain not in _STANDARD_DOMAINS or node.op_type in _NEVER_FOLD or _has_subgraph(node):
            return False
        if node.op_type in ("Reshape", "Expand") and len(node.inputs) == 2 and node.inputs[1] is not None:
            if node.inputs[1].const_value is None and not node.inputs[1].is_graph_input():
                target = self.static_target(node)
                if target is not None:
                    self.set_static_target(graph, node, target)
                    self.shape_folds += 1
                    self.folded += 1
        if len(node.outputs) == 1:
            sv = self.symbolic(node)
            if sv is not None:
                out = node.outputs[0]
                if sv.static:
                    arr = self._shape_array(node, sv)
                    if arr is not None and self.dtype_ok(node, [arr]):
                        if not all(v is None or v.const_value is not None for v in node.inputs):
                            self.shape_folds += 1
                        self.replace_with_constants(graph, node, [arr])
                        return True
                self.sym[out] = sv
        if not node.inputs or any(v is not None and (v.const_value is None or v.is_graph_input()) for v in node.inputs):
            return False
        arrays = [_const_array(v) if v is not None else None for v in node.inputs]
        if any(a is None and v is not None for a, v in zip(arrays, node.inputs)):
            return False
        estimate = self.estimated_elements(node, arrays)
        if estimate is None and node.op_type in _GENERATIVE:
            return False
        if estimate is not None and estimate > ALWAYS_FOLD_ELEMENTS and not self.count_ok(node, estimate):
            return False
        outs = evaluate_node(node, arrays, self.opset)
        if outs is None or not self.dtype_ok(node, outs) or not self.size_ok(node, outs):
            return False
        self.replace_with_constants(graph, node, outs)
        return True

    def fold_graph(self, graph) -> None:
        owner = graph.graph if isinstance(graph, ir.Function) else graph
        for node in list(graph):
            if node.graph is not owner:
                continue  # removed by an earlier fold
            if node.op_type == "Constant" and node.domain in _STANDARD_DOMAINS:
                _mark_constant(node)
                continue
            if self.fold_node(graph, node):
                self.folded += 1


def _mark_constant(node: ir.Node) -> None:
    """Give a Constant node's output its const_value (as lifting would), so users can fold."""
    out = node.outputs[0]
    if out.const_value is not None or len(node.attributes) != 1:
        return
    name, attr = next(iter(node.attributes.items()))
    if attr.is_ref():
        return
    if name == "value":
        tensor = attr.value
    elif name == "value_int":
        tensor = ir.tensor(np.array(attr.value, dtype=np.int64))
    elif name == "value_ints":
        tensor = ir.tensor(np.array(list(attr.value), dtype=np.int64))
    elif name == "value_float":
        tensor = ir.tensor(np.array(attr.value, dtype=np.float32))
    elif name == "value_floats":
        tensor = ir.tensor(np.array(list(attr.value), dtype=np.float32))
    else:
        return
    out.const_value = tensor
    if out.dtype is None:
        out.dtype = tensor.dtype
    if out.shape is None:
        out.shape = ir.Shape(tensor.shape)


def _broadcast_1d(a: ShapeValue, b: ShapeValue, n: int | None = None):
    n = n or max(len(a.dims), len(b.dims))
    da = a.dims if len(a.dims) == n else (a.dims * n if len(a.dims) == 1 else None)
    db = b.dims if len(b.dims) == n else (b.dims * n if len(b.dims) == 1 else None)
    if da is None or db is None:
        return None, None
    return da, db


# ---------------------------------------------------------------- shape hints
#
# ONNX shape inference gives up on a few patterns exporters write around dynamic dims, and
# every dimension downstream of them then becomes a fresh unknown ("unk__7"). Three facts
# it misses are computed here from the symbolic shape values above and handed back to it as
# value_info (the proto inference runs on, never the model), so its own propagation carries
# them on:
#
# - ``Range(0, d, 1)`` with ``d`` a dimension has shape ``[d]`` (d >= 0).
# - ``Expand(x, t)`` with ``t`` a tracked shape value has shape ``broadcast(shape(x), t)``.
# - ``Slice(data, [0], [d], [a])`` (step 1) of a static dim N has ``min(d, N)`` there; a
#   broadcasting op that meets it against ``d`` itself outputs ``d`` (both are d when d <= N,
#   and the op fails otherwise). A position-id slice followed by an embedding Gather and an
#   Add is what transformer exports write, and the hidden states' batch/sequence dims were
#   lost at that Add.
#
# A hint only names a dimension inference left unknown; it never overrides one it knew.

_BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "And", "Or", "Xor", "Equal", "Less", "Greater",
                           "LessOrEqual", "GreaterOrEqual", "Where", "Max", "Min", "Mod", "BitShift"})


class _MinDim:
    """``min(d, N)``: a Slice's output dim with end ``d`` (a symbol) over a static size N."""

    __slots__ = ("d",)

    def __init__(self, d):
        self.d = d


def _bcast_dim(a, b):
    """Broadcast of two symbolic dims, or None when it cannot be named."""
    if isinstance(a, _MinDim) and isinstance(b, _MinDim):
        return None
    if isinstance(a, _MinDim):
        a, b = b, a
    if isinstance(b, _MinDim):
        return a if isinstance(a, _Sym) and a == b.d else None
    if isinstance(a, int) and a == 1:
        return b
    if isinstance(b, int) and b == 1:
        return a
    return a if a == b else None


def _broadcast_dims(shapes: list[list]) -> list | None:
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = [s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0]
        d = dims[0]
        for e in dims[1:]:
            d = _bcast_dim(d, e) if d is not None else None
        out.append(d)
    return out


def _stable_name(name: str | None) -> bool:
    # "unk__N" names are made up by each inference run and may be handed out again to other
    # dims in the next one: only names the model itself declares are written back.
    return bool(name) and not re.fullmatch(r"unk__\d+", name)


def _known(dim) -> bool:
    return isinstance(dim, int) or (isinstance(dim, ir.SymbolicDim) and _stable_name(dim.value))


def _has_unknown(shape: ir.Shape | None) -> bool:
    return shape is None or not all(_known(d) for d in shape)


def _shape_hints(model: ir.Model, inferred: dict[ir.Value, ir.Shape]) -> dict[str, list]:
    """{value name: dims (int, symbol name, or None)} that inference left unknown (main graph)."""
    folder = _Folder(model, inferred)
    mins: dict[ir.Value, dict[int, _Sym]] = {}
    hints: dict[str, list] = {}
    refined: dict[ir.Value, list] = {}

    def dims(v: ir.Value | None) -> list | None:
        if v is None:
            return None
        if v in refined:
            return refined[v]
        d = folder.dims_of(v)
        if d is not None and v in mins:
            d = [_MinDim(mins[v][i]) if i in mins[v] else x for i, x in enumerate(d)]
        return d

    def hint(v: ir.Value, new: list) -> None:
        old = shape_of(v, inferred)
        if old is None or len(old) != len(new) or not _has_unknown(old) or not v.name or v.is_graph_output():
            return  # (a graph output's declared shape is the model's own; value_info is for intermediates)
        out, gained = [], False
        for o, n in zip(old, new):
            if _known(o):
                out.append(o if isinstance(o, int) else o.value)
            elif isinstance(n, int) or (isinstance(n, _Sym) and _stable_name(n.name)):
                out.append(n if isinstance(n, int) else n.name)
                gained = True
            else:
                out.append(None)
        if gained:
            hints[v.name] = out
            refined[v] = [x if isinstance(x, int) else _Sym(x, (v, i)) if x else _Sym(None, (v, i))
                          for i, x in enumerate(out)]

    for node in model.graph:
        if node.domain not in _STANDARD_DOMAINS or not node.outputs:
            continue
        if len(node.outputs) == 1:
            sv = folder.symbolic(node)
            if sv is not None:
                folder.sym[node.outputs[0]] = sv
        op, ins, out = node.op_type, node.inputs, node.outputs[0]
        if op == "Range" and len(ins) == 3:
            start, delta = _int_list(ins[0]), _int_list(ins[2])
            limit = folder.shape_value(ins[1])
            if start == [0] and delta == [1] and limit is not None and len(limit.dims) == 1:
                hint(out, [limit.dims[0]])
        elif op == "Expand" and len(ins) == 2:
            target, x = folder.shape_value(ins[1]), dims(ins[0])
            if target is not None and not target.scalar and x is not None:
                b = _broadcast_dims([x, list(target.dims)])
                if b is not None:
                    hint(out, b)
        elif op == "Slice" and len(ins) >= 3:
            data = dims(ins[0])
            starts, ends = _int_list(ins[1]), folder.shape_value(ins[2])
            axes = _int_list(ins[3]) if len(ins) > 3 and ins[3] is not None else [0]
            steps = _int_list(ins[4]) if len(ins) > 4 and ins[4] is not None else [1]
            if (data is not None and starts == [0] and ends is not None and len(ends.dims) == 1 and axes
                    and len(axes) == 1 and steps == [1]):
                a = axes[0] + len(data) if axes[0] < 0 else axes[0]
                d = ends.dims[0]
                if 0 <= a < len(data) and isinstance(d, _Sym) and isinstance(data[a], int):
                    mins[out] = {a: d}
                    hint(out, [None if i == a else x for i, x in enumerate(data)])  # other axes: unsliced
        elif op == "Gather" and len(ins) == 2 and ins[1] in mins:
            axis = _attr(node, "axis", 0)
            data = dims(ins[0])
            if data is not None and axis is not None:
                axis = axis + len(data) if axis < 0 else axis
                mins[out] = {axis + i: d for i, d in mins[ins[1]].items()}
        elif op in _BROADCASTING and any(v in mins for v in ins if v is not None):
            shapes = [dims(v) for v in ins]
            if all(sh is not None for sh in shapes):
                b = _broadcast_dims(shapes)
                if b is not None:
                    hint(out, b)
    return hints


def _apply_hints(proto: onnx.ModelProto, hints: dict[str, list], model: ir.Model) -> None:
    """Write ``hints`` as value_info of ``proto`` (replacing earlier hints for those names)."""
    produced = {v.name: v for n in model.graph for v in n.outputs if v.name}
    keep = [vi for vi in proto.graph.value_info if vi.name not in hints and vi.name in produced]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(keep)
    for name, dims in hints.items():
        value = produced.get(name)
        if value is None or value.dtype is None:
            continue
        proto.graph.value_info.append(onnx.helper.make_tensor_value_info(name, int(value.dtype), dims))


def fold_constants(model: ir.Model, *, max_rounds: int = 8) -> int:
    """Fold the model in place; returns the number of nodes folded.

    Rounds repeat while a shape fold happened, since each one can make shape
    inference learn more static dimensions downstream. The first round's inference
    proto is kept in step with the folds (see ``ProtoEditor``), so later rounds do
    not serialize the model again.
    """
    total = 0
    editor: ProtoEditor | None = None
    for round_ in range(max_rounds):
        if round_ == 0:
            inferred = infer_shapes(model)  # cached when an earlier pass already inferred
            proto = cached_inference_proto(model)
            editor = ProtoEditor(proto) if proto is not None else None
        elif editor is not None and not editor.dirty:
            editor.flush()
            inferred = infer_from_proto(model, editor.proto)
        else:
            proto = inference_proto(model)
            editor = ProtoEditor(proto) if proto is not None else None
            inferred = infer_from_proto(model, proto) if proto is not None else {}
        if editor is not None:
            # Hints can enable more hints (a refined Add gives an Expand a known input...).
            for _ in range(MAX_HINT_ROUNDS):
                hints = _shape_hints(model, inferred)
                if not hints:
                    break
                editor.flush()
                _apply_hints(editor.proto, hints, model)
                inferred = infer_from_proto(model, editor.proto)
        folder = _Folder(model, inferred, editor)
        for graph in (model.graph, *model.graph.subgraphs()):
            folder.fold_graph(graph)
        for function in model.functions.values():
            folder.fold_graph(function)
        total += folder.folded
        if not folder.shape_folds:
            break
    if total and editor is not None and not editor.dirty:
        # The next pass's shape inference starts from this proto instead of serializing.
        editor.flush()
        remember_inference_proto(model, editor.proto)
    return total


@register_pass(
    "fold-constants",
    "Evaluate nodes whose inputs are constant, and shape arithmetic fixed by static dims, into initializers",
    preset_order=100,
)
class FoldConstants(ir.passes.InPlacePass):
    """See the module docstring for the rewrite and its conditions."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.rewrites = fold_constants(model)
        return ir.passes.PassResult(model, modified=self.rewrites > 0)
