"""Static int8 quantization (QDQ) with streaming calibration; see :mod:`.api`."""

from onnxopt.quantization.api import METHODS, QuantizeResult, fused_kernels, quantize, quantize_file
from onnxopt.quantization.context import QuantContext
from onnxopt.quantization.scheme import TARGETS, Scheme, scheme_for

__all__ = ["METHODS", "TARGETS", "QuantContext", "QuantizeResult", "Scheme", "fused_kernels", "quantize",
           "quantize_file", "scheme_for"]
