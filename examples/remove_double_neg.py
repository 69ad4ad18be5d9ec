"""A custom onnxopt pass: Neg(Neg(x)) -> x.

Run it from the command line:
    onnxopt optimize model.onnx -o model.opt.onnx --plugin examples/remove_double_neg.py --passes remove-double-neg,remove-unused
or from Python:
    import onnxopt
    from remove_double_neg import RemoveDoubleNeg
    result = onnxopt.optimize("model.onnx", passes=[RemoveDoubleNeg(), "remove-unused"])
"""

import onnx_ir as ir

import onnxopt


@onnxopt.register_pass("remove-double-neg", "Neg(Neg(x)) -> x")
class RemoveDoubleNeg(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.rewrites = 0
        for node in list(model.graph):
            if node.op_type != "Neg" or node.domain not in ("", "ai.onnx"):
                continue
            inner = node.inputs[0].producer()
            if inner is None or inner.op_type != "Neg" or node.outputs[0].is_graph_output():
                continue
            # Consumers of the outer Neg read x directly; unused nodes are removed later.
            node.outputs[0].replace_all_uses_with(inner.inputs[0])
            self.rewrites += 1
        return ir.passes.PassResult(model, modified=self.rewrites > 0)
