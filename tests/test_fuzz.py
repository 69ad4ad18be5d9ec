"""Bounded, seeded fuzzing of ``onnxopt optimize`` and ``inspect`` (see onnxopt/testing/fuzz.py).

300 mutated models (PP-OCR classifier and hand-built graphs: byte flips, truncation,
proto-level breakage, and valid-preserving rewrites that exercise the passes) run in a
child process with an alarm per command and an address-space limit. Every command must
either fail cleanly (exit 1/2, one ``onnxopt: error:`` line, no output file, no temporary
files, input unchanged) or write a valid model that gives the mutant's answers. Exit 3,
a traceback, a hang or a crash of the child is a failure.

``ONNXOPT_FUZZ_CASES=2000`` runs more cases (``ONNXOPT_FUZZ_SEED`` picks the seed).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import onnx
import pytest

from onnxopt.testing import fuzz
from onnxopt.testing.bad_models import small_graph

CASES = int(os.environ.get("ONNXOPT_FUZZ_CASES", "300"))
SEED = int(os.environ.get("ONNXOPT_FUZZ_SEED", "0"))


def _run_fuzzer(tmp_path, cases: int, seed: int, *flags: str):
    report = tmp_path / "fuzz.json"
    progress = tmp_path / "progress.txt"
    cmd = [
        sys.executable, "-m", "onnxopt.testing.fuzz", "--cases", str(cases), "--seed", str(seed),
        "--real-share", "0.05", "--json", str(report), "--progress", str(progress), *flags,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60 + 3 * cases)
    except subprocess.TimeoutExpired:
        last = progress.read_text().splitlines()[-1] if progress.exists() else "?"
        pytest.fail(f"the fuzzer hung; last case: {last}")
    if not report.exists():
        last = progress.read_text().splitlines()[-1] if progress.exists() else "?"
        pytest.fail(f"the fuzzer died (exit {proc.returncode}) at case: {last}\n{proc.stderr[-2000:]}")
    results = json.loads(report.read_text())
    failures = [r for r in results if r["outcome"].startswith("FAIL")]
    assert not failures, "\n".join(
        f"case {r['index']} [{r['seed_model']}: {r['mutation']}] {r['command']}: {r['outcome']}" for r in failures[:20]
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    return results


def test_fuzz_without_the_safety_net(tmp_path):
    """--no-verify: the passes alone must keep valid mutants' answers (nothing catches them)."""
    results = _run_fuzzer(tmp_path, 100, SEED + 1, "--no-verify")
    assert sum(r["outcome"] == "valid" for r in results if r["command"] == "optimize") >= 10


def test_fuzz_quantize(tmp_path):
    """quantize (random calibration) on mutants: a valid, loadable model or one clean error line."""
    results = _run_fuzzer(tmp_path, 60, SEED + 2, "--quantize")
    quantized = [r["outcome"] for r in results if r["command"] == "quantize"]
    assert quantized.count("valid") >= 5 and quantized.count("error") >= 5


def test_fuzz_prune(tmp_path):
    """prune (no calibration) on mutants: a valid, loadable model or one clean error line."""
    results = _run_fuzzer(tmp_path, 60, SEED + 3, "--prune")
    pruned = [r["outcome"] for r in results if r["command"] == "prune"]
    assert pruned.count("valid") >= 5 and pruned.count("error") >= 5


def test_fuzz_optimize_and_inspect(tmp_path):
    results = _run_fuzzer(tmp_path, CASES, SEED)
    assert len(results) == 2 * CASES
    outcomes = [r["outcome"] for r in results if r["command"] == "optimize"]
    # The mix must stay meaningful: both clean refusals and valid optimized models.
    assert outcomes.count("valid") >= CASES // 10, "too few mutants survive to exercise the passes"
    assert outcomes.count("error") >= CASES // 4, "too few mutants are broken"
    assert {r["seed_model"] for r in results} >= {"small", "demo_cnn", "attention", "if"}


def test_mutations_are_deterministic():
    seeds = fuzz.seed_models(include_real=False)
    a = [fuzz.mutate(seeds["demo_cnn"], random.Random(7)) for _ in range(1)]
    b = [fuzz.mutate(seeds["demo_cnn"], random.Random(7)) for _ in range(1)]
    assert a == b


def test_seed_models_are_valid_and_optimizable():
    from onnxopt.optimize import optimize
    import onnx_ir as ir

    for name, data in fuzz.seed_models(include_real=False).items():
        proto = onnx.load_from_string(data)
        onnx.checker.check_model(proto)
        result = optimize(ir.serde.deserialize_model(proto))
        assert result.nodes_after <= result.nodes_before, name
        assert not result.rolled_back, (name, result.rolled_back)


def test_judge_rejects_what_it_must(tmp_path):
    """The judge itself must fail on internal errors, noisy stderr, leftovers and wrong outputs."""
    assert fuzz._judge_failure(3, "onnxopt: internal error: boom\n", None, tmp_path).startswith("FAIL")
    assert fuzz._judge_failure(2, "onnxopt: error: a\nmore\n", None, tmp_path).startswith("FAIL")
    assert fuzz._judge_failure(2, "Traceback (most recent call last):\n", None, tmp_path).startswith("FAIL")
    assert fuzz._judge_failure(2, "onnxopt: error: bad model\n", None, tmp_path) == "error"
    out = tmp_path / "out.onnx"
    out.write_bytes(b"partial")
    assert "output written" in fuzz._judge_failure(2, "onnxopt: error: x\n", out, tmp_path)
    out.unlink()
    (tmp_path / ".onnxopt-tmp-abc").mkdir()
    assert "temporary" in fuzz._judge_failure(2, "onnxopt: error: x\n", out, tmp_path)

    # A "successful" output whose answers differ from the input model's.
    src = tmp_path / "m.onnx"
    onnx.save(small_graph(), src)
    wrong = small_graph()
    wrong.graph.node[2].op_type = "Sigmoid"
    onnx.save(wrong, out)
    assert "differs" in fuzz._judge_output(src, out)
    onnx.save(small_graph(), out)
    assert fuzz._judge_output(src, out) == "valid"


def test_alarm_turns_a_hang_into_a_failure(monkeypatch):
    import time

    import onnxopt.cli

    monkeypatch.setattr(onnxopt.cli, "main", lambda argv: time.sleep(5) or 0)
    rc, _, _, problem = fuzz._run_cli(["inspect", "x"], timeout=0.3)
    assert rc is None and problem.startswith("hang")
