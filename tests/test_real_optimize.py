"""`onnxopt optimize` on the real models: loads in ORT, same answers, dynamic dims kept."""

from __future__ import annotations

import onnx
import pytest

from onnxopt.cli import main
from tests.conftest import real_model

SHAPES = {"det": "x:1x3x160x160", "rec": "x:1x3x48x160", "cls": "x:2x3x48x192", "minilm": "input_ids:2x16"}


def _dims(value_info):
    return [d.dim_param if d.dim_param else d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("name", ["det", "rec", "cls", "minilm"])
def test_optimize_real_model_matches_and_keeps_dynamic_dims(name, tmp_path, capsys):
    src = real_model(name)
    dst = tmp_path / f"{name}.opt.onnx"
    assert main(["optimize", str(src), "-o", str(dst), "--shape", SHAPES[name]]) == 0, capsys.readouterr().err
    # An independent comparison, on two generated inputs (the safety net used one).
    assert main(["compare", str(src), str(dst), "--shape", SHAPES[name], "--rtol", "1e-4"]) == 0, capsys.readouterr().out
    before, after = onnx.load(src), onnx.load(dst)
    assert [_dims(v) for v in after.graph.input] == [_dims(v) for v in before.graph.input]
    assert len(after.graph.node) < len(before.graph.node)
    onnx.checker.check_model(after, full_check=True)
