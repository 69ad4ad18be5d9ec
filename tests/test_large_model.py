"""The large-model path at a small size: external data in, external data out, nothing lost.

``benchmarks/large_model.py`` runs the > 2 GB case and measures memory; these tests run
the same code paths on a ~12 MB transformer whose weights live in an external file:
verification sessions that reuse the weight file in place (hard link) or copy it (no
hard link possible), saving that keeps weights external, the input folder untouched,
and the answers unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxopt.optimize import optimize_file
from onnxopt.verify import run_model

_spec = importlib.util.spec_from_file_location(
    "large_model_bench", pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "large_model.py"
)
large_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(large_model)


def _digests(folder: pathlib.Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _ort(path, x):
    so = ort.SessionOptions()
    so.log_severity_level = 4
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def external_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("large") / "src"
    path = large_model.build_model(folder, layers=2, hidden=256, heads=4)
    proto = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    return path


@pytest.mark.parametrize("hard_links", [True, False])
def test_external_model_optimizes_to_external_output(external_model, tmp_path, monkeypatch, hard_links):
    if not hard_links:
        def no_link(*args, **kwargs):
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr(os, "link", no_link)
    before = _digests(external_model.parent)
    out = tmp_path / "opt.onnx"
    result = optimize_file(external_model, out)
    assert result.nodes_after < result.nodes_before
    assert not result.rolled_back
    # Weights that came from an external file stay external (streamed, no giant proto).
    assert (tmp_path / "opt.onnx.data").exists()
    saved = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in saved.graph.initializer)
    onnx.checker.check_model(str(out))
    x = np.random.default_rng(0).standard_normal((2, 5, 256)).astype(np.float32)
    np.testing.assert_allclose(_ort(out, x), _ort(external_model, x), rtol=1e-4, atol=1e-4)
    # The input folder is untouched: no links, no temporary files, same bytes.
    assert _digests(external_model.parent) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnxopt-tmp-")]


def test_verification_catches_a_broken_external_model(external_model, tmp_path):
    """The in-place session path must still see changed weights (not the file's old bytes)."""
    import onnx_ir as ir

    from onnxopt.errors import VerificationError
    from onnxopt.model_io import load_model
    from onnxopt.optimize import sample_feeds
    from onnxopt.verify import Verifier

    model = load_model(external_model)
    feeds = sample_feeds(model)
    verifier = Verifier.from_model(model, feeds)
    verifier.verify(model)  # unchanged: passes
    w = model.graph.initializers["l0.fc2.w"]
    w.const_value = ir.tensor(w.const_value.numpy() * 3, name="l0.fc2.w")
    with pytest.raises(VerificationError, match="drifted"):
        verifier.verify(model)
    out = run_model(model, feeds[0])
    assert set(out) == {"y"}


def test_checker_runs_on_external_models(external_model):
    """check_model must not skip the ONNX checker because the weights are external."""
    from onnxopt.errors import VerificationError
    from onnxopt.model_io import load_model
    from onnxopt.verify import check_model

    model = load_model(external_model)
    check_model(model)
    next(iter(model.graph)).op_type = "NotAnOp"
    with pytest.raises(VerificationError, match="NotAnOp"):
        check_model(model)
