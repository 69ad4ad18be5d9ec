"""Defaults for convolutional networks: what ``quantize`` does to a CNN before calibrating.

Measured on the PP-OCRv4 text detector (``docs/quantization.md``, PP-OCRv4 det section):

* **Hard-swish as one op.** Exporters write ``x * Clip(x + 3, 0, 6) / 6`` (HardSwish only
  exists from opset 14). Between two QLinearConvs ORT then runs Add, Clip, Mul (and the
  ``/ 6``) in float on full-resolution tensors; that float glue, not the convolutions, is
  where most of the int8 model's time went. :func:`prepare_opset` raises such a model to
  opset 14 before the float pipeline, whose ``fuse-hardswish`` pass then writes one
  ``HardSwish`` per activation (the float model alone gets 1.2x faster).
* **Cross-layer equalization** (:mod:`.equalization`, affine folding included) for
  depthwise-separable CNNs (:func:`is_depthwise_cnn`): it folds the per-channel affine ops
  exporters leave after convs into the convs and balances conv -> (Relu) -> conv weight
  ranges, which per-tensor activation grids need after BatchNorm folding into depthwise
  convs. :func:`default_float_transforms` adds it unless the caller passed it already.

The scalar affine after each hard-swish (PP-LCNetV3's "learnable affine blocks") is folded
into the activation quantizer by :func:`onnxopt.quantization.qdq.build_qdq`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.graph import all_nodes, opset_version

__all__ = ["count_decomposed_hardswish", "default_float_transforms", "is_depthwise_cnn", "prepare_opset"]


def _scalar(value: ir.Value | None) -> float | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    arr = np.asarray(tensor.numpy())
    return float(arr.reshape(-1)[0]) if arr.size == 1 and arr.dtype.kind == "f" else None


def count_decomposed_hardswish(model: ir.Model) -> int:
    """How many ``Mul(x, Clip(Add(x, 3), 0, 6))`` (hard-swish before its ``/ 6``) the model has."""
    count = 0
    for node in all_nodes(model):
        if node.op_type != "Clip" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
            continue
        add = node.inputs[0].producer()
        if add is None or add.op_type != "Add" or len(add.inputs) != 2:
            continue
        k = [_scalar(v) for v in add.inputs]
        if 3.0 not in k:
            continue
        x = add.inputs[1 - k.index(3.0)]
        if any(u.op_type == "Mul" and x in u.inputs for u, _ in node.outputs[0].uses()):
            count += 1
    return count


def prepare_opset(model: ir.Model, feed: dict | None, report: dict) -> ir.Model:
    """Raise a model with decomposed hard-swish from opset < 14 to 14, so the float pipeline's
    ``fuse-hardswish`` can fire; anything else is returned unchanged. Records what it did
    under ``report["cnn"]``."""
    from onnxopt.quantization.opset import ensure_opset

    found = count_decomposed_hardswish(model)
    before = opset_version(model)
    if not found or before is None or before >= 14:
        return model
    try:
        model, how = ensure_opset(model, 14, feeds=feed)
    except Exception as e:  # noqa: BLE001 - a failed upgrade only costs speed
        report.setdefault("cnn", {})["hardswish_opset"] = f"not raised ({str(e).splitlines()[0][:120]})"
        return model
    report.setdefault("cnn", {})["hardswish_opset"] = {
        "decomposed_hardswish": found, "opset_from": before, "opset_to": 14, "how": how}
    return model


def is_depthwise_cnn(model: ir.Model) -> bool:
    """At least one grouped Conv with one input channel per group (depthwise) and a constant weight."""
    for node in model.graph:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        group = node.attributes.get_int("group", 1)
        w = ir.convenience.get_const_tensor(node.inputs[1]) if node.inputs[1] is not None else None
        if group > 1 and w is not None and len(w.shape) >= 3 and w.shape[1] == 1:
            return True
    return False


def default_float_transforms(model: ir.Model, hooks: Sequence, equalize) -> list:
    """``hooks`` plus cross-layer equalization first when ``equalize`` is True, or "auto" and
    the model is a depthwise-separable CNN (and the caller did not pass it already)."""
    from onnxopt.quantization.equalization import cross_layer_equalization

    hooks = list(hooks)
    if equalize in (False, "off") or cross_layer_equalization in hooks:
        return hooks
    if equalize in (True, "on") or is_depthwise_cnn(model):
        return [cross_layer_equalization, *hooks]
    return hooks


# Smooth, unbounded-above activations: their outputs have long sparse tails (PP-OCRv4 det:
# hard-swish outputs reach 29 where the 99.99th percentile is 21), so a min-max range
# spends the uint8 grid on a few pixels.
_TAILED_ACTIVATIONS = ("HardSwish",)


def _through_scalar_affine(value: ir.Value) -> ir.Node | None:
    """The producer of ``value``, looking through up to two scalar Mul/Add ops."""
    node = value.producer()
    for _ in range(2):
        if node is None or node.op_type not in ("Mul", "Add") or len(node.inputs) != 2:
            break
        k = [_scalar(v) for v in node.inputs]
        if (k[0] is None) == (k[1] is None):
            break
        nxt = node.inputs[1] if k[0] is not None else node.inputs[0]
        node = nxt.producer()
    return node


def tailed_activation_tensors(model: ir.Model, tensors: Sequence[str]) -> list[str]:
    """The ``tensors`` that are (a scalar affine of) a HardSwish output: calibrated with
    ``mse`` instead of min-max when the method is the default (see :data:`_TAILED_ACTIVATIONS`)."""
    values = {v.name: v for n in model.graph for v in n.outputs}
    out = []
    for name in tensors:
        value = values.get(name)
        node = _through_scalar_affine(value) if value is not None else None
        if node is not None and node.op_type in _TAILED_ACTIVATIONS and node.domain in ("", "ai.onnx"):
            out.append(name)
    return out


def _saturation_interval(node: ir.Node) -> tuple[float, float] | None:
    """Inputs outside [lo, hi] give the same output as lo / hi: HardSwish(x) = 0 for x <= -3;
    HardSigmoid(x) is constant below -beta/alpha and above (1 - beta)/alpha."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "HardSwish":
        return -3.0, float("inf")
    if node.op_type == "HardSigmoid":
        alpha = node.attributes.get_float("alpha", 0.2)
        beta = node.attributes.get_float("beta", 0.5)
        if alpha > 0:
            return -beta / alpha, (1.0 - beta) / alpha
    return None


def clamp_to_consumers(model: ir.Model, tensor: str, lo: float, hi: float) -> tuple[float, float]:
    """Narrow a quantized Conv output's range [lo, hi] to where its readers are not saturated.

    Exact: when every reader of the tensor is a HardSwish (or HardSigmoid), values below -3
    (its flat part) all give the same output, so the output quantizer's grid starts there
    instead of at the calibrated minimum. On PP-OCRv4 det a pointwise conv's output spans
    [-75, 74] before a hard-swish: [-3, 74] halves its quantization step.
    """
    value = next((v for n in model.graph for v in n.outputs if v.name == tensor), None)
    if value is None or value.is_graph_output():
        return lo, hi
    users = [u for u, _ in value.uses()]
    bounds = [_saturation_interval(u) for u in users]
    if not users or any(b is None for b in bounds):
        return lo, hi
    b_lo = min(b[0] for b in bounds)
    b_hi = max(b[1] for b in bounds)
    new_lo, new_hi = max(lo, b_lo), min(hi, b_hi)
    return (new_lo, new_hi) if new_lo < new_hi else (lo, hi)
