"""onnx-ir's own cleanup passes, registered under onnxopt names.

They are used as they are: onnx-ir maintains them, they descend into subgraphs and
keep graph outputs intact. Each is measured in the statistics like any other pass.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxopt.passes.registry import register_pass


def _own_constant_tensors(graph: ir.Graph) -> None:
    """Give each Constant node's tensor its own object before it becomes an initializer.

    The pass manager's working copy shares tensor objects with the caller's model, and
    onnx-ir's serializer renames an initializer's tensor after its value: without a copy,
    saving the result would rename the tensor inside the caller's Constant node too.
    Only proto-backed tensors (what a loaded Constant holds) are copied, bytes and all.
    """
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        attr = node.attributes.get("value")
        if attr is not None and isinstance(attr.value, ir.TensorProtoTensor):
            proto = onnx.TensorProto()
            proto.CopyFrom(attr.value.raw)
            node.attributes["value"] = ir.AttrTensor("value", ir.TensorProtoTensor(proto))


class _LiftConstants(common.LiftConstantsToInitializersPass):
    """onnx-ir's pass, plus the IR < 4 rule: every initializer must also be a graph input.

    Models of IR version 3 (opset <= 8 exports) fail the checker ("in initializer but
    not in graph input") if a lifted constant is not listed as an input, so there the
    new main-graph initializers are appended to the inputs (ORT then treats them as
    overridable inputs with a default; the inputs a caller must feed do not change).
    """

    def call(self, model):
        _own_constant_tensors(model.graph)
        result = super().call(model)
        if result.modified and model.ir_version is not None and model.ir_version < 4:
            listed = {v.name for v in model.graph.inputs}
            for name, value in model.graph.initializers.items():
                if name not in listed:
                    model.graph.inputs.append(value)
        return result


register_pass(
    "lift-constants",
    "Turn Constant nodes into initializers (onnx-ir LiftConstantsToInitializersPass)",
    preset_order=10,
    source="onnx-ir",
    factory=lambda: _LiftConstants(lift_all_constants=True, size_limit=0),
)
register_pass(
    "remove-initializers-from-inputs",
    "Drop initializers listed as graph inputs in old IR versions (onnx-ir)",
    source="onnx-ir",
    factory=common.RemoveInitializersFromInputsPass,
)
class _IdentityElimination(common.IdentityEliminationPass):
    """onnx-ir's pass, minus one case it gets wrong: ``b = Identity(a)`` with both graph outputs.

    A model returning one tensor twice (``return y, y`` in torch) exports exactly that;
    onnx-ir renames ``a`` to ``b``, so output ``a`` vanishes and ``b`` is listed twice.
    """

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        if (node.op_type == "Identity" and node.domain == "" and len(node.inputs) == 1 and node.inputs[0] is not None
                and node.outputs[0].is_graph_output() and node.inputs[0].is_graph_output()):
            return False
        return super()._try_eliminate_identity_node(node)


register_pass(
    "identity-elimination",
    "Remove Identity nodes, keeping graph output names (onnx-ir IdentityEliminationPass)",
    preset_order=20,
    source="onnx-ir",
    factory=_IdentityElimination,
)
register_pass(
    "cse",
    "Merge nodes computing the same op on the same inputs (onnx-ir CommonSubexpressionEliminationPass)",
    preset_order=800,
    source="onnx-ir",
    factory=common.CommonSubexpressionEliminationPass,
)
register_pass(
    "dedup-initializers",
    "Merge initializers with identical type, shape and bytes (onnx-ir DeduplicateInitializersPass)",
    preset_order=810,
    source="onnx-ir",
    factory=common.DeduplicateInitializersPass,
)
register_pass(
    "remove-unused",
    "Remove nodes, initializers, functions and opset imports nothing uses (onnx-ir)",
    preset_order=900,
    source="onnx-ir",
    factory=lambda: __import__("onnx_ir").passes.Sequential(
        common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()
    ),
)
register_pass(
    "topological-sort",
    "Order nodes topologically in every graph (onnx-ir TopologicalSortPass)",
    preset_order=1000,
    source="onnx-ir",
    factory=common.TopologicalSortPass,
)
