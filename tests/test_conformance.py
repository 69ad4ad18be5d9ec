"""The onnx wheel's own backend model tests through ``optimize`` (fast subset of benchmarks/conformance.py).

Every model the ONNX project ships with inputs and expected outputs (pytorch-converted,
pytorch-operator, simple; three of the ``light`` CNNs) is optimized with its shipped
inputs as the safety net's inputs, then saved, re-read, checked and run in a fresh
ONNX Runtime session and compared with the *shipped expected outputs* at the test's own
tolerance. Where ORT cannot run a model (opset < 7 kernels), onnx's reference evaluator
checks it instead; only a model neither can run is skipped, with ORT's error.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt.testing.conformance import Case, _close, discover_cases, run_case

FAST_LIGHT = ("light_squeezenet", "light_shufflenet", "light_inception_v1")


def _cases():
    cases = discover_cases()
    return [c for c in cases if c.kind != "light" or c.name in FAST_LIGHT]


CASES = _cases()


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def test_the_wheel_ships_enough_cases():
    kinds = {c.kind for c in CASES}
    assert {"pytorch-converted", "pytorch-operator", "simple"} <= kinds
    assert len(CASES) >= 100


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_backend_model_survives_optimize(case, tmp_path):
    result = run_case(case, workdir=tmp_path)
    if result.status == "unchanged":
        # Only acceptable when the runtime itself cannot run the original model.
        assert result.reason.startswith("ORT cannot run the original"), result.reason
        pytest.skip(result.reason[:200])
    assert result.status == "optimized", result.reason
    assert not result.rolled_back, f"the safety net had to roll back passes: {result.rolled_back}"
    assert result.nodes_after <= result.nodes_before


def test_independent_check_catches_a_wrong_model(tmp_path):
    """The conformance check itself must fail on a model whose answers changed."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = tmp_path / "relu.onnx"
    onnx.save(model, path)
    x = np.array([-1.0, 0.5, 2.0], np.float32)
    good = Case("relu", "handmade", path, [([x], [np.maximum(x, 0)])])
    assert run_case(good, workdir=tmp_path).status == "optimized"
    # Expected outputs that the model does not produce: ORT's output is then the reference
    # (noted), so the optimized model still has to match ORT, and does.
    wrong = Case("relu", "handmade", path, [([x], [x])])
    r = run_case(wrong, workdir=tmp_path)
    assert r.status == "optimized" and "ORT differs" in r.note


def test_tolerance_semantics_follow_onnx_runner():
    exp = np.array([1000.0, 1e-9], np.float32)
    assert _close(exp, exp * (1 + 5e-4), 1e-3, 1e-7) == ""
    assert _close(exp, exp * (1 + 5e-3), 1e-3, 1e-7) != ""
    assert _close(exp, exp.astype(np.float64), 1e-3, 1e-7).startswith("dtype")
    assert _close([exp], [exp], 1e-3, 1e-7) == ""
    assert _close(np.array(["a"], dtype=object), np.array(["b"], dtype=object), 0, 0) == "strings differ"
