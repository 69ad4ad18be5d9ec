"""``fuse-pad``: fold a zero constant Pad into the padding of the Conv or AveragePool after it.

Rewrite::

    Conv(Pad(X, pads=p, mode="constant", value=0), W, b, pads=q)  ->  Conv(X, W, b, pads=q + p_spatial)
    AveragePool(Pad(X, ...), pads=q, count_include_pad=1)           ->  AveragePool(X, pads=q + p_spatial)

Conv and AveragePool pad with zeros themselves, so padding with zeros first and then
convolving sees exactly the same numbers. For AveragePool this holds only with
``count_include_pad = 1`` (otherwise the pool's own padding is left out of the divisor,
while zeros from an explicit Pad are counted) and ``ceil_mode = 0`` (a ceil-mode window may
run past the padded end, where the two forms count differently). MaxPool is not handled:
its padding is -inf, not 0.

Conditions: Pad mode ``constant`` with value 0 (or no value); pads constant, non-negative
(negative pads crop) and zero on the batch and channel axes (only spatial padding can move
into the consumer); the consumer's ``auto_pad`` NOTSET or VALID (VALID becomes explicit
pads); the Pad output feeds only this consumer. All Pad opset forms: ``paddings`` attribute
(opset 1), ``pads``/``value`` attributes (2-10), ``pads``/``constant_value``/``axes`` inputs
(11+).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes._fusion_util import NodeRewritePass, attr, const_array, known_rank, remove_nodes
from onnxopt.passes.fuse_bias import producer_of
from onnxopt.passes.registry import register_pass


def pad_amounts(pad: ir.Node, opset: int, rank: int | None) -> np.ndarray | None:
    """The Pad's [begin..., end...] amounts over all axes for a zero constant pad, else None."""
    if attr(pad, "mode", "constant") != "constant":
        return None
    if opset < 11:
        pads = attr(pad, "pads") if opset >= 2 else attr(pad, "paddings")
        if pads is None or float(attr(pad, "value", 0.0)) != 0.0:
            return None
        return np.asarray(pads, dtype=np.int64)
    if len(pad.inputs) < 2:
        return None
    pads = const_array(pad.inputs[1])
    if pads is None:
        return None
    pads = pads.astype(np.int64).reshape(-1)
    if len(pad.inputs) > 2 and pad.inputs[2] is not None:
        value = const_array(pad.inputs[2])
        if value is None or value.size != 1 or float(value.reshape(-1)[0]) != 0.0:
            return None
    if len(pad.inputs) > 3 and pad.inputs[3] is not None:
        axes = const_array(pad.inputs[3])
        if axes is None or rank is None:
            return None
        full = np.zeros(2 * rank, dtype=np.int64)
        k = axes.size
        for i, a in enumerate(axes.reshape(-1).astype(int)):
            a = a + rank if a < 0 else a
            if not 0 <= a < rank:
                return None
            full[a] += pads[i]
            full[a + rank] += pads[i + k]
        return full
    return pads


@register_pass(
    "fuse-pad",
    "Fold a zero constant Pad over spatial axes into the next Conv's or AveragePool's (count_include_pad=1) pads",
    preset_order=350,
)
class FusePadPass(NodeRewritePass):
    __doc__ = __doc__
    op_types = frozenset({"Conv", "AveragePool"})

    def rewrite(self, graph, op: ir.Node) -> bool:
        if not op.inputs or op.inputs[0] is None:
            return False
        pad = producer_of(op.inputs[0], frozenset({"Pad"}), op)
        if pad is None or pad.inputs[0] is None:
            return False
        if attr(op, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return False
        if op.op_type == "AveragePool" and (int(attr(op, "count_include_pad", 0)) != 1 or int(attr(op, "ceil_mode", 0))):
            return False
        if op.op_type == "Conv":
            w = const_array(op.inputs[1]) if len(op.inputs) > 1 else None
            rank = w.ndim if w is not None else (len(op.inputs[1].shape) if op.inputs[1] is not None and op.inputs[1].shape is not None else None)
        else:
            kernel = attr(op, "kernel_shape")
            rank = len(kernel) + 2 if kernel is not None else None
        if rank is None or known_rank(pad.inputs[0]) not in (None, rank):
            return False
        amounts = pad_amounts(pad, self.opset(graph) or 1, rank)
        if amounts is None or amounts.size != 2 * rank or np.any(amounts < 0):
            return False
        begin, end = amounts[:rank], amounts[rank:]
        if begin[0] or begin[1] or end[0] or end[1]:
            return False
        spatial = rank - 2
        old = attr(op, "pads") if attr(op, "auto_pad", "NOTSET") == "NOTSET" else None
        old = np.asarray(old if old is not None else [0] * (2 * spatial), dtype=np.int64)
        new = old + np.concatenate([begin[2:], end[2:]])
        op.attributes["pads"] = ir.AttrInt64s("pads", [int(v) for v in new])
        if "auto_pad" in op.attributes:
            op.attributes["auto_pad"] = ir.AttrString("auto_pad", "NOTSET")
        op.replace_input_with(0, pad.inputs[0])
        remove_nodes(pad)
        return True
