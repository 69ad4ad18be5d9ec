"""What ``onnxopt inspect`` and ``onnxopt compare`` print: model text with brackets survives
rich's markup, weights in Constant nodes count as parameters, compare names its reference."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import real_model
from tests.test_cli import run_cli


def _bracket_model(path):
    """x -> Neg -> y, where the tensors' names and the batch dim hold '[...]' (markup to rich)."""
    graph = helper.make_graph(
        [helper.make_node("Neg", ["img[rgb]"], ["prob[cls]"], name="neg")],
        "brackets",
        [helper.make_tensor_value_info("img[rgb]", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("prob[cls]", TensorProto.FLOAT, ["batch", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_inspect_table_keeps_shapes_and_weights_of_the_real_det_model(capsys):
    det = real_model("det")
    code, stdout, err = run_cli(capsys, "inspect", det)
    assert code == 0, err
    # The dynamic dims paddle2onnx writes were read as a markup tag and dropped ("float" alone).
    assert "float[p2o.DynamicDimension.0,3,p2o.DynamicDimension.1,p2o.DynamicDimension.2]" in stdout
    assert "float[p2o.DynamicDimension.3,1,p2o.DynamicDimension.4,p2o.DynamicDimension.5]" in stdout
    # Every weight of this export is a Constant node: counted independently here with onnx.
    proto = onnx.load(det)
    in_constants = sum(numpy_helper.to_array(a.t).size for n in proto.graph.node if n.op_type == "Constant"
                       for a in n.attribute if a.name == "value")
    assert in_constants > 1_000_000 and not proto.graph.initializer
    assert f"parameters: {in_constants:,} (" in stdout and f"{in_constants:,} in Constant nodes" in stdout
    # Its producer is empty: no dangling ", )" in the header.
    header = stdout.splitlines()[0]
    assert header.endswith(f"({det.stat().st_size:,} bytes, IR v8)"), header

    code, stdout, _ = run_cli(capsys, "inspect", det, "--json")
    info = json.loads(stdout)
    assert info["parameters"] == info["constant_parameters"] == in_constants


def test_inspect_and_compare_print_bracketed_names(capsys, tmp_path):
    model = _bracket_model(tmp_path / "brackets.onnx")
    code, stdout, err = run_cli(capsys, "inspect", model)
    assert code == 0, err
    for text in ("img[rgb]", "prob[cls]", "float[batch,3]"):
        assert text in stdout, stdout
    code, stdout, err = run_cli(capsys, "compare", model, model, "--shape", "img[rgb]:2x3")
    assert code == 0, err
    assert "prob[cls]" in stdout, stdout


def test_compare_title_follows_the_argument_order_and_names_the_reference(capsys, tiny_model_path, tmp_path):
    model = onnx.load(tiny_model_path)
    w = numpy_helper.to_array(model.graph.initializer[0])
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array((w * 2).astype(np.float32), "W"))
    other = tmp_path / "other.onnx"
    onnx.save(model, other)
    code, stdout, _ = run_cli(capsys, "compare", tiny_model_path, other, "--shape", "x:2x4")
    assert code == 1  # B's outputs differ: the errors are measured against A
    assert "tiny.onnx (reference) vs other.onnx" in stdout, stdout


def test_many_external_data_files_are_summed_up_not_listed(tmp_path, capsys):
    """torch's exporter writes one file per tensor: 32 'external data' lines said little."""
    from onnxopt.cli import main

    inits = [numpy_helper.from_array(np.full((64, 64), i, np.float32), f"w{i}") for i in range(6)]
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"w{i}"], [f"h{i}" if i < 5 else "y"])
             for i in range(6)]
    graph = helper.make_graph(nodes, "ext", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert main(["inspect", str(tmp_path / "m.onnx")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("external data")]
    assert len(lines) == 1 and "6 files, 0.10 MB" in lines[0], lines
