"""Bad input, for every command: one clear line on stderr, non-zero exit, nothing written.

Each case checks the whole contract a user relies on:
- exit status 1 or 2 (3 is "internal error": a bug, and fails the test),
- exactly one line on stderr, ``onnxopt: error: ...``, naming what is wrong; no traceback,
- no output file, and no ``.onnxopt-tmp-*`` leftovers in the output folder,
- the input files byte-identical afterwards.

The CLI runs in-process (``onnxopt.cli.main``) for speed; a few cases go through the
installed ``onnxopt`` entry point in a subprocess, which also catches anything ONNX
Runtime's C++ logger would print to the real stderr.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import pytest

from onnxopt.cli import cli, main
from onnxopt.testing import bad_models
from onnxopt.testing.bad_models import BAD_MODELS, small_graph

# Valid models that cannot run here: inspect and --no-verify may succeed, anything that
# has to run them must refuse cleanly.
UNRUNNABLE = {"custom_domain", "future_opset", "huge_input_dims", "fails_at_runtime", "constant_without_value"}


def _sha(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(folder: pathlib.Path) -> dict[str, str]:
    return {p.name: _sha(p) for p in sorted(folder.iterdir()) if p.is_file() and not p.is_symlink()}


def run_cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_clean_failure(rc: int, err: str, *, mentions=(), out_dir: pathlib.Path | None = None, output=None):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc in (1, 2), f"exit status {rc} (3 = internal error, a bug): {err}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("onnxopt: error: "), lines[0]
    assert "Traceback" not in err and "internal error" not in err
    if mentions:
        assert any(m in lines[0].lower() for m in mentions), f"{lines[0]!r} should mention one of {mentions}"
    if output is not None:
        assert not pathlib.Path(output).exists(), "an output file was written"
        assert not pathlib.Path(str(output) + ".data").exists()
    if out_dir is not None:
        leftovers = [p.name for p in out_dir.iterdir() if p.name.startswith(".onnxopt-tmp-") or p.name.endswith(".tmp")]
        assert not leftovers, f"temporary files left behind: {leftovers}"


@pytest.fixture
def dirs(tmp_path):
    src = tmp_path / "models"
    dst = tmp_path / "out"
    src.mkdir()
    dst.mkdir()
    return src, dst


@pytest.fixture
def good_model(dirs):
    src, _ = dirs
    path = src / "good.onnx"
    onnx.save(small_graph(), path)
    return path


def _bench_argv(model):
    return ["bench", model, "--runs", "1", "--warmup", "0"]


def _readable_but_fails_checker(path) -> bool:
    from onnxopt.model_io import load_model

    try:
        load_model(path, check=False)
    except Exception:  # noqa: BLE001 - unreadable: every command refuses it
        return False
    try:
        onnx.checker.check_model(onnx.load(path), full_check=False)
    except Exception:  # noqa: BLE001
        return True
    return False


def _commands_for(name: str, model: pathlib.Path, good: pathlib.Path, out: pathlib.Path):
    """(label, argv, writes) for every command that takes a model."""
    cmds = [
        ("optimize", ["optimize", model, "-o", out], out),
        ("compare-a", ["compare", model, good], None),
        ("compare-b", ["compare", good, model], None),
    ]
    if name not in UNRUNNABLE:
        cmds += [
            ("optimize-no-verify", ["optimize", model, "-o", out, "--no-verify"], out),
            ("inspect", ["inspect", model], None),
        ]
    if "bench" in cli.commands:
        cmds.append(("bench", _bench_argv(model), None))
    if "quantize" in cli.commands:
        cmds.append(("quantize", ["quantize", model, "-o", out, "--calib", "random", "--quiet"], out))
    return cmds


@pytest.mark.parametrize("name", sorted(BAD_MODELS))
def test_bad_model_every_command(name, dirs, good_model, capsys):
    src, dst = dirs
    builder, mentions = BAD_MODELS[name]
    model = builder(src)
    before = _snapshot(src)
    out = dst / "result.onnx"
    for label, argv, _ in _commands_for(name, model, good_model, out):
        rc, stdout, err = run_cli(argv, capsys)
        if label == "inspect" and _readable_but_fails_checker(model):
            # inspect shows what is inside such a model, with the checker's verdict on top.
            assert rc == 0 and "fails the ONNX checker:" in stdout, err
            continue
        assert_clean_failure(rc, err, out_dir=dst, output=out)
        if label.startswith("optimize") or label == "inspect":
            if name not in UNRUNNABLE:
                assert any(m in err.lower() for m in mentions), f"{label}: {err!r} should mention one of {mentions}"
    assert _snapshot(src) == before, "an input file changed"


@pytest.mark.parametrize("name", sorted(UNRUNNABLE))
def test_valid_but_unrunnable_model_is_inspectable_and_optimizable_unverified(name, dirs, capsys):
    src, dst = dirs
    model = BAD_MODELS[name][0](src)
    rc, out, err = run_cli(["inspect", model], capsys)
    assert rc == 0, err
    out_path = dst / "o.onnx"
    rc, _, err = run_cli(["optimize", model, "-o", out_path, "--no-verify"], capsys)
    assert rc == 0, err
    onnx.checker.check_model(onnx.load(out_path))
    # and with verification, the refusal says how to proceed
    rc, _, err = run_cli(["optimize", model, "-o", dst / "v.onnx"], capsys)
    assert_clean_failure(rc, err, output=dst / "v.onnx")
    if name in ("custom_domain", "future_opset"):
        assert "--no-verify" in err


def _npz(folder: pathlib.Path, name: str, **arrays) -> pathlib.Path:
    path = folder / name
    np.savez(path, **arrays)
    return path


def test_bad_inputs_files(dirs, good_model, capsys):
    src, dst = dirs
    out = dst / "o.onnx"
    not_npz = src / "junk.npz"
    not_npz.write_bytes(b"PK\x03\x04 not really a zip")
    cases = [
        (_npz(src, "name.npz", q=np.zeros((2, 4), np.float32)), ("'q'",)),
        (_npz(src, "dtype.npz", x=np.zeros((2, 4), np.float64)), ("float64",)),
        (_npz(src, "rank.npz", x=np.zeros(4, np.float32)), ("rank",)),
        (_npz(src, "dim.npz", x=np.zeros((2, 5), np.float32)), ("(2, 5)",)),
        (_npz(src, "extra.npz", x=np.zeros((2, 4), np.float32), y=np.zeros(1)), ("'y'",)),
        (not_npz, ("npz",)),
        (src / "missing.npz", ("no such",)),
    ]
    before = _snapshot(src)
    for path, mentions in cases:
        for argv in (
            ["optimize", good_model, "-o", out, "--inputs", path],
            ["compare", good_model, good_model, "--inputs", path],
        ):
            rc, _, err = run_cli(argv, capsys)
            assert_clean_failure(rc, err, mentions=mentions, out_dir=dst, output=out)
    assert _snapshot(src) == before


@pytest.mark.parametrize(
    "extra, mentions",
    [
        (["--shape", "x:2x5"], ("fixed to 4",)),
        (["--shape", "q:2x4"], ("'q'",)),
        (["--shape", "x:axb"], ("integers",)),
        (["--shape", "x:2x4x5"], ("rank",)),
        (["--shape", "x:1099511627776x4"], ("too large",)),
        (["--shape", "x:-1x4"], ("negative",)),
        (["--shape", "x:0x4"], ("empty",)),
        (["--passes", "no-such-pass"], ("no-such-pass",)),
        (["--passes", ","], ("no passes",)),
        (["--preset", "nope"], ("nope",)),
        (["--plugin", "no_such_plugin_module"], ("no_such_plugin_module",)),
        (["--plugin", "NOT_PYTHON"], ("not a python file",)),
        (["--rtol", "-1"], ("tolerance",)),
        (["--rtol", "abc"], ("rtol",)),
        (["--json", "MISSING_DIR/stats.json"], ("does not exist",)),
    ],
)
def test_bad_optimize_options(extra, mentions, dirs, good_model, capsys):
    src, dst = dirs
    out = dst / "o.onnx"
    extra = [str(dst / "nodir" / "stats.json") if e == "MISSING_DIR/stats.json" else e for e in extra]
    if "NOT_PYTHON" in extra:
        (src / "plugin.txt").write_text("not python")
        extra = [str(src / "plugin.txt") if e == "NOT_PYTHON" else e for e in extra]
    before = _snapshot(src)
    rc, _, err = run_cli(["optimize", good_model, "-o", out, *extra], capsys)
    assert_clean_failure(rc, err, mentions=mentions, out_dir=dst, output=out)
    assert _snapshot(src) == before


def test_bad_output_paths(dirs, good_model, capsys):
    src, dst = dirs
    before = _snapshot(src)
    for target, mentions in (
        (good_model, ("input model",)),
        (dst / "nodir" / "o.onnx", ("does not exist",)),
        (dst, ("folder",)),
    ):
        rc, _, err = run_cli(["optimize", good_model, "-o", target], capsys)
        assert_clean_failure(rc, err, mentions=mentions, out_dir=dst)
    # the input through a symlink is still the input
    link = dst / "link.onnx"
    os.symlink(good_model, link)
    rc, _, err = run_cli(["optimize", good_model, "-o", link], capsys)
    assert_clean_failure(rc, err, mentions=("input model",))
    assert _snapshot(src) == before


def test_other_commands_bad_arguments(dirs, good_model, capsys):
    src, dst = dirs
    other = src / "other.onnx"
    m = small_graph()
    m.graph.input[0].name = "z"
    m.graph.node[0].input[0] = "z"
    onnx.save(m, other)
    afile = dst / "afile"
    afile.write_text("x")
    for argv, mentions in (
        (["compare", good_model, other], ("different inputs",)),
        (["compare", good_model, src / "nofile.onnx"], ("no such file",)),
        (["inspect", src / "nofile.onnx"], ("no such file",)),
        (["inspect", src], ("folder",)),
        (["inspect"], ("missing argument",)),
        (["passes", "extra"], ("unexpected extra argument",)),
        (["demo", "-o", afile], ("is a file",)),
        (["no-such-command"], ("no such command",)),
    ):
        rc, _, err = run_cli(argv, capsys)
        assert_clean_failure(rc, err, mentions=mentions)


def test_interrupted_save_leaves_nothing(dirs, good_model, capsys, monkeypatch):
    """A failure while writing (disk full) leaves neither the output nor temporary files."""
    import onnx_ir as ir

    src, dst = dirs

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ir, "save", disk_full)
    out = dst / "o.onnx"
    rc, _, err = run_cli(["optimize", good_model, "-o", out], capsys)
    assert_clean_failure(rc, err, mentions=("no space",), out_dir=dst, output=out)


@pytest.mark.parametrize("name", ["random_bytes", "cycle", "external_dotdot", "custom_domain", "fails_at_runtime"])
def test_real_entry_point(name, dirs, good_model):
    """Through the installed ``onnxopt`` script: the same one line, also for ORT's C++ logger."""
    src, dst = dirs
    model = BAD_MODELS[name][0](src)
    out = dst / "o.onnx"
    before = _snapshot(src)
    exe = pathlib.Path(sys.executable).with_name("onnxopt")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "onnxopt.cli"]
    proc = subprocess.run([*argv, "optimize", str(model), "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert_clean_failure(proc.returncode, proc.stderr, out_dir=dst, output=out)
    assert proc.stdout.strip() == ""
    assert _snapshot(src) == before


def test_builders_cover_the_brief():
    """The catalogue of bad models is not allowed to shrink silently."""
    expected = {
        "random_bytes", "truncated", "cycle", "dangling_input", "duplicate_output", "unknown_op", "custom_domain",
        "no_opset", "huge_input_dims", "lying_initializer", "huge_initializer_dims", "external_missing",
        "external_absolute", "external_dotdot", "external_symlink",
    }
    assert expected <= set(BAD_MODELS)
    assert callable(bad_models.small_graph)


@pytest.mark.skipif("quantize" not in cli.commands, reason="no quantize command")
def test_quantize_calibration_data_that_does_not_match(dirs, good_model, capsys):
    src, dst = dirs
    out = dst / "q.onnx"
    junk = src / "junkdir"
    junk.mkdir()
    (junk / "a.npz").write_bytes(b"junk")
    empty = src / "emptydir"
    empty.mkdir()
    mixed = src / "mixed"
    mixed.mkdir()
    np.savez(mixed / "s1.npz", x=np.zeros((1, 4), np.float32))
    np.savez(mixed / "s2.npz", y=np.zeros((1, 4), np.float32))
    images = src / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    cases = [
        (["--calib", _npz(src, "name.npz", q=np.zeros((2, 4), np.float32))], ("'q'",)),
        (["--calib", _npz(src, "dtype.npz", x=np.zeros((2, 4), np.float64))], ("float64",)),
        (["--calib", _npz(src, "dim.npz", x=np.zeros((2, 5), np.float32))], ("(1, 5)", "(2, 5)")),
        (["--calib", junk], ("npz",)),
        (["--calib", empty], ("empty",)),
        (["--calib", mixed], ("'y'",)),
        (["--calib", images, "--image-size", "64x64"], ("rank",)),
        (["--calib", src / "nothere"], ("no such",)),
        (["--calib", "random", "--samples", "0"], ("samples",)),
        (["--calib", "random", "--shape", "x:0x4"], ("empty",)),
        (["--calib", "random", "--exclude", "NoSuchNode"], ("nosuchnode",)),
        (["--calib", "random", "--max-drop", "5"], ("max-drop",)),
        (["--calib", "random", "--image-size", "axb"], ("axb",)),
    ]
    before = _snapshot(src)
    for extra, mentions in cases:
        rc, _, err = run_cli(["quantize", good_model, "-o", out, "--quiet", *extra], capsys)
        assert_clean_failure(rc, err, mentions=mentions, out_dir=dst, output=out)
    assert _snapshot(src) == before


@pytest.mark.skipif("quantize" not in cli.commands, reason="no quantize command")
def test_quantize_refuses_a_quantized_model(dirs, good_model, capsys):
    src, dst = dirs
    q = dst / "q.onnx"
    rc, _, err = run_cli(["quantize", good_model, "-o", q, "--quiet", "--calib", "random"], capsys)
    assert rc == 0, err
    onnx.checker.check_model(onnx.load(q))
    rc, _, err = run_cli(["quantize", q, "-o", dst / "qq.onnx", "--quiet", "--calib", "random"], capsys)
    assert_clean_failure(rc, err, mentions=("already quantized",), out_dir=dst, output=dst / "qq.onnx")
