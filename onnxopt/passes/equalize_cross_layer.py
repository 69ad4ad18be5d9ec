"""Registers ``equalize-cross-layer`` (cross-layer equalization for CNNs, opt-in).

The pass lives with the quantization code (:mod:`onnxopt.quantization.equalization`),
which the quantizer uses as a float transform; importing it here puts it in the pass
registry for ``onnxopt passes`` and ``onnxopt optimize --passes equalize-cross-layer``.
It has no ``preset_order``: it changes weights (exactly, in real arithmetic) only to
help int8 quantization, so the default float pipeline does not run it.
"""

from onnxopt.quantization import equalization  # noqa: F401  (registers the pass on import)
