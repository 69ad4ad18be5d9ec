"""``upgrade-opset``: convert the model's default-domain opset (opt-in, ``--target-opset N``).

Newer opsets have fused ops older exports cannot use (LayerNormalization from 17, Gelu
from 20, HardSwish from 14), so converting first lets the fusion passes fire on old exports.
The conversion is onnx's own ``version_converter`` (op adapters written by the ONNX
project); afterwards the weights it turned into Constant nodes (it moves attributes such as
Reshape shapes, Clip bounds and some initializers into nodes) are lifted back into
initializers, because runtimes treat Constant-node weights differently from initializers (ORT's
quantizer, for one, then quantizes them at run time).

Not in the ``default`` preset: it changes the model's opset, and a runtime older than the
target opset can no longer load the result. Only upgrades are done; a target at or below the
model's opset leaves the model alone. Other domains' opsets are untouched. The IR version is
raised to the minimum the new opset needs when it is lower.
"""

from __future__ import annotations

import os

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxopt.errors import OnnxoptError
from onnxopt.passes.registry import PassInfo, register_pass

DEFAULT_TARGET = 20


def max_supported_opset() -> int:
    """Highest default-domain opset this onnx package (and so its converter) knows."""
    return onnx.defs.onnx_opset_version()


def check_target_opset(model: ir.Model, target: int) -> None:
    """Raise a one-line OnnxoptError when ``target`` cannot be honoured for ``model``."""
    top = max_supported_opset()
    if not isinstance(target, int) or target < 1:
        raise OnnxoptError(f"--target-opset must be a positive integer, not {target!r}")
    if target > top:
        raise OnnxoptError(f"--target-opset {target} is newer than this onnx package supports ({top})")
    current = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if current is not None and target < current:
        raise OnnxoptError(f"--target-opset {target} is lower than the model's opset {current}; only upgrades are supported")


class UpgradeOpsetPass(ir.passes.InPlacePass):
    __doc__ = __doc__

    def __init__(self, target: int = DEFAULT_TARGET):
        super().__init__()
        self.target = target

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        if current is None or current >= self.target:
            self.rewrites = 0
            return ir.passes.PassResult(model, modified=False)
        proto = ir.serde.serialize_model(model)
        converted = onnx.version_converter.convert_version(proto, self.target)
        min_ir = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", self.target)], ignore_unknown=True)
        if converted.ir_version < min_ir:
            converted.ir_version = min_ir
        new = ir.serde.deserialize_model(converted)
        # Move the converted contents into the caller's model object (this is an in-place pass).
        model.graph = new.graph
        model.ir_version = new.ir_version
        model.functions.clear()
        model.functions.update(new.functions)
        source = model.meta.get("onnxopt.source_path")
        if source:  # external tensors are read relative to the model's folder
            ir.external_data.set_base_dir(model.graph, os.path.dirname(source))
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        self.rewrites = 1
        return ir.passes.PassResult(model, modified=True)


def upgrade_pass_info(target: int) -> PassInfo:
    """The registry entry for an upgrade to ``target`` (what ``--target-opset N`` prepends)."""
    base = register_pass_info()
    return PassInfo(base.name, f"{base.description} (target {target})", lambda: UpgradeOpsetPass(target), source=base.source)


def register_pass_info() -> PassInfo:
    from onnxopt.passes.registry import get_pass

    return get_pass("upgrade-opset")


register_pass(
    "upgrade-opset",
    f"Convert the default-domain opset up (to {DEFAULT_TARGET}, or --target-opset N) so newer fused ops apply; "
    "opt-in, not in default: it changes the opset, which older runtimes cannot load",
    factory=UpgradeOpsetPass,
)
