"""onnxopt: make exported ONNX models smaller and faster, and measure it honestly.

Python API (the CLI is a thin layer over these)::

    import onnxopt
    result = onnxopt.optimize("model.onnx")            # PipelineResult: .model, .stats
    onnxopt.save_model(result.model, "model.opt.onnx")
    onnxopt.optimize_file("model.onnx", "model.opt.onnx", passes=["cse", MyPass()])
"""

from onnxopt.compare import compare_models
from onnxopt.errors import OnnxoptError, VerificationError
from onnxopt.inspection import inspect_model
from onnxopt.model_io import load_model, save_model
from onnxopt.optimize import optimize, optimize_file
from onnxopt.passes import PassManager, register_pass, register_preset

__version__ = "0.1.0"

__all__ = [
    "OnnxoptError",
    "PassManager",
    "VerificationError",
    "compare_models",
    "inspect_model",
    "load_model",
    "optimize",
    "optimize_file",
    "register_pass",
    "register_preset",
    "save_model",
]
