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


@pytest.mark.parametrize("name", MODELS)
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
