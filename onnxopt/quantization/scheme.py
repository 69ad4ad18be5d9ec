"""Quantization schemes per target, and the arithmetic of scales and zero points.

- ``cpu`` (x86, ONNX Runtime): uint8 asymmetric activations, int8 symmetric weights
  (zero point 0, range [-127, 127]) per output channel. This is the u8s8 VNNI fast path
  of ORT's QLinearConv / MatMulIntegerToFloat / QLinearMatMul kernels; the weight range
  avoids -128 so that u8*s8 pair sums cannot saturate the 16-bit intermediate on
  pre-VNNI AVX2 (ORT's own reason for reduce_range there).
- ``tensorrt``: int8 symmetric for both activations and weights (TensorRT ignores other
  zero points).
- ``generic``: like ``cpu`` (the scheme every QDQ runtime accepts).

Activation ranges always include 0 (zero must be exactly representable: padding and
ReLU produce it), and a degenerate range gets a tiny positive width.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxopt.errors import OnnxoptError

TARGETS = ("cpu", "tensorrt", "generic")


@dataclasses.dataclass(frozen=True)
class Scheme:
    target: str
    activation_dtype: ir.DataType
    weight_dtype: ir.DataType
    symmetric_activations: bool
    per_channel: bool

    @property
    def act_numpy(self) -> type:
        return np.uint8 if self.activation_dtype == ir.DataType.UINT8 else np.int8

    def describe(self) -> str:
        act = "int8 symmetric" if self.symmetric_activations else "uint8 asymmetric"
        w = "per-channel" if self.per_channel else "per-tensor"
        return f"{self.target}: {act} activations, int8 symmetric {w} weights"


def scheme_for(target: str, *, per_channel: bool = True) -> Scheme:
    if target not in TARGETS:
        raise OnnxoptError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    if target == "tensorrt":
        return Scheme(target, ir.DataType.INT8, ir.DataType.INT8, True, per_channel)
    return Scheme(target, ir.DataType.UINT8, ir.DataType.INT8, False, per_channel)


def activation_qparams(lo: float, hi: float, scheme: Scheme) -> tuple[np.float32, int]:
    """(scale, zero point) for an activation range [lo, hi] in the scheme's dtype."""
    lo = min(float(lo), 0.0)
    hi = max(float(hi), 0.0)
    if scheme.symmetric_activations:
        bound = max(-lo, hi)
        scale = bound / 127.0 if bound > 0 else 1.0
        return np.float32(max(scale, 1e-12)), 0
    width = hi - lo
    if width <= 0:
        return np.float32(1.0), 0
    scale = width / 255.0
    zp = int(np.clip(round(-lo / scale), 0, 255))
    return np.float32(max(scale, 1e-12)), zp


def quantize_weight(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weights: (int8 array, float32 scale per channel along ``axis`` or a scalar)."""
    w = np.asarray(w, dtype=np.float32)
    if axis is None:
        absmax = np.array(np.abs(w).max(), dtype=np.float32)
    else:
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        absmax = np.abs(w).max(axis=reduce).astype(np.float32)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def dequantize_weight(q: np.ndarray, scale: np.ndarray, axis: int | None) -> np.ndarray:
    shape = [1] * q.ndim
    if axis is not None:
        shape[axis] = -1
    return q.astype(np.float32) * np.asarray(scale, dtype=np.float32).reshape(shape)
