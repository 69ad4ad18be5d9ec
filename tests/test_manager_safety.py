"""The pass manager's safety net and statistics with passes that misbehave or repeat."""

from __future__ import annotations

import sys
import uuid

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxopt
from onnxopt.cli import main
from onnxopt.errors import OnnxoptError, VerificationError
from onnxopt.passes import PassManager, registry
from onnxopt.plugins import load_plugin
from onnxopt.testing.bad_models import BAD_MODELS
from onnxopt.verify import Verifier, run_model
from tests.examples_path import load_example_pass

FEEDS = {"x": np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)}


def _proto() -> onnx.ModelProto:
    """x[2,4] -> Neg -> Neg -> Identity -> MatMul(W) -> Add(b) -> Relu -> y."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Neg", ["x"], ["n1"]),
        helper.make_node("Neg", ["n1"], ["n2"]),
        helper.make_node("Identity", ["n2"], ["i1"]),
        helper.make_node("MatMul", ["i1", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["a"]),
        helper.make_node("Relu", ["a"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "safety",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [
            numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W"),
            numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _model() -> ir.Model:
    return ir.serde.deserialize_model(_proto())


def _verifier(model: ir.Model) -> Verifier:
    return Verifier.from_model(model, [FEEDS])


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def _assert_same_answers(result_model: ir.Model, original: ir.Model) -> None:
    np.testing.assert_allclose(run_model(result_model, FEEDS)["y"], run_model(original, FEEDS)["y"], rtol=1e-5, atol=1e-6)


class ReplaceOp(ir.passes.InPlacePass):
    """Renames every ``src`` node to ``dst`` (wrong unless they compute the same)."""

    def __init__(self, src: str, dst: str, *, report: bool = True):
        super().__init__()
        self.src, self.dst, self.report = src, dst, report

    def call(self, model):
        hits = [n for n in model.graph if n.op_type == self.src and self.src != self.dst]
        for node in hits:
            node.op_type = self.dst
        self.rewrites = 0  # under-reports: its rewrites are never counted
        return ir.passes.PassResult(model, modified=bool(hits) and self.report)


class DropFirstNeg(ir.passes.InPlacePass):
    """Breaks the model: removes one Neg of the pair (a node less, the sign flipped)."""

    def call(self, model):
        node = next(n for n in model.graph if n.op_type == "Neg")
        node.outputs[0].replace_all_uses_with(node.inputs[0])
        model.graph.remove(node, safe=True)
        return ir.passes.PassResult(model, modified=True)


class Explode(ir.passes.InPlacePass):
    def call(self, model):
        raise RuntimeError("boom")


# --- bug 1: "each" checks what a pass changed, and the result ---------------------------


@pytest.mark.parametrize("report", [True, False], ids=["modified-no-rewrites", "reports-nothing"])
def test_each_catches_a_pass_that_under_reports(report):
    """Relu -> Sigmoid with rewrites 0: the culprit is rolled back, not the innocent pass after it."""
    model = _model()
    passes = [ReplaceOp("Relu", "Sigmoid", report=report), "identity-elimination"]
    result = PassManager(passes, verifier=_verifier(model), verify="each", iterate=False).run(model)
    assert list(result.rolled_back) == ["ReplaceOp"]
    assert {s.name: s.status for s in result.stats}["identity-elimination"] == "ok"
    assert _ops(result.model) == ["Neg", "Neg", "MatMul", "Add", "Relu"]
    assert result.verified
    _assert_same_answers(result.model, model)


def test_modified_counts_as_a_change_for_the_pipeline_fixed_point():
    """Relu -> Identity (rewrites 0, modified): the pipeline runs again, so the Identity goes."""
    model = PassManager(["identity-elimination"], verify="off").run(_model()).model  # nothing left for round 1
    result = PassManager(["identity-elimination", ReplaceOp("Relu", "Identity")], verify="off").run(model)
    assert _ops(result.model) == ["Neg", "Neg", "MatMul", "Add"]


# --- bug 2: no silent "verified", paths accepted -----------------------------------------


@pytest.mark.parametrize("verify", ["final", "each"])
def test_verify_without_verifier_is_refused(verify):
    with pytest.raises(OnnxoptError, match=r"verifier=Verifier\.from_model\(model, feeds\).*verify='off'"):
        PassManager(["remove-unused"], verify=verify)
    with pytest.raises(OnnxoptError, match="verify must be"):
        PassManager(["remove-unused"], verify="sometimes")


def test_run_takes_a_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_proto(), path)
    result = PassManager(["identity-elimination"], verify="off").run(str(path))
    assert result.nodes_before == 6 and result.nodes_after == 5
    with pytest.raises(OnnxoptError, match="onnx_ir.Model or a path"):
        PassManager(["identity-elimination"], verify="off").run(object())


# --- bugs 3 and 4: one row per pass in the pipeline, under its registered name ---------


@pytest.mark.parametrize("verify", ["final", "each"])
def test_two_instances_of_one_class_are_rolled_back_separately(verify):
    model = _model()
    passes = [ReplaceOp("MatMul", "MatMul"), ReplaceOp("Relu", "Sigmoid")]
    result = PassManager(passes, verifier=_verifier(model), verify=verify, iterate=False).run(model)
    assert [s.name for s in result.stats] == ["ReplaceOp", "ReplaceOp#2"]
    assert list(result.rolled_back) == ["ReplaceOp#2"]
    assert [s.status for s in result.stats][0] == "ok"
    # runs count every run, the bisection's too: once per pipeline run here
    assert result.stats[0].runs == (1 if verify == "each" else 4)
    _assert_same_answers(result.model, model)


def test_repeated_registered_name_gets_its_own_row():
    load_example_pass()  # registers remove-double-neg
    result = PassManager(["remove-double-neg", "remove-unused", "remove-double-neg"], verify="off", iterate=False).run(_model())
    assert [s.name for s in result.stats] == ["remove-double-neg", "remove-unused", "remove-double-neg#2"]
    assert [s.rewrites for s in result.stats] == [1, 2, 0]  # the second one found nothing left


def test_instance_and_class_of_a_registered_pass_use_its_name():
    instance = load_example_pass()
    result = PassManager([instance, type(instance)], verify="off", iterate=False).run(_model())
    assert [s.name for s in result.stats] == ["remove-double-neg", "remove-double-neg#2"]


# --- bug 5: one status text for a pass that raises ---------------------------------------


def test_raising_pass_has_the_same_status_in_every_mode():
    model = _model()
    for verify in ("final", "each"):
        result = PassManager(["identity-elimination", Explode()], verifier=_verifier(model), verify=verify).run(model)
        status = {s.name: s.status for s in result.stats}
        assert status == {"identity-elimination": "ok", "Explode": "rolled back: raised RuntimeError: boom"}, verify


# --- bug 6: per-pass node counts reconcile -----------------------------------------------


def test_node_counts_reconcile_when_the_pipeline_iterates():
    load_example_pass()
    model = _model()
    result = PassManager(["identity-elimination", "remove-double-neg", "remove-unused"], verifier=_verifier(model)).run(model)
    counts = {s.name: (s.nodes_before, s.nodes_after, s.nodes_removed) for s in result.stats}
    # Each pass did its work in the first round: the counts around it then.
    assert counts == {"identity-elimination": (6, 5, 1), "remove-double-neg": (5, 5, 0), "remove-unused": (5, 3, 2)}
    assert all(s.runs == 2 for s in result.stats)  # the second round changed nothing


def test_node_counts_reconcile_over_rounds_and_rollbacks():
    """remove-unused works in two rounds; a rolled-back pass keeps no counts."""
    load_example_pass()
    model = _model()
    passes = ["remove-unused", DropFirstNeg(), "remove-double-neg"]
    result = PassManager(passes, verifier=_verifier(model), verify="each").run(model)
    assert list(result.rolled_back) == ["DropFirstNeg"]
    for s in result.stats:
        assert s.nodes_before - s.nodes_after == s.nodes_removed, s
    assert sum(s.nodes_removed for s in result.stats) == result.nodes_before - result.nodes_after == 2
    unused = result.stats[0]
    assert (unused.nodes_before, unused.nodes_after) == (6 + 6, 6 + 4)  # rounds 1 and 2


# --- bug 7: a plugin module loads any number of times ------------------------------------

PLUGIN_BY_CLASS = '''
import onnx_ir as ir


class {cls}(ir.passes.InPlacePass):
    """Removes Identity nodes (plugin test)."""

    def call(self, model):
        return ir.passes.common.IdentityEliminationPass()(model)
'''

PLUGIN_BY_CALL = '''
import onnx_ir as ir
import onnxopt


@onnxopt.register_pass("{name}", "Removes Identity nodes (plugin test)")
class Mine(ir.passes.InPlacePass):
    def call(self, model):
        return ir.passes.common.IdentityEliminationPass()(model)
'''


@pytest.fixture
def scratch_registry(monkeypatch):
    """Plugin passes registered by a test go away with it."""
    registry._ensure_loaded()
    monkeypatch.setattr(registry, "PASSES", dict(registry.PASSES))


@pytest.mark.parametrize("how", ["class", "register_pass"])
def test_plugin_module_loads_twice(how, tmp_path, monkeypatch, scratch_registry):
    tag = "".join(chr(ord("a") + int(c, 16)) for c in uuid.uuid4().hex[:8])  # letters: kebab-case stays simple
    module, name = f"onnxopt_test_plugin_{tag}", f"drop-identity-{tag}"
    if how == "class":
        source = PLUGIN_BY_CLASS.format(cls=f"DropIdentity{tag.capitalize()}")
    else:
        source = PLUGIN_BY_CALL.format(name=name)
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        for _ in range(2):
            result = onnxopt.optimize(_model(), passes=[name], plugins=[module], verify="off")
            assert [s.name for s in result.stats] == [name]
            assert "Identity" not in _ops(result.model)
        assert load_plugin(module) == [name]
    finally:
        sys.modules.pop(module, None)


# --- bug 8: the "cannot verify" hint is right for every command --------------------------


def test_unverifiable_model_hint_names_the_command_that_can_skip(tmp_path, capsys):
    path = BAD_MODELS["custom_domain"][0](tmp_path)
    with pytest.raises(VerificationError, match="only optimize can skip this check: --no-verify"):
        Verifier.from_model(ir.serde.deserialize_model(onnx.load(path)), [FEEDS])
    capsys.readouterr()
    rc = main(["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.5"])
    err = capsys.readouterr().err
    assert rc == 2 and "only optimize can skip" in err


# --- session 9 audit: custom passes that misbehave ----------------------------------------


class ScaleWeightInPlace(ir.passes.InPlacePass):
    """Writes into an initializer's array instead of replacing the tensor (a user bug)."""

    def call(self, model):
        a = model.graph.initializers["W"].const_value.numpy()
        a *= 1.5
        return ir.passes.PassResult(model, modified=True)


@pytest.mark.parametrize("verify", ["final", "each"])
def test_a_pass_writing_weights_in_place_cannot_change_the_callers_model(verify):
    """The copies share tensor data: the write changed the caller's model and the pristine
    copy, and the result came back 'verified' with an innocent pass blamed."""
    model = _model()
    w = model.graph.initializers["W"]
    w.const_value = ir.tensor(w.const_value.numpy().copy(), name="W")  # in memory, writeable (as built in Python)
    before = w.const_value.numpy().copy()
    result = onnxopt.optimize(model, passes=[ScaleWeightInPlace(), "identity-elimination"], verify=verify, inputs=FEEDS)
    assert list(result.rolled_back) == ["ScaleWeightInPlace"]
    assert result.rolled_back["ScaleWeightInPlace"].startswith("raised ValueError")  # read-only while passes run
    np.testing.assert_array_equal(model.graph.initializers["W"].const_value.numpy(), before)
    assert model.graph.initializers["W"].const_value.numpy().flags.writeable  # given back as it was
    _assert_same_answers(result.model, _model())


def test_an_output_the_check_cannot_see_is_named():
    """Outputs within atol of zero on the sample inputs pass whatever a pass does to them."""
    model = _model()
    tiny = ir.Value(name="tiny", const_value=ir.tensor(np.float32(1e-8)))
    model.graph.register_initializer(tiny)
    relu = model.graph.node(-1)
    mul = ir.node("Mul", [relu.outputs[0], tiny])
    model.graph.append(mul)
    mul.outputs[0].name, mul.outputs[0].dtype, mul.outputs[0].shape = "small", ir.DataType.FLOAT, ir.Shape([2, 3])
    model.graph.outputs.append(mul.outputs[0])
    result = onnxopt.optimize(model)
    lines = [w for w in result.warnings if "cannot see" in w]
    assert len(lines) == 1 and "'small'" in lines[0], result.warnings


class TagNames(ir.passes.InPlacePass):
    """Not idempotent: prefixes every node name (each run changes the model)."""

    def call(self, model):
        for i, node in enumerate(model.graph):
            node.name = "u_" + (node.name or f"n{i}")
        return ir.passes.PassResult(model, modified=True)


def test_a_preset_registered_not_to_iterate_runs_once(scratch_registry, monkeypatch):
    monkeypatch.setattr(registry, "PRESETS", dict(registry.PRESETS))
    registry.register_pass("tag-names-once-test", "prefix node names", factory=TagNames)
    registry.register_preset("tag-once-test", "tag once", ["tag-names-once-test"], iterate=False)
    result = onnxopt.optimize(_model(), preset="tag-once-test")
    assert [s.runs for s in result.stats] == [1]
    assert all(n.name.startswith("u_") and not n.name.startswith("u_u_") for n in result.model.graph)
    assert not result.warnings


class WeightToDouble(ir.passes.InPlacePass):
    """Leaves a MatMul with float input and double weight: the checker passes, ORT refuses it."""

    def call(self, model):
        w = model.graph.initializers["W"]
        w.const_value = ir.tensor(w.const_value.numpy().astype(np.float64), name="W")
        w.dtype = ir.DataType.DOUBLE
        return ir.passes.PassResult(model, modified=True)


def test_no_verify_still_refuses_a_result_ort_cannot_load(tmp_path):
    with pytest.raises(OnnxoptError, match="the optimized model is broken, not written: ONNX Runtime cannot load it"):
        onnxopt.optimize(_model(), passes=[WeightToDouble()], verify="off")
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(_proto(), path)
    with pytest.raises(OnnxoptError):
        onnxopt.optimize_file(path, out, passes=[WeightToDouble()], verify="off")
    assert not out.exists()


class FlipSign(ir.passes.InPlacePass):
    """Negates W on every run and always reports a change: breaks the model and never converges."""

    def call(self, model):
        w = model.graph.initializers["W"]
        w.const_value = ir.tensor(-w.const_value.numpy(), name="W")
        return ir.passes.PassResult(model, modified=True)


def test_warnings_of_a_discarded_run_are_not_reported():
    result = onnxopt.optimize(_model(), passes=[FlipSign(), "identity-elimination"], inputs=FEEDS)
    assert list(result.rolled_back) == ["FlipSign"]
    assert not any("still changing" in w for w in result.warnings), result.warnings  # the kept run converged


def test_a_name_clash_names_the_owner_and_leaves_the_registry_whole():
    """Registering 'cse' before anything loaded the built-ins broke their import half way:
    the next optimize ran a default preset without remove-unused and upgrade-opset was gone."""
    import subprocess

    code = (
        "import onnx_ir as ir, onnxopt\n"
        "from onnxopt.passes import registry\n"
        "try:\n"
        "    @onnxopt.register_pass('cse', 'mine')\n"
        "    class Mine(ir.passes.InPlacePass):\n"
        "        def call(self, model):\n"
        "            return ir.passes.PassResult(model, modified=False)\n"
        "except onnxopt.OnnxoptError as e:\n"
        "    print('ERROR', e)\n"
        "print('default', ','.join(registry.preset_passes('default')))\n"
        "print('upgrade', registry.get_pass('upgrade-opset').name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert "'cse' is taken by a pass from onnx-ir" in lines["ERROR"]
    assert "remove-unused" in lines["default"].split(",") and lines["upgrade"] == "upgrade-opset"


class Exits(ir.passes.InPlacePass):
    def call(self, model):
        sys.exit(3)


def test_a_pass_that_raises_or_exits_counts_its_run_and_is_rolled_back():
    result = onnxopt.optimize(_model(), passes=[Explode(), Exits(), "identity-elimination"], inputs=FEEDS)
    stats = {s.name: s for s in result.stats}
    assert stats["Explode"].runs == 1 and stats["Exits"].runs == 1  # the time was spent: shown
    assert result.rolled_back["Exits"] == "raised SystemExit: 3"
    assert "Identity" not in _ops(result.model)


def test_register_pass_refuses_a_plain_function(scratch_registry):
    with pytest.raises(OnnxoptError, match="decorates an onnx_ir.passes.PassBase subclass"):
        @registry.register_pass("a-function-test", "not a pass class")
        def not_a_pass(model):
            return model
