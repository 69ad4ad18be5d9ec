"""Channel dependency groups of a convolutional graph: which channels must go together.

Removing output channel ``c`` of a Conv is only valid if every op that sees that channel
is changed with it. A *channel space* is one set of channels tied together; this module
walks the graph once, in topological order, and gives every float tensor on the way a
*layout*: the list of channel spaces along its channel axis (axis 1 of an NCHW tensor, the
last axis of a MatMul's features). Most layouts have one space; a Concat along the channels
gives the concatenation of its inputs' layouts.

* A ``Conv`` with group 1 (or a ``ConvTranspose`` with group 1) and a constant weight
  starts a new space for its output: its output channels ``W[c]`` (``W[:, c]`` for a
  ConvTranspose) and bias ``b[c]``. It *reads* its input's spaces through its weight's input
  channels ``W[:, c]`` (``W[c]`` for a ConvTranspose).
* A depthwise ``Conv`` (group = input channels = output channels) passes its input's layout
  through: channel ``c`` in is channel ``c`` out, and ``W[c]``, ``b[c]`` and ``group`` follow.
* Element-wise unary ops, pools, ``Resize`` with channel scale 1, ``Pad`` without channel
  padding, ``Flatten`` after a global pool, ``BatchNormalization``/``InstanceNormalization``
  (their per-channel parameters follow) pass the layout through.
* A binary element-wise op (``Add``, ``Mul``, ...) of two activations with the same
  channel count *ties* their spaces (a residual Add, a squeeze-excite Mul): the spaces are
  merged, so the same channels go in all their producers. A per-channel constant operand
  follows the channels; a scalar one, or an activation with one channel (broadcast), does not
  tie anything.
* ``Gemm`` (``transA`` = 0) and a ``MatMul`` with a constant 2-D weight ``B`` read their
  input's last axis (rows ``B[c]``, ``B[:, c]`` with ``transB``) and start a space of output
  features on the last axis (columns of ``B``, Gemm's bias ``C``): a transformer's FFN
  (MatMul -> bias Add -> GELU -> MatMul) or an MLP head. Pools, Resize, Pad, convs and
  normalisations apply only to channels on axis 1; ``LayerNormalization``, ``Softmax`` and
  reductions read all channels together and pin.
* Anything else (``Reshape``, ``Transpose``, ``Split``, ``Slice``, an unknown or custom op,
  a subgraph, a graph output) *pins* every space it sees: those channels stay.

The result is a list of :class:`ChannelSpace` with, for each, the records of where its
channels appear (``Use``), so :mod:`.api` can pick channels and cut every tensor that
holds them in one step.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxopt.passes._fusion_util import attr

__all__ = ["ChannelSpace", "Segment", "Use", "find_channel_spaces"]

_STD = ("", "ai.onnx")

# Ops whose output has the input's channels, element by element or per channel window.
_PASS_THROUGH = frozenset({
    "Relu", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Clip", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Erf", "Gelu", "Mish",
    "ThresholdedRelu", "Floor", "Ceil", "Round", "Sin", "Cos", "Identity", "Dropout",
    "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
})
_GLOBAL_POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
_SPATIAL = frozenset({"MaxPool", "AveragePool", "LpPool"}) | _GLOBAL_POOLS
_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "PRelu"})
# Per-channel when they reduce spatial axes only (see _Analysis.reduce_layout).
_REDUCE = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceLogSumExp",
                     "ReduceSumSquare", "ReduceProd", "ReduceLogSum"})
_NORMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}


@dataclasses.dataclass
class Segment:
    """``size`` channels of ``space`` at channel offset ``offset`` of a tensor."""

    space: ChannelSpace
    offset: int
    size: int


@dataclasses.dataclass
class Use:
    """A place where channels of one or more spaces appear: initializer input ``index`` of
    ``node`` is cut along ``axis`` (``kind`` says how the node uses it), laid out as ``layout``
    (the segments of the tensor the node reads or writes)."""

    kind: str  # "produce", "depthwise", "param", "consume", "shape" (a Reshape's [-1, C])
    node: ir.Node
    index: int
    axis: int
    layout: tuple[Segment, ...]
    act_axis: int = 1  # the channel axis of the activation the node reads or writes


class ChannelSpace:
    """A set of channels that can only be removed together (see the module docstring)."""

    def __init__(self, sid: int, channels: int):
        self.id = sid
        self.channels = channels
        self.uses: list[Use] = []
        self.values: list[ir.Value] = []
        self.pinned: list[str] = []
        self._parent: ChannelSpace = self

    def root(self) -> ChannelSpace:
        s = self
        while s._parent is not s:
            s._parent = s._parent._parent
            s = s._parent
        return s

    @property
    def producers(self) -> list[ir.Node]:
        return [u.node for u in self.uses if u.kind == "produce" and u.index == 1]

    @property
    def consumers(self) -> list[ir.Node]:
        return list({id(u.node): u.node for u in self.uses if u.kind == "consume"}.values())

    def pin(self, why: str) -> None:
        if why not in self.pinned:
            self.pinned.append(why)

    def __repr__(self) -> str:
        return f"ChannelSpace({self.id}, C={self.channels}, producers={[n.name for n in self.producers]}, pinned={self.pinned})"


@dataclasses.dataclass
class _Layout:
    segments: tuple[Segment, ...]
    rank: int | None
    spatial_one: bool = False  # after a global pool: [N, C, 1, 1]
    last: bool = False  # channels on the last axis (MatMul/Gemm features), else on axis 1

    @property
    def axis(self) -> int | None:
        """The channel axis, non-negative; None when the rank is unknown and it is the last."""
        if not self.last:
            return 1
        return None if self.rank is None else self.rank - 1

    @property
    def nchw(self) -> bool:
        """Channels on axis 1 of a tensor with spatial axes after it (pools, Resize, Pad apply)."""
        return not self.last and (self.rank is None or self.rank >= 3)

    @property
    def channels(self) -> int:
        return sum(s.size for s in self.segments)

    def spaces(self) -> list[ChannelSpace]:
        return [s.space.root() for s in self.segments]


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


class _Walker:
    def __init__(self, model: ir.Model):
        self.layouts: dict[int, _Layout] = {}  # id(value) -> layout
        self.spaces: list[ChannelSpace] = []
        self.opset = model.opset_imports.get("", 1)

    def new_space(self, channels: int) -> ChannelSpace:
        s = ChannelSpace(len(self.spaces), channels)
        self.spaces.append(s)
        return s

    def layout(self, value: ir.Value | None) -> _Layout | None:
        return None if value is None else self.layouts.get(id(value))

    def set(self, value: ir.Value, layout: _Layout) -> None:
        self.layouts[id(value)] = layout
        for seg in layout.segments:
            seg.space.root().values.append(value)

    def pin_value(self, value: ir.Value | None, why: str) -> None:
        lay = self.layout(value)
        if lay is not None:
            for s in lay.spaces():
                s.pin(why)

    def use(self, kind: str, node: ir.Node, index: int, axis: int, layout: _Layout) -> None:
        u = Use(kind, node, index, axis, layout.segments, layout.axis if layout.axis is not None else -1)
        for seg in layout.segments:
            seg.space.root().uses.append(u)

    def merge(self, a: ChannelSpace, b: ChannelSpace) -> ChannelSpace:
        a, b = a.root(), b.root()
        if a is b:
            return a
        b._parent = a
        a.uses.extend(b.uses)
        a.values.extend(b.values)
        for why in b.pinned:
            a.pin(why)
        return a

    def unknown(self, node: ir.Node, why: str) -> None:
        """Pin what ``node`` reads; its outputs get no layout (a Conv reading one cuts nothing
        on its input side)."""
        for v in node.inputs:
            self.pin_value(v, why)

    def param(self, node: ir.Node, index: int, lay: _Layout) -> bool:
        """A constant operand of an element-wise op on ``lay``: follows the channels if per
        channel, nothing to do if broadcast over them; False if it cannot be cut."""
        arr = _const(node.inputs[index])
        if arr is None:
            return False
        if lay.last:  # broadcasting aligns the last axes: the constant's last axis is the channels'
            if arr.ndim == 0 or arr.shape[-1] == 1:
                return True
            axis = arr.ndim - 1
        elif lay.rank is None:
            return arr.ndim == 0 or arr.size == 1
        else:
            axis = lay.axis - (lay.rank - arr.ndim)
        if axis < 0 or arr.shape[axis] == 1:
            return True
        if arr.shape[axis] != lay.channels:
            return False
        self.use("param", node, index, axis, lay)
        return True

    def visit(self, node: ir.Node) -> None:
        op = node.op_type
        if node.domain not in _STD or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                                          for a in node.attributes.values()):
            return self.unknown(node, f"read by {op} ({node.domain or 'ai.onnx'}) {node.name}")
        ins = node.inputs
        x = ins[0] if ins else None
        lay = self.layout(x)
        if op in ("Conv", "ConvTranspose"):
            return self.conv(node, lay)
        if op in ("Gemm", "MatMul"):
            return self.matmul(node, lay)
        if op in _BINARY and len(ins) == 2:  # either operand may be the activation
            return self.binary(node)
        if lay is None:
            return self.unknown(node, f"read by {op} {node.name}")
        if op in _PASS_THROUGH:
            if op in _SPATIAL and not lay.nchw:
                return self.unknown(node, f"read by {op} {node.name} (channels not on axis 1)")
            if op == "Clip" and any(_const(v) is None or _const(v).size != 1 for v in ins[1:] if v is not None):
                return self.unknown(node, f"read by Clip {node.name} with non-scalar bounds")
            if op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].uses():
                return self.unknown(node, f"read by Dropout {node.name} with a used mask")
            out = dataclasses.replace(lay, spatial_one=lay.spatial_one or op in _GLOBAL_POOLS)
            return self.set(node.outputs[0], out)
        if op in _NORMS:
            if not lay.nchw or any(not self.param_exact(node, i, lay) for i in _NORMS[op] if i < len(ins)):
                return self.unknown(node, f"read by {op} {node.name} with non-constant parameters")
            return self.set(node.outputs[0], lay)
        if op == "Concat":
            return self.concat(node)
        if op == "Flatten" and lay.nchw and lay.spatial_one and attr(node, "axis", 1) == 1 and lay.rank is not None:
            return self.set(node.outputs[0], _Layout(lay.segments, 2, True, last=True))
        if op == "Reshape" and lay.nchw and lay.spatial_one and self.flattens(node, lay):
            # [N, C, 1, 1] -> [-1, C] (dynamo's flatten after a pool): C is written in the
            # shape constant, which the cut then rewrites (a "shape" use).
            self.use("shape", node, 1, 0, lay)
            return self.set(node.outputs[0], _Layout(lay.segments, 2, True, last=True))
        if op in _REDUCE and lay.nchw:
            out = self.reduce_layout(node, lay)
            if out is not None:
                return self.set(node.outputs[0], out)
        if op in ("Resize", "Upsample") and lay.nchw and self.resize_keeps_channels(node):
            return self.set(node.outputs[0], lay)
        if op == "Pad" and lay.nchw and self.pad_keeps_channels(node, lay):
            return self.set(node.outputs[0], lay)
        return self.unknown(node, f"read by {op} {node.name}")

    def param_exact(self, node: ir.Node, index: int, lay: _Layout) -> bool:
        arr = _const(node.inputs[index])
        if arr is None or arr.ndim != 1 or arr.shape[0] != lay.channels:
            return False
        self.use("param", node, index, 0, lay)
        return True

    def flattens(self, node: ir.Node, lay: _Layout) -> bool:
        """Whether a Reshape's constant shape is [-1, C] (or [0, C] without allowzero) for this C."""
        shape = _const(node.inputs[1]) if len(node.inputs) > 1 else None
        if shape is None or shape.shape != (2,) or int(shape[1]) != lay.channels:
            return False
        first = int(shape[0])
        return first == -1 or (first == 0 and not attr(node, "allowzero", 0))

    def reduce_layout(self, node: ir.Node, lay: _Layout) -> _Layout | None:
        """A reduction over spatial axes only keeps every channel apart (``x.mean((2, 3))``,
        as dynamo exports global pooling and squeeze-excite): the output's layout, else None."""
        axes = attr(node, "axes", None)
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            axes = _const(node.inputs[1])
            if axes is None:
                return None  # axes computed at run time
        if axes is None or lay.rank is None:
            return None  # no axes: every axis, channels included
        axes = sorted({int(a) % lay.rank for a in np.asarray(axes).reshape(-1)})
        if not axes or axes[0] < 2:
            return None
        full = axes == list(range(2, lay.rank))
        if attr(node, "keepdims", 1):
            return dataclasses.replace(lay, spatial_one=lay.spatial_one or full)
        rank = lay.rank - len(axes)
        return _Layout(lay.segments, rank, spatial_one=lay.spatial_one or full, last=rank == 2)

    def resize_keeps_channels(self, node: ir.Node) -> bool:
        if node.op_type == "Upsample" or self.opset < 11:
            idx = 1 if len(node.inputs) > 1 else None
        else:
            idx = 2 if len(node.inputs) > 2 and node.inputs[2] is not None else None
            if idx is None:
                return False  # sizes: would have to change too
        scales = _const(node.inputs[idx]) if idx is not None else None
        return scales is not None and scales.size >= 2 and float(scales[0]) == 1.0 and float(scales[1]) == 1.0

    def pad_keeps_channels(self, node: ir.Node, lay: _Layout) -> bool:
        pads = attr(node, "pads", None) if self.opset < 11 else _const(node.inputs[1] if len(node.inputs) > 1 else None)
        if pads is None or lay.rank is None or (self.opset >= 18 and len(node.inputs) > 3 and node.inputs[3] is not None):
            return False
        pads = list(np.asarray(pads).reshape(-1))
        return len(pads) == 2 * lay.rank and pads[1] == 0 and pads[1 + lay.rank] == 0

    def conv(self, node: ir.Node, lay: _Layout | None) -> None:
        w = _const(node.inputs[1]) if len(node.inputs) > 1 else None
        bias_ok = len(node.inputs) < 3 or node.inputs[2] is None or _const(node.inputs[2]) is not None
        group = int(attr(node, "group", 1))
        if w is None or not bias_ok or w.ndim < 3:
            return self.unknown(node, f"read by {node.op_type} {node.name} (weight or bias not constant)")
        transpose = node.op_type == "ConvTranspose"
        c_in = w.shape[0] if transpose else w.shape[1] * group
        c_out = w.shape[1] * group if transpose else w.shape[0]
        if lay is not None and not lay.nchw:
            self.pin_value(node.inputs[0], f"read by {node.op_type} {node.name} with channels on the last axis")
            lay = None
        if lay is not None and lay.channels != c_in:
            self.pin_value(node.inputs[0], f"channel count mismatch at {node.name}")
            lay = None
        out = node.outputs[0]
        if not transpose and group > 1 and group == c_in == c_out and w.shape[1] == 1:
            if lay is None:
                return
            self.use("depthwise", node, 1, 0, lay)
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                self.use("depthwise", node, 2, 0, lay)
            return self.set(out, dataclasses.replace(lay, rank=w.ndim, spatial_one=False))
        if group != 1:
            self.pin_value(node.inputs[0], f"read by grouped {node.op_type} {node.name}")
            return
        if lay is not None:
            self.use("consume", node, 1, 0 if transpose else 1, lay)
        space = self.new_space(c_out)
        seg_lay = _Layout((Segment(space, 0, c_out),), w.ndim)
        self.use("produce", node, 1, 1 if transpose else 0, seg_lay)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            self.use("produce", node, 2, 0, seg_lay)
        self.set(out, seg_lay)

    def matmul(self, node: ir.Node, lay: _Layout | None) -> None:
        """``MatMul(x, B)`` with a constant 2-D ``B`` (or ``Gemm``, transA 0): reads x's last
        axis through B's rows (columns with transB) and starts a new space of output features
        (B's columns, Gemm's bias)."""
        b = _const(node.inputs[1]) if len(node.inputs) > 1 else None
        gemm = node.op_type == "Gemm"
        if b is None or b.ndim != 2 or (gemm and attr(node, "transA", 0)):
            return self.unknown(node, f"read by {node.op_type} {node.name}")
        trans_b = gemm and bool(attr(node, "transB", 0))
        k_axis, n_axis = (1, 0) if trans_b else (0, 1)
        if lay is not None:
            if not (lay.last or lay.rank == 2) or (gemm and lay.rank not in (2, None)):
                self.pin_value(node.inputs[0], f"read by {node.op_type} {node.name} (channels not on the last axis)")
            elif lay.channels != b.shape[k_axis]:
                self.pin_value(node.inputs[0], f"channel count mismatch at {node.name}")
            else:
                self.use("consume", node, 1, k_axis, dataclasses.replace(lay, last=True))
        n = int(b.shape[n_axis])
        x = node.inputs[0]
        rank = lay.rank if lay is not None else (2 if gemm else (len(x.shape) if x is not None and x.shape is not None else None))
        space = self.new_space(n)
        out = _Layout((Segment(space, 0, n),), rank, last=True)
        self.use("produce", node, 1, n_axis, out)
        if gemm and len(node.inputs) > 2 and node.inputs[2] is not None:
            c = _const(node.inputs[2])
            if c is None:
                space.pin(f"Gemm {node.name} with a non-constant C")
            elif c.ndim >= 1 and c.shape[-1] == n and c.size == n:
                self.use("produce", node, 2, c.ndim - 1, out)
            elif c.size != 1:
                space.pin(f"Gemm {node.name} whose C does not broadcast per feature")
        self.set(node.outputs[0], out)

    def binary(self, node: ir.Node) -> None:
        a, b = node.inputs
        la, lb = self.layout(a), self.layout(b)
        out = node.outputs[0]
        if la is not None and lb is not None:
            if la.last != lb.last and not (la.rank == lb.rank == 2):
                return self.unknown(node, f"{node.op_type} {node.name} of tensors with channels on different axes")
            if la.channels == lb.channels and len(la.segments) == 1 and len(lb.segments) == 1:
                s = self.merge(la.segments[0].space, lb.segments[0].space)
                rank = la.rank if la.rank == lb.rank else None
                if rank is None and not la.last:  # last-axis channels align whatever the ranks
                    s.pin(f"rank mismatch at {node.op_type} {node.name}")
                return self.set(out, _Layout((Segment(s, 0, la.channels),), rank, la.spatial_one and lb.spatial_one, la.last))
            for big, small in ((la, lb), (lb, la)):
                if small.channels == 1 and big.channels > 1 and small.rank == big.rank:
                    for s in small.spaces():
                        s.pin(f"broadcast over channels at {node.name}")
                    return self.set(out, dataclasses.replace(big, spatial_one=False))
            return self.unknown(node, f"{node.op_type} {node.name} of two channel layouts that differ")
        known, other_index = (la, 1) if la is not None else (lb, 0)
        if known is None:
            return
        if node.op_type == "PRelu" and other_index == 0:
            return self.unknown(node, f"PRelu {node.name} with a constant input")
        if not self.param(node, other_index, known):
            return self.unknown(node, f"read by {node.op_type} {node.name} with an operand that does not follow the channels")
        self.set(out, dataclasses.replace(known, spatial_one=False))

    def concat(self, node: ir.Node) -> None:
        lays = [self.layout(v) for v in node.inputs]
        ranks = {lay.rank for lay in lays if lay is not None}
        lasts = {lay.last for lay in lays if lay is not None}
        axis = int(attr(node, "axis", 1))
        rank = next(iter(ranks)) if len(ranks) == 1 else None
        if any(lay is None for lay in lays) or rank is None or len(lasts) != 1:
            return self.unknown(node, f"read by Concat {node.name}")
        last = next(iter(lasts))
        if (axis % rank) != (rank - 1 if last else 1):
            return self.unknown(node, f"read by Concat {node.name} (not along the channels)")
        segs, off = [], 0
        for lay in lays:
            for s in lay.segments:
                segs.append(Segment(s.space.root(), off, s.size))
                off += s.size
        self.set(node.outputs[0], _Layout(tuple(segs), rank, last=last))


def find_channel_spaces(model: ir.Model) -> list[ChannelSpace]:
    """The channel spaces of ``model``'s main graph (see the module docstring); merged
    spaces appear once. Every space read by a graph output or an op this module does not
    know is pinned (``space.pinned`` says why)."""
    walker = _Walker(model)
    graph = model.graph
    for node in graph:
        walker.visit(node)
    # A subgraph (If/Loop/Scan body) may read outer tensors directly: those keep their channels.
    for node in graph.all_nodes():
        if node.graph is not graph:
            for v in node.inputs:
                walker.pin_value(v, f"read inside the subgraph of {node.name or node.op_type}")
    for v in graph.outputs:
        walker.pin_value(v, f"graph output {v.name}")
    roots = {id(s.root()): s.root() for s in walker.spaces}
    return list(roots.values())
