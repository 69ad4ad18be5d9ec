"""The state hooks see: float model, calibration data, scheme, layers, ranges, report."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.quantization.qdq import QuantLayer
from onnxopt.quantization.scheme import Scheme


@dataclasses.dataclass
class QuantContext:
    """Passed to ``float_transforms`` (``layers`` empty then) and ``weight_transforms``.

    ``float_model``: the float model the QDQ model is built from (do not edit it in a
    weight transform). ``calib``: re-iterable calibration feeds (the calibration split).
    ``layers``: the quantized layers (nodes live in the QDQ model). ``stats``: activation
    TensorStats by tensor name. ``report``: add entries under your own key.
    """

    float_model: ir.Model
    calib: Any
    scheme: Scheme
    layers: list[QuantLayer] = dataclasses.field(default_factory=list)
    stats: dict = dataclasses.field(default_factory=dict)
    report: dict = dataclasses.field(default_factory=dict)

    def ensure_bias(self, layer: QuantLayer) -> ir.Value:
        """The layer's float bias initializer, created as zeros (one per output channel) if absent."""
        node = layer.node
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            return node.inputs[2]
        graph = node.graph
        channels = layer.float_weight.shape[layer.axis if layer.axis is not None else 0]
        name = f"{layer.name}_bias"
        value = ir.Value(name=name, const_value=ir.tensor(np.zeros(channels, np.float32), name=name))
        value.shape = ir.Shape([channels])
        value.dtype = ir.DataType.FLOAT
        graph.register_initializer(value)
        if len(node.inputs) < 3:
            node.resize_inputs(3)
        node.replace_input_with(2, value)
        layer.bias_name = name
        return value
