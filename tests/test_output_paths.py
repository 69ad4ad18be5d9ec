"""No command may overwrite a model it reads: not with its output, its ``.data``, or a report.

Each refusal comes before any work, as one line, with the input's bytes unchanged and no
file written.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.cli import main
from onnxopt.errors import OnnxoptError


def _run(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _one_line(code, err, fragment):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("onnxopt: error: ") and fragment in lines[0], lines[0]


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def external_model(tmp_path):
    """model.onnx whose weight lives in weights.bin beside it."""
    folder = tmp_path / "ext"
    folder.mkdir()
    w = numpy_helper.from_array(np.arange(4 * 300, dtype=np.float32).reshape(4, 300) / 1000, "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "ext",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 300])], [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0)
    return folder


def test_report_paths_naming_the_input_model_are_refused(capsys, tiny_model_path, tmp_path):
    before = _digest(tmp_path)
    out = tmp_path / "out.onnx"
    for argv, option in [
        (["quantize", tiny_model_path, "-o", out, "--calib", "random", "--shape", "x:2x4", "--report", tiny_model_path], "--report"),
        (["prune", tiny_model_path, "-o", out, "--ratio", "0.25", "--report", tiny_model_path], "--report"),
        (["bench", tiny_model_path, "--runs", "2", "--warmup", "0", "--json", tiny_model_path], "--json"),
        (["bench", tiny_model_path, "--runs", "2", "--warmup", "0", "--csv", tiny_model_path], "--csv"),
        (["optimize", tiny_model_path, "-o", out, "--json", tiny_model_path], "--json"),
    ]:
        code, err = _run(capsys, *argv)
        _one_line(code, err, f"{option} {tiny_model_path}: is the input model")
        assert _digest(tmp_path) == before, argv


def test_report_path_equal_to_the_output_is_refused(capsys, tiny_model_path, tmp_path):
    out = tmp_path / "out.onnx"
    for argv, option in [
        (["quantize", tiny_model_path, "-o", out, "--calib", "random", "--shape", "x:2x4", "--report", out], "--report"),
        (["prune", tiny_model_path, "-o", out, "--ratio", "0.25", "--report", out], "--report"),
        (["optimize", tiny_model_path, "-o", out, "--json", out], "--json"),
    ]:
        code, err = _run(capsys, *argv)
        _one_line(code, err, f"{option} {out}: is also the output")
        assert not out.exists(), argv
    code, err = _run(capsys, "bench", tiny_model_path, "--runs", "2", "--json", tmp_path / "r", "--csv", tmp_path / "r")
    _one_line(code, err, "is also the output")


def test_output_naming_the_inputs_external_data_is_refused(capsys, external_model):
    before = _digest(external_model)
    model = external_model / "model.onnx"
    code, err = _run(capsys, "optimize", model, "-o", external_model / "weights.bin")
    _one_line(code, err, "is the external data file of the input model")
    # OUT.data (written for models with external weights) would land on the input's weights.
    (external_model / "weights.bin").rename(external_model / "new.onnx.data")
    proto = onnx.load(model, load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "new.onnx.data"
    onnx.save(proto, model)
    before = _digest(external_model)
    code, err = _run(capsys, "optimize", model, "-o", external_model / "new.onnx")
    _one_line(code, err, "its external data file new.onnx.data would overwrite the input model")
    code, err = _run(capsys, "quantize", model, "-o", external_model / "q.onnx", "--calib", "random",
                     "--report", external_model / "new.onnx.data")
    _one_line(code, err, "is the external data of the input model")
    assert _digest(external_model) == before


def test_quantize_file_writes_no_report_when_the_model_cannot_be_saved(tiny_model_path, tmp_path, monkeypatch):
    from onnxopt.quantization import api

    def fail(*_a, **_k):
        raise OnnxoptError("disk full")

    monkeypatch.setattr(api, "save_model", fail)
    with pytest.raises(OnnxoptError, match="disk full"):
        api.quantize_file(tiny_model_path, tmp_path / "q.onnx", calib="random", shapes={"x": (2, 4)},
                          report=tmp_path / "q.json", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]

