"""The CLI: every command's happy path and every bad input from the foundation issue.

Bad input must give exactly one line on stderr, a non-zero exit, no traceback and no
output file. The in-process runs call the same ``main`` the console script calls.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxopt.cli import main
from tests.examples_path import EXAMPLE


def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("onnxopt: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_optimize_writes_verified_model(capsys, tiny_model_path, tmp_path):
    out = tmp_path / "out.onnx"
    code, stdout, err = run_cli(capsys, "optimize", tiny_model_path, "-o", out, "--json", tmp_path / "stats.json")
    assert code == 0, err
    assert out.is_file()
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["nodes_before"] == 5 and stats["nodes_after"] < 5
    assert (stats["rtol"], stats["atol"]) == (1e-4, 1e-5)  # what it was verified within
    assert "identity-elimination" in stdout
    code, stdout, err = run_cli(capsys, "compare", tiny_model_path, out, "--shape", "x:3x4")
    assert code == 0, err
    assert "yes" in stdout


def test_plugin_pass_runs_from_cli_and_shows_in_statistics(capsys, tiny_model_path, tmp_path):
    out = tmp_path / "out.onnx"
    code, stdout, err = run_cli(
        capsys, "optimize", tiny_model_path, "-o", out, "--plugin", EXAMPLE, "--passes", "remove-double-neg,remove-unused", "--verify"
    )
    assert code == 0, err
    assert "remove-double-neg" in stdout
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert "Neg" not in ops


def test_passes_lists_registry_and_presets(capsys):
    code, stdout, _ = run_cli(capsys, "passes")
    assert code == 0
    for name in ("identity-elimination", "cse", "remove-unused", "default", "cleanup"):
        assert name in stdout


def test_inspect_reports_signature_and_ops(capsys, tiny_model_path):
    code, stdout, _ = run_cli(capsys, "inspect", tiny_model_path, "--json")
    assert code == 0
    info = json.loads(stdout)
    assert info["inputs"] == [{"name": "x", "type": "float[batch,4]"}]
    assert info["op_histogram"]["Neg"] == 2
    assert info["parameters"] == 15


def test_compare_exits_nonzero_past_tolerance(capsys, tiny_model_path, tmp_path):
    model = onnx.load(tiny_model_path)
    model.graph.initializer[1].float_data[:] = []
    arr = np.frombuffer(model.graph.initializer[1].raw_data, np.float32) + 0.5
    model.graph.initializer[1].raw_data = arr.tobytes()
    other = tmp_path / "other.onnx"
    onnx.save(model, other)
    code, stdout, err = run_cli(capsys, "compare", tiny_model_path, other)
    assert code == 1
    assert "NO" in stdout


def _bad(tmp_path, kind):
    p = tmp_path / f"{kind}.onnx"
    if kind == "not-onnx":
        p.write_text("this is not a model\n" * 10)
    elif kind == "random-bytes":
        p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "checker":
        graph = helper.make_graph(
            [helper.make_node("Relu", ["missing"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        p.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return p


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing", "no such file"),
        ("not-onnx", "not a valid ONNX model"),
        ("random-bytes", "not a valid ONNX model"),
        ("truncated", "not a valid ONNX model"),
        ("checker", "fails the ONNX checker"),
    ],
)
def test_bad_model_files(capsys, tmp_path, tiny_model_path, case, expect):
    if case == "missing":
        model = tmp_path / "nope.onnx"
    elif case == "truncated":
        model = tmp_path / "trunc.onnx"
        data = tiny_model_path.read_bytes()
        model.write_bytes(data[: len(data) // 2])
    else:
        model = _bad(tmp_path, case)
    out = tmp_path / "out.onnx"
    commands = [["optimize", model, "-o", out], ["compare", model, model]]
    if case != "checker":  # inspect shows a model that parses, and what the checker said
        commands.append(["inspect", model])
    for args in commands:
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, expect)
    assert not out.exists()
    if case == "checker":
        code, stdout, err = run_cli(capsys, "inspect", model)
        assert code == 0, err
        assert "fails the ONNX checker:" in stdout and "Relu" in stdout


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--passes", "no-such-pass"], "unknown pass 'no-such-pass'"),
        (["--preset", "turbo"], "unknown preset 'turbo'"),
        (["--shape", "y:1x4"], "no input 'y'"),
        (["--shape", "x:1x5"], "fixed to 4"),
        (["--plugin", "no_such_module_xyz"], "failed to import"),
        (["--plugin", "json"], "defines no pass"),
        # contradictions: refused rather than letting one option win silently
        (["--verify", "--no-verify"], "--verify and --no-verify contradict each other"),
        (["--preset", "default", "--passes", "cse"], "give --passes or --preset, not both"),
        (["--passes", ""], "no passes given: --passes is empty"),
        (["--passes", " , "], "no passes given: --passes is empty"),
    ],
)
def test_bad_options(capsys, tiny_model_path, tmp_path, args, expect):
    out = tmp_path / "out.onnx"
    code, _, err = run_cli(capsys, "optimize", tiny_model_path, "-o", out, *args)
    assert_one_line_error(code, err, expect)
    assert not out.exists()


def test_bad_output_paths(capsys, tiny_model_path, tmp_path):
    before = tiny_model_path.read_bytes()
    code, _, err = run_cli(capsys, "optimize", tiny_model_path, "-o", tmp_path / "no" / "dir" / "out.onnx")
    assert_one_line_error(code, err, "output folder does not exist")
    code, _, err = run_cli(capsys, "optimize", tiny_model_path, "-o", tiny_model_path)
    assert_one_line_error(code, err, "is the input model")
    assert tiny_model_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


def test_usage_error_is_one_line(capsys, tiny_model_path):
    code, _, err = run_cli(capsys, "optimize", tiny_model_path)
    assert_one_line_error(code, err, "Missing option '-o'")


def test_console_script_entry_point(tiny_model_path, tmp_path):
    """The installed entry point behaves like main(): a real process, real exit code."""
    proc = subprocess.run(
        [sys.executable, "-m", "onnxopt.cli", "optimize", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o.onnx")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such file" in proc.stderr


def test_demo_runs(capsys, tmp_path):
    code, stdout, err = run_cli(capsys, "demo", "--synthetic", "-o", tmp_path / "demo")
    assert code == 0, err
    assert (tmp_path / "demo" / "demo_cnn.opt.onnx").is_file()
    assert "outputs match the original" in stdout
    assert "rapidocr" not in stdout  # --synthetic is a choice, not a fallback: no install hint


def test_demo_falls_back_to_the_bundled_model_with_a_hint(capsys, tmp_path, monkeypatch):
    import onnxopt.demo
    from onnxopt.testing.real_models import RealModelUnavailable

    def unavailable():
        raise RealModelUnavailable("rapidocr_onnxruntime is not installed")

    monkeypatch.setattr(onnxopt.demo, "real_model_path", unavailable)
    code, stdout, err = run_cli(capsys, "demo", "-o", tmp_path / "demo")
    assert code == 0, err
    assert (tmp_path / "demo" / "demo_cnn.opt.onnx").is_file()
    assert "pip install --no-deps rapidocr-onnxruntime==1.4.4" in stdout


def test_demo_real_model(capsys, tmp_path):
    """The README's first command: the PP-OCRv4 detector from the rapidocr wheel, optimized and timed."""
    import hashlib

    import onnxruntime as ort

    from onnxopt.testing.real_models import RealModelUnavailable, ppocr_model

    try:
        installed = ppocr_model("det")
    except RealModelUnavailable as exc:
        pytest.skip(str(exc))
    digest = hashlib.sha256(installed.read_bytes()).hexdigest()
    folder = tmp_path / "demo"
    code, stdout, err = run_cli(capsys, "demo", "-o", folder, "--runs", 3)
    assert code == 0, err
    original, optimized = folder / installed.name, folder / (installed.stem + ".opt.onnx")
    assert original.is_file() and optimized.is_file()
    assert hashlib.sha256(installed.read_bytes()).hexdigest() == digest  # the installed file is never touched
    ort.InferenceSession(str(optimized), providers=["CPUExecutionProvider"])
    assert len(onnx.load(optimized).graph.node) < len(onnx.load(original).graph.node)
    assert "PP-OCRv4" in stdout and "outputs match the original" in stdout
    assert "speedup" in stdout and "95% CI" in stdout
    assert "timing original vs optimized" in err  # progress on stderr


def test_json_report_gets_normal_permissions(capsys, tiny_model_path, tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        code, _, err = run_cli(capsys, "optimize", tiny_model_path, "-o", tmp_path / "o.onnx", "--json", tmp_path / "s.json")
    finally:
        os.umask(umask)
    assert code == 0, err
    assert stat.S_IMODE((tmp_path / "s.json").stat().st_mode) == 0o644


def test_no_arguments_print_the_help_not_an_error(capsys):
    code, stdout, err = run_cli(capsys)
    assert code == 0 and err == ""
    assert stdout.startswith("Usage: onnxopt") and "quantize" in stdout


def test_smoothquant_alpha_with_smoothquant_off_is_refused(capsys, tiny_model_path, tmp_path):
    out = tmp_path / "q.onnx"
    code, _, err = run_cli(capsys, "quantize", tiny_model_path, "-o", out, "--calib", "random", "--shape", "x:1x4",
                           "--smoothquant", "off", "--smoothquant-alpha", "0.5")
    assert_one_line_error(code, err, "--smoothquant off turns it off")
    assert not out.exists()


def test_passes_lists_a_plugins_passes(capsys):
    code, stdout, err = run_cli(capsys, "passes", "--plugin", EXAMPLE)
    assert code == 0, err
    row = next(line for line in stdout.splitlines() if "remove-double-neg" in line)
    assert "remove_double_neg" in row or "examples" in row  # its source: the plugin file


def test_shapes_that_disagree_on_a_named_dimension_are_refused(capsys, tmp_path):
    """Two inputs sharing 'seq' given 128 and 64 used to reach ORT as a broadcast error."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "two",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", "seq"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])],
    )
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    code, _, err = run_cli(capsys, "compare", path, path, "--shape", "a:1x128", "--shape", "b:1x64")
    assert_one_line_error(code, err, "--shape b: dimension 1 ('seq') is 64, but a gives 'seq' as 128")
    code, _, err = run_cli(capsys, "compare", path, path, "--shape", "a:1x128", "--shape", "a:1x64")
    assert_one_line_error(code, err, "--shape a: given twice (1x128 and 1x64)")
    code, stdout, err = run_cli(capsys, "compare", path, path, "--shape", "a:2x8", "--shape", "b:2x8")
    assert code == 0, err


def test_verbose_flag_works_after_the_command_too(tiny_model_path, tmp_path):
    """`onnxopt optimize m.onnx -o o.onnx -v` is how people type it; it used to be 'No such option'."""
    def run(*args):
        return subprocess.run([sys.executable, "-m", "onnxopt.cli", *map(str, args)], capture_output=True, text=True)

    quiet = run("optimize", tiny_model_path, "-o", tmp_path / "a.onnx")
    after = run("optimize", tiny_model_path, "-o", tmp_path / "b.onnx", "-v")
    before = run("-v", "optimize", tiny_model_path, "-o", tmp_path / "c.onnx")
    assert quiet.returncode == after.returncode == before.returncode == 0, after.stderr
    assert "onnxopt:" not in quiet.stderr
    assert after.stderr.count("onnxopt:") == before.stderr.count("onnxopt:") > 0


def test_compare_warns_when_outputs_are_nan_in_both_models(capsys, tmp_path):
    # Log of generated (partly negative) inputs is NaN in both models: equal, but unchecked.
    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["y"]), helper.make_node("Relu", ["x"], ["z"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 64])],
    )
    path = tmp_path / "log.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    code, stdout, err = run_cli(capsys, "compare", path, path)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning ")]
    assert len(warnings) == 1, err  # y only: z is finite
    assert "'y'" in warnings[0] and "NaN or inf in both models" in warnings[0]
    count = int(warnings[0].split("'y': ")[1].split(" of ")[0])
    assert 0 < count < 256  # two feeds of 128 values, about half negative
    # optimize's safety net says the same about its sample inputs
    code, _, err = run_cli(capsys, "optimize", path, "-o", tmp_path / "out.onnx")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning ")]
    assert len(warnings) == 1 and "'y'" in warnings[0] and "not checked" in warnings[0], err
