"""The foundation: model I/O, sample inputs, the pass manager's statistics and safety net."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt import model_io
from onnxopt.errors import OnnxoptError
from onnxopt.inputs import make_sample_inputs, parse_shape_specs
from onnxopt.passes import PassManager
from onnxopt.verify import Verifier, run_model


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


class CorruptWeight(ir.passes.InPlacePass):
    """Breaks the model on purpose: scales the MatMul weight by 2."""

    def call(self, model):
        w = model.graph.initializers["W"]
        w.const_value = ir.tensor(w.const_value.numpy() * 2, name="W")
        return ir.passes.PassResult(model, modified=True)


class Explode(ir.passes.InPlacePass):
    """Raises halfway through, after removing a node."""

    def call(self, model):
        node = next(n for n in model.graph if n.op_type == "Add")
        model.graph.remove(node, safe=False)
        raise RuntimeError("boom")


class NeverSettles(ir.passes.InPlacePass):
    """Always claims to have changed the model: must hit the fixed-point cap."""

    def call(self, model):
        return ir.passes.PassResult(model, modified=True)


# --- model I/O ---------------------------------------------------------------


def test_load_save_roundtrip_keeps_dynamic_dims(tiny_model_path, tmp_path):
    model = model_io.load_model(tiny_model_path)
    out = model_io.save_model(model, tmp_path / "copy.onnx")
    proto = onnx.load(out)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 4]
    assert not list(tmp_path.glob(".onnxopt-tmp-*"))


def test_large_model_saved_with_external_data(tmp_path, monkeypatch):
    # Pretend the limit is tiny so a small model takes the >2 GB code path.
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD_BYTES", 10)
    w = numpy_helper.from_array(np.arange(4 * 256, dtype=np.float32).reshape(4, 256) / 1000, "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 256])],
        [w],
    )
    tiny_model_path = tmp_path / "big.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tiny_model_path)
    model = model_io.load_model(tiny_model_path)
    out = model_io.save_model(model, tmp_path / "ext.onnx")
    assert (tmp_path / "ext.onnx.data").is_file()
    proto = onnx.load(out, load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer)
    # It loads back through our loader and runs the same.
    feeds = {"x": np.ones((2, 4), np.float32)}
    again = model_io.load_model(out)
    np.testing.assert_allclose(run_model(again, feeds)["y"], run_model(model_io.load_model(tiny_model_path), feeds)["y"])


def _model_with_external(tmp_path, location: str):
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    onnx.external_data_helper.set_external_data(w, location=location, offset=0, length=48)
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize(
    "location, message",
    [
        ("/etc/passwd", "absolute path"),
        ("../outside.bin", "outside the model's folder"),
        ("missing.bin", "is missing"),
    ],
)
def test_external_data_outside_folder_is_refused(tmp_path, location, message):
    (tmp_path / "outside.bin").write_bytes(b"\0" * 64)
    sub = tmp_path / "sub"
    sub.mkdir()
    path = _model_with_external(sub, location)
    with pytest.raises(OnnxoptError, match=message):
        model_io.load_model(path)


def test_external_data_symlink_escaping_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\1" * 64)
    sub = tmp_path / "models"
    sub.mkdir()
    os.symlink(secret, sub / "weights.bin")
    path = _model_with_external(sub, "weights.bin")
    with pytest.raises(OnnxoptError, match="resolves outside"):
        model_io.load_model(path)


def test_failed_save_leaves_no_file(tiny_model_path, tmp_path, monkeypatch):
    model = model_io.load_model(tiny_model_path)

    def broken_save(model, path, **kwargs):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ir, "save", broken_save)
    with pytest.raises(OnnxoptError, match="No space left"):
        model_io.save_model(model, tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


def test_save_refuses_to_overwrite_input(tiny_model_path):
    model = model_io.load_model(tiny_model_path)
    with pytest.raises(OnnxoptError, match="is the input model"):
        model_io.save_model(model, tiny_model_path)


# --- sample inputs -----------------------------------------------------------


def test_sample_inputs_follow_signature_and_vocab():
    vocab = numpy_helper.from_array(np.zeros((30, 8), np.float32), "emb")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
            helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["m", "ax"], ["m3"]),
            helper.make_node("Mul", ["h", "m3"], ["y"]),
        ],
        "g",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])],
        [vocab, numpy_helper.from_array(np.array([2], np.int64), "ax")],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    feeds = make_sample_inputs(model, parse_shape_specs(["input_ids:2x7"]))
    assert feeds["input_ids"].shape == (2, 7)
    assert feeds["attention_mask"].shape == (2, 7)  # shares the symbolic dims
    assert feeds["input_ids"].max() < 30 and feeds["input_ids"].min() >= 0
    assert (feeds["attention_mask"] == 1).all()
    with pytest.raises(OnnxoptError, match="no input 'nope'"):
        make_sample_inputs(model, {"nope": (1,)})
    with pytest.raises(OnnxoptError, match="expected NAME:DIMS"):
        parse_shape_specs(["1x3"])


# --- pass manager ------------------------------------------------------------


def _verifier(model):
    return Verifier.from_model(model, [make_sample_inputs(model, {"x": (3, 4)})])


def test_statistics_and_input_untouched(tiny_model_path):
    before = _sha(tiny_model_path)
    model = model_io.load_model(tiny_model_path)
    result = PassManager(["identity-elimination", "remove-unused"], verifier=_verifier(model)).run(model)
    assert [s.name for s in result.stats] == ["identity-elimination", "remove-unused"]
    ident = result.stats[0]
    assert ident.nodes_before == 5 and ident.nodes_after == 4 and ident.rewrites >= 1
    assert result.nodes_before == 5 and result.nodes_after == 4
    # What each pass removed itself adds up to the pipeline's change.
    assert ident.nodes_removed == 1 and sum(s.nodes_removed for s in result.stats) == 1
    assert len(list(model.graph)) == 5  # the caller's model is not modified
    assert _sha(tiny_model_path) == before


def test_breaking_pass_is_found_by_bisection_and_rolled_back(tiny_model_path):
    from tests.examples_path import load_example_pass

    model = model_io.load_model(tiny_model_path)
    double_neg = load_example_pass()
    passes = ["identity-elimination", CorruptWeight(), double_neg, "remove-unused"]
    result = PassManager(passes, verifier=_verifier(model), iterate=False).run(model)
    assert list(result.rolled_back) == ["CorruptWeight"]
    assert "drifted" in result.rolled_back["CorruptWeight"]
    # The rest of the pipeline still ran: Identity and both Negs are gone.
    ops = [n.op_type for n in result.model.graph]
    assert ops == ["MatMul", "Add"]
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)}
    np.testing.assert_allclose(
        run_model(result.model, feeds)["y"], run_model(model, feeds)["y"], rtol=1e-5, atol=1e-6
    )


def test_verify_each_rolls_back_only_the_breaking_pass(tiny_model_path):
    model = model_io.load_model(tiny_model_path)
    result = PassManager(
        ["identity-elimination", CorruptWeight(), "remove-unused"], verifier=_verifier(model), verify="each", iterate=False
    ).run(model)
    assert list(result.rolled_back) == ["CorruptWeight"]
    status = {s.name: s.status for s in result.stats}
    assert status["CorruptWeight"].startswith("rolled back")
    assert status["identity-elimination"] == "ok"
    assert [n.op_type for n in result.model.graph] == ["Neg", "Neg", "MatMul", "Add"]


@pytest.mark.parametrize("verify", ["final", "each", "off"])
def test_raising_pass_is_rolled_back(tiny_model_path, verify):
    model = model_io.load_model(tiny_model_path)
    verifier = _verifier(model) if verify != "off" else None
    result = PassManager(["identity-elimination", Explode()], verifier=verifier, verify=verify, iterate=False).run(model)
    assert "Explode" in result.rolled_back and "boom" in result.rolled_back["Explode"]
    assert [n.op_type for n in result.model.graph] == ["Neg", "Neg", "MatMul", "Add"]


def test_fixed_point_cap_warns(tiny_model_path, caplog):
    from onnxopt.passes.registry import PassInfo

    model = model_io.load_model(tiny_model_path)
    info = PassInfo("never-settles", "test", NeverSettles, fixed_point=True)
    with caplog.at_level("WARNING", logger="onnxopt"):
        result = PassManager([info], verify="off", iterate=False).run(model)
    assert result.stats[0].runs == 10
    assert "did not reach a fixed point" in caplog.text


def test_subgraphs_and_functions_survive(tmp_path):
    """If branches keep their bodies and results; cleanup descends into them."""
    then_g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["t0"]), helper.make_node("Neg", ["t0"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Abs", ["x"], ["e"])], "else", [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])]
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)],
        "main",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    path = tmp_path / "if.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    result = onnxopt.optimize_file(path, tmp_path / "if.opt.onnx", preset="cleanup", inputs={"c": np.array(True), "x": np.array([1.0, -2.0], np.float32)})
    out = onnx.load(tmp_path / "if.opt.onnx")
    then_ops = [n.op_type for n in out.graph.node[0].attribute[0].g.node] + [n.op_type for n in out.graph.node[0].attribute[1].g.node]
    assert "Identity" not in then_ops and "Neg" in then_ops and "Abs" in then_ops
    assert not result.rolled_back
    for cond in (True, False):
        feeds = {"c": np.array(cond), "x": np.array([1.0, -2.0], np.float32)}
        np.testing.assert_array_equal(
            run_model(model_io.load_model(tmp_path / "if.opt.onnx"), feeds)["y"], run_model(model_io.load_model(path), feeds)["y"]
        )


def test_saved_model_carries_no_new_intermediate_shapes(tmp_path):
    """Shapes inferred during folding stay out of the output (they change ORT's fusions)."""
    from tests.conftest import real_model

    src = real_model("cls")
    before = {v.name for v in onnx.load(src).graph.value_info}
    onnxopt.optimize_file(src, tmp_path / "cls.opt.onnx")
    out = onnx.load(tmp_path / "cls.opt.onnx")
    produced = {o for n in out.graph.node for o in n.output}
    annotated = {v.name for v in out.graph.value_info if v.type.tensor_type.HasField("shape")}
    assert not (annotated & produced) - before


def test_half_precision_outputs_get_half_precision_tolerances(tmp_path):
    """A float16 model's passes move outputs by a few fp16 ulps (~1e-3 relative); the float32
    defaults rolled every such pass back. Given tolerances are kept as given."""
    import onnxopt
    from onnxopt.verify import default_tolerances

    c = numpy_helper.from_array(np.array(0.5, np.float16), "c")
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["n1"]), helper.make_node("Neg", ["n1"], ["n2"]),
         helper.make_node("Mul", ["n2", "c"], ["y"])], "half",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 4])], [c],
    )
    path = tmp_path / "half.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    model = onnxopt.load_model(path)
    assert default_tolerances(model, None, None) == (2e-3, 1e-3, "float16 output 'y'")
    assert default_tolerances(model, 1e-4, 1e-5) == (1e-4, 1e-5, None)
    result = onnxopt.optimize(path)
    assert (result.rtol, result.atol) == (2e-3, 1e-3)
    assert any("float16 output 'y' rounds at half precision" in w for w in result.warnings)
    fp32 = onnxopt.optimize(path, rtol=1e-4, atol=1e-5)
    assert (fp32.rtol, fp32.atol) == (1e-4, 1e-5) and not fp32.warnings
