"""The examples behind ``onnxopt demo``.

The real example is the PP-OCRv4 text detector (``ch_PP-OCRv4_det_infer.onnx``) that
ships inside the ``rapidocr-onnxruntime`` wheel on PyPI
(``pip install --no-deps rapidocr-onnxruntime==1.4.4``). It is found on disk with
:func:`onnxopt.testing.real_models.ppocr_model`, copied into the output folder (the
installed file is never modified), optimized, verified and timed against the original.
Nothing is downloaded at run time.

When that wheel is not installed, the bundled example is used: a small CNN written the
way exporters write them. It has what real exports carry and onnxopt removes: Constant
nodes, Identity and Dropout left from training, BatchNormalization after bias-free
Conv, a flatten done with Shape/Gather/Concat/Reshape arithmetic, and the same
subexpression twice. Built in code (seeded weights).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build_demo_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)

    def t(name, arr):
        return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)

    inits = []
    nodes = []
    c_in, c1, c2, classes = 3, 16, 32, 10
    for i, (ci, co) in enumerate(((c_in, c1), (c1, c2))):
        inits += [
            t(f"conv{i}.w", rng.standard_normal((co, ci, 3, 3)) * (2.0 / (ci * 9)) ** 0.5),
            t(f"bn{i}.scale", 1 + 0.1 * rng.standard_normal(co)),
            t(f"bn{i}.bias", 0.1 * rng.standard_normal(co)),
            t(f"bn{i}.mean", 0.1 * rng.standard_normal(co)),
            t(f"bn{i}.var", 1 + 0.1 * rng.random(co)),
        ]
        src = "x" if i == 0 else "pool0"
        nodes += [
            helper.make_node("Conv", [src, f"conv{i}.w"], [f"conv{i}"], pads=[1, 1, 1, 1], name=f"Conv_{i}"),
            helper.make_node(
                "BatchNormalization",
                [f"conv{i}", f"bn{i}.scale", f"bn{i}.bias", f"bn{i}.mean", f"bn{i}.var"],
                [f"bn{i}"],
                epsilon=1e-5,
                name=f"BatchNorm_{i}",
            ),
            helper.make_node("Relu", [f"bn{i}"], [f"relu{i}"], name=f"Relu_{i}"),
            helper.make_node("Identity", [f"relu{i}"], [f"id{i}"], name=f"Identity_{i}"),
            helper.make_node("MaxPool", [f"id{i}"], [f"pool{i}"], kernel_shape=[2, 2], strides=[2, 2], name=f"Pool_{i}"),
        ]
    # Global pooling twice on the same tensor (as happens after tracing), then flatten by
    # shape arithmetic, a Dropout and a classifier.
    nodes += [
        helper.make_node("GlobalAveragePool", ["pool1"], ["gap_a"], name="GAP_a"),
        helper.make_node("GlobalAveragePool", ["pool1"], ["gap_b"], name="GAP_b"),
        helper.make_node("Add", ["gap_a", "gap_b"], ["gap2"], name="Add_gap"),
        helper.make_node("Constant", [], ["half"], value=t("half_v", 0.5), name="Const_half"),
        helper.make_node("Mul", ["gap2", "half"], ["gap"], name="Mul_half"),
        helper.make_node("Shape", ["gap"], ["gap_shape"], name="Shape_0"),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.int64)), name="Const_0"),
        helper.make_node("Gather", ["gap_shape", "zero"], ["batch"], axis=0, name="Gather_batch"),
        helper.make_node("Constant", [], ["axes0"], value=numpy_helper.from_array(np.array([0], np.int64)), name="Const_axes"),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"], name="Unsqueeze_batch"),
        helper.make_node("Constant", [], ["minus1"], value=numpy_helper.from_array(np.array([-1], np.int64)), name="Const_m1"),
        helper.make_node("Concat", ["batch1", "minus1"], ["flat_shape"], axis=0, name="Concat_shape"),
        helper.make_node("Reshape", ["gap", "flat_shape"], ["flat"], name="Reshape_flat"),
        helper.make_node("Dropout", ["flat"], ["drop"], name="Dropout_0"),
        helper.make_node("MatMul", ["drop", "fc.w"], ["fc_mm"], name="MatMul_fc"),
        helper.make_node("Add", ["fc_mm", "fc.b"], ["logits"], name="Add_fc"),
    ]
    inits += [t("fc.w", rng.standard_normal((c2, classes)) * 0.2), t("fc.b", 0.1 * rng.standard_normal(classes))]
    graph = helper.make_graph(
        nodes,
        "demo_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnxopt-demo")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def run_demo(folder: str):
    """Write the example to ``folder``, optimize it, return (result, paths)."""
    from onnxopt.optimize import optimize_file

    src = os.path.join(folder, "demo_cnn.onnx")
    dst = os.path.join(folder, "demo_cnn.opt.onnx")
    onnx.save(build_demo_model(), src)
    result = optimize_file(src, dst, shapes={"x": (1, 3, 64, 64)})
    return result, (src, dst)


# --------------------------------------------------------------------------------------
# the real example: PP-OCRv4 text detector from the rapidocr-onnxruntime wheel
# --------------------------------------------------------------------------------------

REAL_INSTALL_HINT = "pip install --no-deps rapidocr-onnxruntime==1.4.4"
REAL_SHAPE = (1, 3, 640, 640)  # x: [N, 3, H, W], H and W multiples of 32
REAL_DESCRIPTION = "PP-OCRv4 text detector (ch_PP-OCRv4_det_infer.onnx from the rapidocr-onnxruntime wheel)"


def real_model_path() -> Path:
    """The installed PP-OCRv4 detector; raises RealModelUnavailable (with the install hint)."""
    from onnxopt.testing.real_models import ppocr_model

    return ppocr_model("det")


def stderr_progress(prefix: str = "onnxopt demo") -> Callable[[str], None]:
    """A ``say(msg)`` that prints ``prefix: [  t s] msg`` on stderr, like ``onnxopt quantize``."""
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"{prefix}: [{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return say


def run_real_demo(
    folder: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    runs: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    say: Callable[[str], None] | None = None,
):
    """Copy the real detector into ``folder``, optimize it, time both interleaved.

    ``source``: the model to copy (default: :func:`real_model_path`). ``threads``: ONNX
    Runtime intra-op threads (default: the physical cores). Returns
    ``(result, report, (original_copy, optimized))`` with the optimizer's
    :class:`PipelineResult` and the :class:`BenchReport`.
    """
    from onnxopt.bench import benchmark
    from onnxopt.optimize import optimize_file

    say = say or (lambda msg: None)
    source = Path(source) if source is not None else real_model_path()
    folder = Path(folder)
    src = folder / source.name
    dst = folder / (source.stem + ".opt.onnx")
    say(f"copying {source.name} ({source.stat().st_size / 1e6:.1f} MB) from {source.parent} into {folder}")
    shutil.copyfile(source, src)  # content only: the installed file stays untouched, the copy gets normal permissions
    shape = "x".join(map(str, REAL_SHAPE))
    say(f"optimizing and verifying the outputs on a sample x:{shape} input")
    result = optimize_file(src, dst, shapes={"x": REAL_SHAPE})
    say(f"timing original vs optimized: {warmup} warm-up + {runs} interleaved runs each")
    report = benchmark([str(src), str(dst)], threads=threads, warmup=warmup, runs=runs, shapes={"x": REAL_SHAPE})
    say("done")
    return result, report, (str(src), str(dst))
