"""Raise the default-domain opset to 13 where per-channel QDQ needs it.

``QuantizeLinear``/``DequantizeLinear`` accept a per-channel ``axis`` only from opset 13.
Two ways to get there, tried in this order:

1. **Bump the opset import** when no op in the graph changed meaning between the model's
   opset and 13. Ops whose 13 form differs in a way the old attributes cannot express
   (``Squeeze``/``Unsqueeze``/``ReduceSum``/``Split`` moved ``axes``/``split`` to inputs;
   ``Softmax``/``LogSoftmax``/``Hardmax`` changed the meaning of ``axis`` for rank > 2;
   ``Dropout`` moved ``ratio`` to an input) rule this out. Everything else that gained a
   version in 12/13 only gained types (``Clip``, ``Resize``, ``Pad``, elementwise ops).
   The bumped model must pass the checker and give the same outputs in ONNX Runtime on a
   sample feed, else we go to 2.
2. **onnx's version converter**, which rewrites those ops. The converter turns the new
   ``axes`` inputs and many weights into ``Constant`` nodes; they are lifted back to
   initializers, because ONNX Runtime quantizes a weight that is not an initializer at
   run time (no speed-up at all).
"""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxopt.errors import OnnxoptError
from onnxopt.graph import all_nodes, opset_version

log = logging.getLogger(__name__)

_NEEDS_CONVERTER = {"Squeeze", "Unsqueeze", "ReduceSum", "Split", "Softmax", "LogSoftmax", "Hardmax", "Dropout"}


def _same_outputs(a: ir.Model, b: ir.Model, feeds) -> bool:
    from onnxopt.verify import compare_outputs, run_model

    try:
        ra = run_model(a, feeds)
        rb = run_model(b, feeds)
    except Exception:  # noqa: BLE001 - any runtime failure means "not equivalent"
        return False
    return all(d.within for d in compare_outputs(ra, rb, rtol=1e-4, atol=1e-5))


def _lift_constants(model: ir.Model) -> None:
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)


# The IR version that goes with opset 13. Older exports (opset <= 8) carry IR 3, where every
# initializer must also be a graph input; the new initializers of an upgrade or of QDQ would
# then fail the checker. IR versions are backward compatible, so raising it is always safe.
MIN_IR_VERSION = 7


def raise_ir_version(model: ir.Model) -> None:
    """Set ``model.ir_version`` to at least :data:`MIN_IR_VERSION` (in place).

    From IR 3, initializers listed as graph inputs are unlisted: IR 3 demanded the listing,
    exporters of that era meant them as weights, and the quantizer bakes them in as constants;
    left listed, each float weight would stay in the quantized model as a dead input.
    """
    if (model.ir_version or 0) < 4:
        inits = model.graph.initializers
        kept = [v for v in model.graph.inputs if v.name not in inits]
        model.graph.inputs.clear()
        model.graph.inputs.extend(kept)
    model.ir_version = max(model.ir_version or 0, MIN_IR_VERSION)


def _external_base_dirs(model: ir.Model) -> set[str]:
    return {v.const_value.base_dir for g in model.graphs() for v in g.initializers.values()
            if isinstance(v.const_value, ir.ExternalTensor)}


def ensure_opset(model: ir.Model, target: int = 13, feeds=None) -> tuple[ir.Model, str]:
    """Return (model at opset >= target, how: "unchanged"|"bumped"|"converted").

    ``feeds``: a sample feed to confirm a bump numerically (recommended). The input model
    is not modified.
    """
    from onnxopt.verify import check_model

    current = opset_version(model) or 0
    if current >= target:
        return model, "unchanged"
    hint = "; try --per-tensor" if target > 10 else ""  # per-tensor QDQ needs only opset 10
    ops = {n.op_type for n in all_nodes(model) if n.domain in ("", "ai.onnx")}
    if not ops & _NEEDS_CONVERTER:
        bumped = model.clone()  # shares the tensors: external weights stay where they are
        bumped.opset_imports[""] = target
        raise_ir_version(bumped)
        for node in all_nodes(bumped):
            if node.domain in ("", "ai.onnx"):
                node.version = None
        try:
            check_model(bumped)
            ok = feeds is None or _same_outputs(model, bumped, feeds)
        except Exception:  # noqa: BLE001
            ok = False
        if ok:
            return bumped, "bumped"
        log.info("opset bump to %d changed the model; using the version converter", target)
    try:
        proto = onnx.version_converter.convert_version(ir.to_proto(model), target)
    except Exception as e:  # noqa: BLE001 - the converter raises assorted errors
        raise OnnxoptError(
            f"{'per-channel ' if target > 10 else ''}quantization needs opset {target}, and onnx's version converter "
            f"cannot upgrade this model from opset {current}: {str(e).splitlines()[0][:200]}{hint}"
        ) from None
    converted = ir.from_proto(proto)
    # External weights come back relative to the current directory; point them at their folder.
    base_dirs = _external_base_dirs(model)
    if len(base_dirs) == 1:
        ir.external_data.set_base_dir(converted.graph, base_dirs.pop())
    raise_ir_version(converted)
    _lift_constants(converted)
    try:
        check_model(converted)
    except Exception as e:  # noqa: BLE001
        raise OnnxoptError(f"the opset {target} upgrade of this model is invalid ({e}){hint}") from None
    if feeds is not None and not _same_outputs(model, converted, feeds):
        raise OnnxoptError(f"the opset {target} upgrade changes this model's outputs{hint}")
    return converted, "converted"


