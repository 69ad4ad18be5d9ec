"""Inline the taken branch of an If whose condition is a constant.

Rewrite::

    y1, y2 = If(c) {then: ...; return t1, t2} {else: ...}     with c a constant true
    ->  <the then-branch's nodes, moved into the enclosing graph>; uses of y1, y2 read t1, t2

Exporters leave such Ifs behind when a Python ``if`` on a config flag or a traced shape
was captured as control flow; the dead branch costs nothing at run time but hides the
live one from every other pass (folding, fusions) and keeps its weights in the file.

Conditions: the If is in the standard domain; its condition is a constant (an
initializer that is not a graph input, or a Constant) with exactly one element.
The branch's nodes and initializers move into the enclosing graph (initializers
become Constant nodes when the enclosing graph is a function body); value names are
unique across a model's graphs (ONNX SSA), so nothing needs renaming. An If output
that is an output of the enclosing graph keeps its name: the branch value takes it
over when a moved node produces it, otherwise an Identity carries it (when the branch
returns an outer value directly). Nested Ifs are handled from the outside in, and the
pass repeats until none is left.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.passes.registry import register_pass

_STANDARD_DOMAINS = ("", "ai.onnx")


def _constant_condition(value: ir.Value | None) -> bool | None:
    if value is None or value.is_graph_input():
        return None
    tensor = value.const_value
    if tensor is None:
        producer = value.producer()
        if producer is None or producer.op_type != "Constant" or "value" not in producer.attributes:
            return None
        tensor = producer.attributes["value"].value
    try:
        array = tensor.numpy()
    except Exception:
        return None
    if array.size != 1:
        return None
    return bool(np.asarray(array).reshape(-1)[0])


def _inline(parent: ir.Graph | ir.Function, if_node: ir.Node, branch: ir.Graph) -> None:
    in_function = isinstance(parent, ir.Function)
    moved: set[int] = set()
    # Branch initializers become initializers (or Constants) of the enclosing graph.
    for name, init in list(branch.initializers.items()):
        branch.initializers.pop(name)
        if in_function:
            const = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", init.const_value)])
            parent.insert_before(if_node, const)
            init.replace_all_uses_with(const.outputs[0])
            const.outputs[0].name = name
            const.outputs[0].type = init.type
            const.outputs[0].shape = init.shape
        else:
            parent.register_initializer(init)
    branch_outputs = list(branch.outputs)
    branch.outputs.clear()
    nodes = list(branch)
    for node in nodes:
        branch.remove(node)
        moved.add(id(node))
    parent.insert_before(if_node, nodes)
    for out, value in zip(if_node.outputs, branch_outputs):
        if out.is_graph_output():
            producer = value.producer()
            if producer is not None and id(producer) in moved and not value.is_graph_output():
                name = out.name
                out.name = f"{name}__if"
                value.name = name
                if value.shape is None:
                    value.shape = out.shape
                if value.type is None:
                    value.type = out.type
            else:
                ident = ir.Node("", "Identity", [value])
                parent.insert_before(if_node, ident)
                ident.outputs[0].type = out.type
                ident.outputs[0].shape = out.shape
                name = out.name
                out.name = f"{name}__if"
                ident.outputs[0].name = name
                value = ident.outputs[0]
        out.replace_all_uses_with(value, replace_graph_outputs=True)
    parent.remove(if_node, safe=True)


def fold_ifs(model: ir.Model) -> int:
    """Inline every If with a constant condition, in all graphs; returns how many."""
    count = 0
    while True:
        done = 0
        for graph in (model.graph, *model.graph.subgraphs(), *model.functions.values()):
            owner = graph.graph if isinstance(graph, ir.Function) else graph
            for node in list(graph):
                if node.graph is not owner or node.op_type != "If" or node.domain not in _STANDARD_DOMAINS:
                    continue
                cond = _constant_condition(node.inputs[0] if node.inputs else None)
                if cond is None:
                    continue
                attr = node.attributes.get("then_branch" if cond else "else_branch")
                if attr is None or attr.type != ir.AttributeType.GRAPH:
                    continue
                _inline(graph, node, attr.value)
                done += 1
            if done:
                break  # the set of graphs changed: walk them again
        count += done
        if not done:
            return count


@register_pass(
    "fold-if",
    "Inline the taken branch of an If whose condition is constant",
    preset_order=110,
)
class FoldIf(ir.passes.InPlacePass):
    """See the module docstring for the rewrite and its conditions."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.rewrites = fold_ifs(model)
        return ir.passes.PassResult(model, modified=self.rewrites > 0)
