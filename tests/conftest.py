"""Shared fixtures: small hand-built graphs and the real models (skipped when absent)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


@pytest.fixture
def tiny_model_path(tmp_path):
    """x[batch,4] -> Neg -> Neg -> Identity -> MatMul(W) -> Add(b) -> y: has something for every cleanup."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    nodes = [
        helper.make_node("Neg", ["x"], ["n1"]),
        helper.make_node("Neg", ["n1"], ["n2"]),
        helper.make_node("Identity", ["n2"], ["i1"]),
        helper.make_node("MatMul", ["i1", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "tiny.onnx"
    onnx.save(model, path)
    return path


def real_model(name: str):
    from onnxopt.testing.real_models import RealModelUnavailable, minilm_model, ppocr_model

    try:
        return minilm_model() if name == "minilm" else ppocr_model(name)
    except RealModelUnavailable as e:
        pytest.skip(str(e))
