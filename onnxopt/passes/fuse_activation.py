"""``fuse-hardswish``: the decomposed hard-swish into ``HardSwish`` (opset >= 14).

Rewrites (``x`` any float tensor)::

    Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)      ->  HardSwish(x)
    Mul(Mul(x, Clip(Add(x, 3), 0, 6)), 1/6)    ->  HardSwish(x)
    Mul(x, HardSigmoid(x, alpha=1/6, beta=0.5)) ->  HardSwish(x)

``HardSwish(x) = x * max(0, min(1, x/6 + 1/2))`` and ``clip(x + 3, 0, 6) / 6`` is the same
function, so the result differs by float rounding only. Exporters (Paddle2ONNX, older
PyTorch opsets) write the decomposed form because HardSwish only exists from opset 14, so
this fires after ``--target-opset 14`` (or newer) on such models. Conditions: the constants
equal 3, 0, 6 (or 1/6, 1/6 and 0.5) within 1e-6 relative; Clip's bounds are constant inputs
(opset >= 11) or attributes; the Mul reads the same ``x`` as the Add; every intermediate
feeds only the pattern. Runs before fuse-scale so a following constant Mul is not merged
into the Div first.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxopt.passes._fusion_util import NodeRewritePass, attr, producer_op, remove_nodes, scalar_value, take_over
from onnxopt.passes.fuse_transformer import _close, _const_and_other, _only_for
from onnxopt.passes.registry import register_pass


@register_pass(
    "fuse-hardswish",
    "x*Clip(x+3,0,6)/6 and x*HardSigmoid(x) -> HardSwish (opset >= 14)",
    preset_order=306,
)
class FuseHardSwishPass(NodeRewritePass):
    __doc__ = __doc__
    op_types = frozenset({"Div", "Mul"})

    def call(self, model):
        if (model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)) or 1) < 14 and not model.functions:
            self.rewrites = 0
            return ir.passes.PassResult(model, modified=False)
        return super().call(model)

    def rewrite(self, graph, node: ir.Node) -> bool:
        if (self.opset(graph) or 1) < 14:
            return False
        match = self._hardsigmoid_form(node) if node.op_type == "Mul" else None
        if match is None:
            match = self._clip_form(node)
        if match is None:
            return False
        x, nodes = match
        y = node.outputs[0]
        hs = ir.node("HardSwish", [x], name=node.name or None, outputs=[ir.Value(name=self.names.new(f"{y.name}_hardswish"))])
        graph.insert_before(node, hs)
        take_over(self.names, y, hs.outputs[0])
        remove_nodes(node, *nodes)
        return True

    @staticmethod
    def _hardsigmoid_form(node: ir.Node):
        if len(node.inputs) != 2:
            return None
        for x, other in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
            hsig = producer_op(other, "HardSigmoid")
            if hsig is None or hsig.inputs[0] is not x or not _only_for(other, node):
                continue
            if _close(float(attr(hsig, "alpha", 0.2)), 1 / 6, 1e-6) and _close(float(attr(hsig, "beta", 0.5)), 0.5, 1e-6):
                return x, [hsig]
        return None

    @staticmethod
    def _clip_form(node: ir.Node):
        split = _const_and_other(node)
        if split is None:
            return None
        k = scalar_value(split[0])
        if node.op_type == "Div":
            if node.inputs[1] is not split[0] or not _close(k, 6.0, 1e-6):
                return None
        elif not _close(k, 1 / 6, 1e-6):
            return None
        mul = producer_op(split[1], "Mul")
        if mul is None or len(mul.inputs) != 2 or not _only_for(split[1], node):
            return None
        for x, c in ((mul.inputs[0], mul.inputs[1]), (mul.inputs[1], mul.inputs[0])):
            clip = producer_op(c, "Clip")
            if clip is None or not _only_for(c, mul):
                continue
            if len(clip.inputs) >= 3:
                lo, hi = scalar_value(clip.inputs[1]), scalar_value(clip.inputs[2])
            else:
                lo, hi = attr(clip, "min"), attr(clip, "max")
            if lo is None or hi is None or lo != 0.0 or not _close(float(hi), 6.0, 1e-6):
                continue
            add = producer_op(clip.inputs[0], "Add")
            if add is None or not _only_for(clip.inputs[0], clip):
                continue
            add_split = _const_and_other(add)
            if add_split is None or add_split[1] is not x or not _close(scalar_value(add_split[0]), 3.0, 1e-6):
                continue
            return x, [mul, clip, add]
        return None
