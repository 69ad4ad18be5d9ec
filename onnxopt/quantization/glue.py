"""QDQ around the elementwise "glue" of a CNN (Add, Mul, Concat, Resize between activations).

With only the convolutions quantized, ONNX Runtime runs everything between two QLinearConvs
in float: each such op reads dequantized tensors and writes float ones. In a detector neck
(FPN: SE-block ``x * HardSigmoid(.)`` and ``x + .``, nearest upsampling, the top-down Adds,
the final Concat) that is a large part of the int8 model's time. Giving every float
activation input and the output of these ops a Q/DQ pair lets ORT fuse them:

* ``Add`` / ``Mul`` of two activations -> ``QLinearAdd`` / ``QLinearMul``;
* ``Concat`` -> ``QLinearConcat``;
* ``Resize`` -> a uint8 Resize (ORT drops the DQ/Q pair when both sides share scale and zero
  point, so the output reuses the input's quantization parameters).

Only for models whose quantized layers are all Conv (CNNs): transformer residual Adds and
attention products stay float (their outliers are what SmoothQuant and the mask rules are
about). Ops with a constant operand are left alone (a scalar affine is folded by
:mod:`.qdq`), as are ops writing a graph output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import onnx_ir as ir

GLUE_OPS = ("Add", "Mul", "Concat", "Resize")
_FLOAT = (ir.DataType.FLOAT, None)


@dataclasses.dataclass
class GlueNode:
    name: str
    op_type: str
    inputs: list[tuple[int, str]]  # (input index, tensor name) of the activation inputs
    output: str


def is_constant(value: ir.Value | None) -> bool:
    """An initializer, a constant-valued value or a Constant node's output."""
    return value is not None and (value.is_initializer() or value.const_value is not None
                                  or (value.producer() is not None and value.producer().op_type == "Constant"))


def find_glue(model: ir.Model, layers: Sequence) -> list[GlueNode]:
    """The Add/Mul/Concat/Resize nodes to quantize, or none when ``layers`` holds anything but Conv.

    Only glue next to the int8 part of the graph (:func:`glue_near_quantized`).
    """
    if not layers or any(l.op_type != "Conv" for l in layers):
        return []
    return glue_near_quantized(model, _all_glue(model), layers)


# Nodes that bound a float "island" of glue and element-wise ops: the layers (quantized or not).
_COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def glue_near_quantized(model: ir.Model, glue: Sequence[GlueNode], layers: Sequence) -> list[GlueNode]:
    """The glue nodes whose island touches a quantized layer.

    An island is what is connected through float tensors without crossing a Conv, MatMul or
    Gemm (glue, activations, pooling). In an island bounded only by float layers (the
    float front, ``--exclude``, the ``--max-drop`` fallback) a QLinearAdd/Mul would only add
    Quantize/Dequantize pairs, and their rounding, between float ops.
    """
    if not glue:
        return []
    selected = {l.name for l in layers}
    nodes = {n.name: n for n in model.graph}
    island_of: dict[int, bool] = {}  # id(island member) -> whether the island touches a selected layer

    def touches(start: ir.Node) -> bool:
        if id(start) in island_of:
            return island_of[id(start)]
        # Walk the island; its bounding layers are seen but not walked through (a layer
        # bounds two islands, so only the members take the answer).
        seen, members, found = {id(start)}, [start], False
        for n in members:  # grows while walking
            near = [v.producer() for v in n.inputs if v is not None and v.dtype in _FLOAT and not is_constant(v)]
            near += [c for v in n.outputs if v.dtype in _FLOAT for c in v.consumers()]
            for m in near:
                if m is None or id(m) in seen:
                    continue
                seen.add(id(m))
                if m.op_type in _COMPUTE_OPS and m.domain in ("", "ai.onnx"):
                    found = found or m.name in selected
                else:
                    members.append(m)
        for m in members:
            island_of[id(m)] = found
        return found

    return [g for g in glue if g.name in nodes and touches(nodes[g.name])]


def _all_glue(model: ir.Model) -> list[GlueNode]:
    out: list[GlueNode] = []
    for node in model.graph:
        if node.op_type not in GLUE_OPS or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
            continue
        y = node.outputs[0]
        if y.is_graph_output() or y.dtype not in _FLOAT or not list(y.uses()):
            continue
        if node.op_type == "Resize":
            data = node.inputs[0]
            if data is None or is_constant(data) or data.dtype not in _FLOAT:
                continue
            out.append(GlueNode(node.name, node.op_type, [(0, data.name)], y.name))
            continue
        if node.op_type in ("Add", "Mul") and len(node.inputs) != 2:
            continue
        ins = list(enumerate(node.inputs))
        if any(v is None or is_constant(v) or v.dtype not in _FLOAT for _, v in ins):
            continue
        out.append(GlueNode(node.name, node.op_type, [(i, v.name) for i, v in ins], y.name))
    return out


def glue_tensors(glue: Sequence[GlueNode]) -> set[str]:
    """Every tensor whose range the glue needs (Resize outputs reuse their input's)."""
    names: set[str] = set()
    for g in glue:
        names.update(t for _, t in g.inputs)
        if g.op_type != "Resize":
            names.add(g.output)
    return names


def usable_glue(glue: Sequence[GlueNode], ranges: dict) -> list[GlueNode]:
    """The glue nodes whose every tensor has a range in ``ranges`` (a calibrated, usable one)."""
    return [g for g in glue if all(t in ranges for t in glue_tensors([g]))]

