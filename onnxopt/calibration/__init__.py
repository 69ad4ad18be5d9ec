"""Calibration for static quantization: data sources, streaming observers, range collection.

See ``/work/notes/quant_interface.md`` (the agreed interface) and each module's docstring::

    from onnxopt.calibration import load_calibration_data, collect_stats
    data = load_calibration_data("images/", model, image_spec=ImageSpec.parse("640x640,mean=0.5,std=0.5,bgr"))
    stats = collect_stats(model, data, ["x", "conv1_out"], method="percentile")
"""

from onnxopt.calibration.collect import TensorStats, collect_stats
from onnxopt.calibration.data import CalibrationData, ImageSpec, load_calibration_data
from onnxopt.calibration.observers import METHODS, Observer, make_observer

__all__ = [
    "METHODS",
    "CalibrationData",
    "ImageSpec",
    "Observer",
    "TensorStats",
    "collect_stats",
    "load_calibration_data",
    "make_observer",
]
