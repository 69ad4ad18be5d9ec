"""Stable results on the real PP-OCR models.

- Idempotence: optimizing an optimized model changes nothing (same nodes, same ops,
  bytes-identical tensors), so running onnxopt twice in a pipeline is harmless.
- Determinism: the same input and options give byte-identical output files, so
  results can be cached, diffed and reproduced.
"""

from __future__ import annotations

import hashlib

import onnx
import pytest
from onnx import numpy_helper

from onnxopt.graph import op_histogram
from onnxopt.model_io import load_model
from onnxopt.optimize import optimize_file

from .conftest import real_model

MODELS = ["cls", "det", "rec"]


def _tensors(path) -> dict[str, tuple]:
    """Every initializer (main graph and subgraphs) by name: dtype, dims, bytes digest."""
    proto = onnx.load(str(path))
    out = {}

    def walk(graph):
        for t in graph.initializer:
            arr = numpy_helper.to_array(t)
            out[t.name] = (t.data_type, tuple(t.dims), hashlib.sha256(arr.tobytes()).hexdigest())
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)

    walk(proto.graph)
    return out


@pytest.mark.parametrize("name", [*MODELS, "minilm"])
def test_optimize_is_idempotent(name, tmp_path):
    src = real_model(name)
    once = tmp_path / "once.onnx"
    twice = tmp_path / "twice.onnx"
    first = optimize_file(src, once)
    assert first.nodes_after < first.nodes_before  # the first run did real work
    second = optimize_file(once, twice)
    assert second.nodes_after == second.nodes_before == first.nodes_after
    assert not second.rolled_back
    assert op_histogram(load_model(twice)) == op_histogram(load_model(once))
    assert _tensors(twice) == _tensors(once)


@pytest.mark.parametrize("name", MODELS)
def test_optimize_is_deterministic(name, tmp_path):
    src = real_model(name)
    a = tmp_path / "a" / "model.onnx"
    b = tmp_path / "b" / "model.onnx"
    a.parent.mkdir()
    b.parent.mkdir()
    optimize_file(src, a)
    optimize_file(src, b)
    assert hashlib.sha256(a.read_bytes()).hexdigest() == hashlib.sha256(b.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "name, shapes",
    [
        ("det", [(1, 3, 96, 160), (2, 3, 128, 64)]),
        ("rec", [(1, 3, 48, 320), (3, 3, 48, 96)]),
        ("cls", [(3, 3, 48, 192)]),
    ],
)
def test_dynamic_dims_stay_dynamic(name, shapes, tmp_path):
    """Verification uses one sample size; the result must still be right at others."""
    import numpy as np

    from onnxopt.inputs import model_inputs
    from onnxopt.verify import compare_outputs, run_model

    src = real_model(name)
    out = tmp_path / "opt.onnx"
    optimize_file(src, out)
    original, optimized = load_model(src), load_model(out)
    assert [str(v.shape) for v in model_inputs(optimized)] == [str(v.shape) for v in model_inputs(original)]
    rng = np.random.default_rng(0)
    for shape in shapes:
        feeds = {"x": rng.uniform(-1, 1, shape).astype(np.float32)}
        diffs = compare_outputs(run_model(original, feeds), run_model(optimized, feeds), rtol=1e-3, atol=1e-4)
        assert all(d.within for d in diffs), (shape, [d.as_dict() for d in diffs if not d.within])
