"""What ``onnxopt prune`` says about its run on the real PP-OCRv4 detector: random calibration
is labelled as a smoke test, the refit progress reaches its end and the summary explains the
layers that kept their cut weights, and cosine on ~0 outputs is reported as not meaningful."""

from __future__ import annotations

import json

import numpy as np

from tests.conftest import real_model
from tests.test_cli import run_cli


def test_prune_with_random_calibration_says_so_and_accounts_for_every_refit_layer(capsys, tmp_path):
    det = real_model("det")
    report = tmp_path / "report.json"
    code, stdout, err = run_cli(capsys, "prune", det, "-o", tmp_path / "p.onnx", "--ratio", "0.25", "--calib", "random",
                                "--samples", "4", "--shape", "x:1x3x160x160", "--report", report)
    assert code == 0, err
    rep = json.loads(report.read_text())
    # Random feeds are a smoke test wherever the run is described, not "calibration data".
    assert rep["ranking"] == "activation-aware (random data: a smoke test)"
    assert rep["evaluated_on"] == "4 random smoke-test samples the fit also used: optimistic, --max-drop holds some out"
    assert "(calibration data)" not in stdout and "4 calibration samples" not in stdout + err
    # Every candidate is either refit or kept its cut weights, with why; here deep convs at
    # 5x5 see too few rows, so both kinds occur.
    total, done, skipped = rep["refit_candidates"], rep["refit_layers"], rep["refit_skipped"]
    assert done and skipped and len(done) + len(skipped) == total
    assert not set(done) & set(skipped)
    assert all("sampled rows for" in why for why in skipped.values())
    progress = [line for line in err.splitlines() if "refit " in line and "/" in line]
    assert progress[-1].endswith(f"refit {total}/{total} layers: {len(done)} refit, {len(skipped)} kept their cut "
                                 "weights (too few calibration rows to fit them)"), progress
    summary = " ".join(stdout.split())  # rich wraps long lines
    assert f"{len(done)} of {total} layers refit ({len(skipped)} kept their cut weights: too few calibration rows" in summary
    assert f"({rep['params_after'] / rep['params_input']:.0%} of the input's)" in summary


def test_prune_reports_cosine_na_on_the_det_models_near_zero_maps(capsys, tmp_path):
    # Generated inputs show the detector no text: both models' maps are ~1e-4 everywhere and
    # the pruned one exactly 0, so the cosine (0.0000 before) says nothing.
    det = real_model("det")
    report = tmp_path / "report.json"
    code, stdout, err = run_cli(capsys, "prune", det, "-o", tmp_path / "p.onnx", "--ratio", "0.25", "--quiet",
                                "--report", report)
    assert code == 0, err
    out = json.loads(report.read_text())["outputs_vs_original"]["sigmoid_0.tmp_0"]
    assert out["cosine_min"] is None and out["cosine_feeds"] == 0 and out["feeds"] == 2
    assert 0 < out["max_abs"] < 1e-3
    text = " ".join(stdout.split())
    assert "cosine n/a (both models' outputs are ~0" in text and "cosine min 0.0000" not in text


def test_cosine_still_flags_an_output_that_collapses_to_zero():
    from onnxopt.pruning.api import _output_agreement

    # n/a only when both sides are ~0: a pruned model that outputs zeros where the original
    # has signal keeps its alarming cosine of 0.
    ref = [{"y": np.linspace(0.1, 1.0, 16, dtype=np.float32)}, {"y": np.full(16, 1e-5, np.float32)}]
    new = [{"y": np.zeros(16, np.float32)}, {"y": np.zeros(16, np.float32)}]
    out = _output_agreement(ref, new)["y"]
    assert out["cosine_min"] == 0.0 and out["cosine_feeds"] == 1 and out["feeds"] == 2


def test_prune_counts_the_input_files_parameters_and_a_classifiers_top1(capsys, tmp_path):
    """cls: the summary's 'before' was the BatchNorm-folded count (127,225, not the file's
    133,700), and cosine alone cannot show a broken 2-class classifier (>= 0.707 always)."""
    import numpy as np

    from onnxopt.pruning import prune
    from onnxopt.testing import real_models as rm

    cls = real_model("cls")
    calib = [{"x": rm.cls_preprocess(img)} for _, img in rm.images("calib", 6)]
    rep = prune(str(cls), ratio=0.5, calib=calib, progress=False).report
    assert rep["params_input"] > rep["params_before"] > rep["params_after"]
    (out,) = rep["outputs_vs_original"].values()
    assert 0.0 <= out["top1_agreement"] <= 1.0
    np.testing.assert_allclose(out["top1_agreement"] * 6, round(out["top1_agreement"] * 6))  # 6 rows
    assert "the fit also used" in rep["evaluated_on"]
