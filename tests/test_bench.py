"""``onnxopt bench``: statistics, interleaved comparisons, IO binding, errors, JSON schema.

Tests check behaviour (what is reported, that it is consistent, that outputs are
compared on the same inputs, that bad input fails cleanly), never timing targets;
those live in benchmarks/bench_fidelity.py.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.bench import benchmark, load_schema, validate_report
from onnxopt.bench.core import _Runner, session_options
from onnxopt.bench.machine import physical_cores
from onnxopt.bench.providers import ProviderConfig, check_session_providers, make_provider_config, resolve_ep
from onnxopt.bench.schema import validate
from onnxopt.bench.stats import latency_stats, paired_speedup
from onnxopt.cli import main
from onnxopt.errors import OnnxoptError

FAST = dict(runs=6, warmup=1)


def _mlp(path, batch="batch", in_name="x", seed=0):
    """x[batch, 64] -> MatMul -> Relu -> MatMul -> y[batch, 16]: small, MatMul-heavy (quantizable)."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 128)).astype(np.float32) * 0.1, "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((128, 16)).astype(np.float32) * 0.1, "W2")
    nodes = [
        helper.make_node("MatMul", [in_name, "W1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, [batch, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 16])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return str(path)


@pytest.fixture
def mlp(tmp_path):
    return _mlp(tmp_path / "mlp.onnx")


@pytest.fixture
def mlp_int8(tmp_path, mlp):
    # Test fixture only: onnxopt never imports ORT's quantizer.
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = tmp_path / "mlp.int8.onnx"
    quantize_dynamic(mlp, str(out), weight_type=QuantType.QInt8)
    return str(out)


def _one_line_error(capsys, argv, *, contains):
    rc = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("onnxopt: error: ")
    assert "Traceback" not in captured.err
    assert contains in lines[0], lines[0]
    return lines[0]


# --- fp32 vs int8: speedup with an interval, outputs compared, JSON matches the schema -------

def test_fp32_vs_int8_report(mlp, mlp_int8):
    report = benchmark([mlp, mlp_int8], runs=15, warmup=2, check_outputs=True)
    assert [r["model"] for r in report.results] == ["mlp.onnx", "mlp.int8.onnx"]
    for r in report.results:
        lat = r["latency_ms"]
        assert r["runs"] == 15
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert lat["min"] <= lat["mean"] <= lat["max"]
        assert r["throughput_per_s"] == pytest.approx(r["batch"] * 1000 / lat["mean"])
        assert r["first_run_ms"] > 0 and r["session_init_ms"] > 0
        assert r["threads"] == {"intra_op": physical_cores(), "inter_op": 1}
        assert r["peak_memory_mb"] is not None and r["peak_memory_mb"] >= 0  # /proc is there on Linux
        # The statistics are those of the per-run samples kept for plotting.
        samples = report.samples[(r["model"], "cpu", 1)]
        assert samples.size == 15
        assert lat["p50"] == pytest.approx(float(np.median(samples)))
    (comp,) = report.comparisons
    assert (comp["baseline"], comp["candidate"], comp["ep"], comp["batch"], comp["pairs"]) == (
        "mlp.onnx", "mlp.int8.onnx", "cpu", 1, 15)
    lo, hi = comp["speedup_interval"]
    assert 0 < lo <= comp["speedup"] <= hi
    # The speedup is the median of the paired per-round ratios of the reported samples.
    a, b = report.samples[("mlp.onnx", "cpu", 1)], report.samples[("mlp.int8.onnx", "cpu", 1)]
    assert comp["speedup"] == pytest.approx(float(np.median(a / b)))
    (out,) = comp["outputs"]
    assert out["name"] == "y" and out["shape_ref"] == [1, 16] == out["shape_new"]
    assert 0 < out["max_abs"] < 0.5  # int8 differs from fp32, but not wildly
    assert out["cosine"] > 0.99
    data = json.loads(report.to_json())
    validate_report(data)
    assert data["schema"] == "onnxopt.bench/1"
    assert data["settings"]["interleaved"] is True


def test_cli_writes_json_csv_and_table(tmp_path, capsys, mlp, mlp_int8):
    js, cs = tmp_path / "r.json", tmp_path / "r.csv"
    rc = main(["bench", mlp, mlp_int8, "--runs", "5", "--warmup", "1", "--check-outputs", "--json", str(js), "--csv", str(cs)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "speedup vs first" in captured.out and "mlp.int8.onnx" in captured.out
    assert f"intra-op {physical_cores()} (physical cores)" in " ".join(captured.out.split())
    data = json.loads(js.read_text())
    validate_report(data)
    assert data["packages"]["onnxruntime"] == ort.__version__
    assert data["machine"]["cpu"] and data["machine"]["physical_cores"] == physical_cores()
    assert data["settings"]["threads"] == {"intra_op": physical_cores(), "inter_op": 1, "execution_mode": "sequential",
                                           "source": "physical cores", "spinning": True,
                                           "spinning_stops_after_run": True}
    assert data["settings"]["providers"]["cpu"]["name"] == "CPUExecutionProvider"
    assert data["comparisons"][0]["outputs"][0]["name"] == "y"
    rows = list(csv.DictReader(io.StringIO(cs.read_text())))
    assert [r["model"] for r in rows] == ["mlp.onnx", "mlp.int8.onnx"]
    assert rows[0]["speedup"] == "" and float(rows[1]["speedup"]) > 0
    assert float(rows[1]["p50_ms"]) == pytest.approx(data["results"][1]["latency_ms"]["p50"], rel=1e-3)
    # 5 runs give an interval, and a warning that it is rough.
    assert "5 timed runs per model: the 95% intervals are rough" in " ".join(captured.err.split())


def test_schema_validator_rejects_broken_reports(mlp, mlp_int8):
    good = benchmark([mlp, mlp_int8], runs=3, warmup=0).to_dict()
    assert validate(good, load_schema()) == []

    def broken(edit):
        data = json.loads(json.dumps(good))
        edit(data)
        return validate(data, load_schema())

    assert any("p99" in e for e in broken(lambda d: d["results"][0]["latency_ms"].pop("p99")))
    assert any("runs" in e for e in broken(lambda d: d["results"][0].update(runs=0)))
    assert any("runs" in e for e in broken(lambda d: d["results"][0].update(runs=True)))  # a bool is not an integer
    assert any("speedup_interval" in e for e in broken(lambda d: d["comparisons"][0].update(speedup_interval=[1.0])))
    assert any("machine" in e for e in broken(lambda d: d.pop("machine")))
    assert any("schema" in e for e in broken(lambda d: d.update(schema="other/2")))
    assert any("unexpected" in e for e in broken(lambda d: d["results"][0]["latency_ms"].update(p42=1.0)))
    with pytest.raises(OnnxoptError, match="does not match schema.json"):
        validate_report({"schema": "onnxopt.bench/1"})


def test_schema_file_is_documented():
    doc = os.path.join(os.path.dirname(__file__), "..", "docs", "bench.md")
    text = open(doc, encoding="utf-8").read()
    for key in ("latency_ms", "throughput_per_s", "first_run_ms", "session_init_ms", "peak_memory_mb",
                "speedup_interval", "comparisons", "machine", "packages", "settings"):
        assert key in text, key
        assert key in json.dumps(load_schema())


# --- batch sizes, inputs -----------------------------------------------------------------------

def test_batch_sizes_and_same_model_twice(mlp):
    report = benchmark([mlp, mlp], batch_sizes=[1, 4], check_outputs=True, **FAST)
    assert [(r["model"], r["batch"]) for r in report.results] == [
        ("mlp.onnx", 1), ("mlp.onnx#2", 1), ("mlp.onnx", 4), ("mlp.onnx#2", 4)]
    for comp in report.comparisons:
        (out,) = comp["outputs"]
        assert out["shape_ref"] == [comp["batch"], 16]
        assert out["max_abs"] == 0.0 and out["within"]  # the same model gives the same answers


def test_fixed_batch_model_gives_a_clear_error(tmp_path, capsys):
    fixed = _mlp(tmp_path / "fixed.onnx", batch=1)
    assert benchmark(fixed, batch_sizes=[1], **FAST).results[0]["batch"] == 1
    _one_line_error(capsys, ["bench", fixed, "--batch-sizes", "1,8", "--runs", "2"], contains="fixed batch dimension of 1")


def test_incompatible_models(tmp_path, capsys, mlp):
    other = _mlp(tmp_path / "other.onnx", in_name="features")
    _one_line_error(capsys, ["bench", mlp, other, "--runs", "2"], contains="incompatible inputs")


def test_npz_inputs_are_used_and_repeated_to_the_batch(tmp_path, mlp):
    x = np.random.default_rng(3).standard_normal((2, 64)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    report = benchmark([mlp, mlp], inputs=tmp_path / "in.npz", batch_sizes=[5], check_outputs=True, **FAST)
    assert report.settings["input_shapes"] == {"x": [2, 64]}
    assert report.comparisons[0]["outputs"][0]["shape_ref"] == [5, 16]
    # Rows are repeated cyclically: outputs of the batch-5 feed equal the model on x[[0,1,0,1,0]].
    sess = ort.InferenceSession(mlp, providers=["CPUExecutionProvider"])
    runner = _Runner(sess, {"x": x[[0, 1, 0, 1, 0]]}, make_provider_config("cpu"), io_binding=False, include_copies=False)
    _, outs = runner.first_run()
    assert outs["y"].shape == (5, 16)


def test_shape_option_sets_generated_inputs(tmp_path):
    from onnxopt.testing.real_models import RealModelUnavailable, ppocr_model

    try:
        cls = str(ppocr_model("cls"))
    except RealModelUnavailable as e:
        pytest.skip(str(e))
    report = benchmark(cls, shapes={"x": (1, 3, 48, 192)}, batch_sizes=[1, 2], runs=3, warmup=1)
    assert report.settings["input_shapes"] == {"x": [1, 3, 48, 192]}
    assert [r["batch"] for r in report.results] == [1, 2]
    assert all(r["provider"] == "CPUExecutionProvider" for r in report.results)


def test_duration_mode(mlp):
    report = benchmark(mlp, duration=0.05, warmup=0)
    r = report.results[0]
    assert r["runs"] >= 1
    assert report.settings["runs"] is None and report.settings["duration_s"] == 0.05
    validate_report(report.to_dict())


# --- the timed call --------------------------------------------------------------------------

@pytest.mark.parametrize("io_binding, include_copies", [(False, False), (True, False), (True, True)])
def test_runner_outputs_match_session_run(mlp, io_binding, include_copies):
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    sess = ort.InferenceSession(mlp, session_options(1), providers=["CPUExecutionProvider"])
    expected = sess.run(None, {"x": x})[0]
    runner = _Runner(sess, {"x": x}, make_provider_config("cpu"), io_binding=io_binding, include_copies=include_copies)
    _, outs = runner.first_run()
    np.testing.assert_array_equal(outs["y"], expected)
    for _ in range(3):
        runner.step()  # with IO binding the first run's output buffers are reused
    if io_binding:
        np.testing.assert_array_equal(runner.io.copy_outputs_to_cpu()[0], expected)
    runner.close()


def test_io_binding_on_cpu_is_recorded(mlp):
    report = benchmark(mlp, io_binding=True, **FAST)
    assert report.results[0]["io_binding"] is True
    assert benchmark(mlp, **FAST).results[0]["io_binding"] is False  # CPU default: plain session.run


def test_progress_callback_is_called_between_runs(mlp):
    calls = []
    benchmark(mlp, runs=3, warmup=1, progress=lambda d, done, total: calls.append((d, done, total)))
    timing = [c for c in calls if "timing" in c[0]]
    assert timing and timing[-1][1:] == (3, 3)
    assert calls[-1][0].endswith("peak memory of mlp.onnx (child process)")  # measured after the timing


# --- statistics ------------------------------------------------------------------------------

def test_latency_stats_match_numpy():
    t = np.array([5.0, 1.0, 3.0, 2.0, 4.0, 100.0])
    s = latency_stats(t)
    assert s["p50"] == 3.5 and s["min"] == 1.0 and s["max"] == 100.0
    assert s["p99"] == pytest.approx(np.percentile(t, 99))
    assert s["std"] == pytest.approx(np.std(t, ddof=1))
    assert latency_stats([2.0])["std"] == 0.0


def test_paired_speedup_recovers_a_known_ratio_and_is_seeded():
    rng = np.random.default_rng(7)
    drift = np.linspace(1.0, 3.0, 400)  # the machine slows down threefold during the run
    cand = drift * (1 + 0.05 * rng.standard_normal(400))
    base = 2.0 * drift * (1 + 0.05 * rng.standard_normal(400))
    s, (lo, hi) = paired_speedup(base, cand, seed=1)
    assert lo < 2.0 < hi and hi - lo < 0.1  # drift cancels in the pairs
    assert paired_speedup(base, cand, seed=1) == (s, (lo, hi))
    assert paired_speedup(base, base) == (1.0, (1.0, 1.0))


# --- providers ------------------------------------------------------------------------------

def test_provider_names():
    assert resolve_ep("cuda") == ("cuda", "CUDAExecutionProvider")
    assert resolve_ep("TRT") == ("tensorrt", "TensorrtExecutionProvider")
    assert resolve_ep("CPUExecutionProvider") == ("cpu", "CPUExecutionProvider")


def test_silent_fallback_to_cpu_is_an_error():
    class FellBack:  # what ORT does when CUDA libraries are missing: drop the provider, run on CPU
        def get_providers(self):
            return ["CPUExecutionProvider"]

    with pytest.raises(OnnxoptError, match="CUDAExecutionProvider failed to initialise"):
        check_session_providers(FellBack(), ProviderConfig("cuda", "CUDAExecutionProvider", {}), "m.onnx")


# --- bad input: one line on stderr, non-zero exit, nothing written ----------------------------------

def _missing_provider():
    for short in ("cuda", "tensorrt", "openvino", "dml", "qnn"):
        if resolve_ep(short)[1] not in ort.get_available_providers():
            return short
    pytest.skip("every provider is installed")


@pytest.mark.parametrize(
    "args, contains",
    [
        (["missing.onnx"], "no such file"),
        (["{m}", "--ep", "warp-drive"], "unknown execution provider"),
        (["{m}", "--ep", "{missing_ep}"], "is not available in this onnxruntime build; pip install"),
        (["{m}", "--shape", "nope:1x64"], "no input 'nope'"),
        (["{m}", "--runs", "0"], "--runs must be at least 1"),
        (["{m}", "--duration", "-1"], "--duration must be a positive number"),
        (["{m}", "--runs", "3", "--duration", "1"], "not both"),
        (["{m}", "--warmup", "-2"], "--warmup"),
        (["{m}", "--batch-sizes", "1,x"], "--batch-sizes"),
        (["{m}", "--json", "{tmp}/no/such/folder/r.json"], "does not exist"),
        (["{m}", "--json", "{tmp}"], "is a folder"),
        (["{m}", "--inputs", "{tmp}/none.npz"], "no such inputs file"),
        (["{m}", "--inputs", "{npz}", "--shape", "x:2x64"], "--shape applies to generated inputs"),
        (["{m}", "--trt-fp16"], "applies only to --ep tensorrt"),
    ],
)
def test_bad_input_is_one_line(capsys, tmp_path, mlp, args, contains):
    missing_ep = _missing_provider() if "{missing_ep}" in args else ""
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 64), np.float32))
    argv = ["bench"] + [a.format(m=mlp, tmp=tmp_path, missing_ep=missing_ep, npz=tmp_path / "in.npz") for a in args] + ["--warmup", "0"] * ("--warmup" not in args)
    line = _one_line_error(capsys, argv, contains=contains.split(";")[0])
    if "pip install" in contains:
        assert "pip install" in line
    assert not (tmp_path / "no").exists()


def test_plot_without_matplotlib_fails_before_benchmarking(capsys, tmp_path, mlp, monkeypatch):
    import importlib.util

    import onnxopt.bench

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    monkeypatch.setattr(onnxopt.bench, "benchmark", lambda *a, **k: pytest.fail("benchmark ran before the --plot check"))
    line = _one_line_error(capsys, ["bench", mlp, "--plot", str(tmp_path / "p.png"), "--json", str(tmp_path / "r.json")],
                           contains="--plot needs matplotlib")
    assert line == "onnxopt: error: --plot needs matplotlib: pip install 'onnxopt[plot]'"
    assert not (tmp_path / "r.json").exists()


def test_plot_draws_a_png(tmp_path, mlp):
    pytest.importorskip("matplotlib")
    report = benchmark([mlp, mlp], batch_sizes=[1, 2], **FAST)
    report.plot(tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_entry_point_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "onnxopt.cli", "bench", str(tmp_path / "missing.onnx")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"onnxopt: error: {tmp_path / 'missing.onnx'}: no such file"]


# --- GPU (skipped without onnxruntime-gpu and a GPU) ---------------------------------------------

needs_cuda = pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(), reason="CUDAExecutionProvider not available"
)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("include_copies", [False, True])
def test_cuda_io_binding(mlp, mlp_int8, include_copies):
    report = benchmark([mlp, mlp], ep="cuda", batch_sizes=[1, 8], include_copies=include_copies, check_outputs=True, **FAST)
    assert all(r["io_binding"] and r["provider"] == "CUDAExecutionProvider" for r in report.results)
    assert report.settings["providers"]["cuda"]["device"] == "cuda"
    for comp in report.comparisons:
        assert comp["outputs"][0]["max_abs"] == 0.0
    # Device outputs copied back agree with the CPU provider.
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    cpu = ort.InferenceSession(mlp, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    sess = ort.InferenceSession(mlp, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    runner = _Runner(sess, {"x": x}, make_provider_config("cuda"), io_binding=True, include_copies=include_copies)
    _, outs = runner.first_run()
    runner.step()
    np.testing.assert_allclose(runner.io.copy_outputs_to_cpu()[0], cpu, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(outs["y"], cpu, rtol=1e-3, atol=1e-4)
    validate_report(report.to_dict())


@pytest.mark.gpu
@pytest.mark.skipif("TensorrtExecutionProvider" not in ort.get_available_providers(), reason="TensorRT EP not available")
def test_tensorrt_options(tmp_path, mlp):
    cache = tmp_path / "trt"
    report = benchmark(mlp, ep="tensorrt", trt_fp16=True, trt_engine_cache=cache, **FAST)
    opts = report.settings["providers"]["tensorrt"]["options"]
    assert opts["trt_fp16_enable"] == "True" and opts["trt_engine_cache_path"] == str(cache)
    assert report.results[0]["io_binding"] is True


def test_in_memory_models_are_accepted(mlp):
    from onnxopt.model_io import load_model

    model = load_model(mlp)  # an onnx_ir.Model, e.g. straight out of onnxopt.optimize
    report = benchmark([mlp, model], check_outputs=True, **FAST)
    assert [r["model"] for r in report.results] == ["mlp.onnx", "mlp.onnx#2"]
    assert report.results[1]["path"] is None
    assert report.comparisons[0]["outputs"][0]["max_abs"] == 0.0


def test_trt_int8_needs_a_qdq_model(tmp_path, mlp):
    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    from onnxopt.bench.core import _check_trt_int8, _load_models

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"x": np.ones((1, 64), np.float32)}])

        def get_next(self):
            return next(self.feeds, None)

    qdq = tmp_path / "mlp.qdq.onnx"  # test fixture only
    quantize_static(mlp, str(qdq), Reader(), quant_format=QuantFormat.QDQ)
    int8 = ProviderConfig("tensorrt", "TensorrtExecutionProvider", {"trt_int8_enable": "True"})
    _check_trt_int8(_load_models([str(qdq)]), int8)  # QDQ: TensorRT takes the scales from the graph
    with pytest.raises(OnnxoptError, match="--trt-int8 needs a QDQ model"):
        _check_trt_int8(_load_models([mlp]), int8)
    table = ProviderConfig("tensorrt", "TensorrtExecutionProvider",
                           {"trt_int8_enable": "True", "trt_int8_calibration_table_name": "calib.flatbuffers"})
    _check_trt_int8(_load_models([mlp]), table)


def test_threads_and_spinning_are_set_and_recorded(tmp_path, capsys, mlp):
    js = tmp_path / "r.json"
    assert main(["bench", mlp, "--threads", "1", "--no-spin", "--runs", "3", "--warmup", "0", "--json", str(js)]) == 0
    assert "intra-op 1 (--threads), inter-op 1, sequential, no spinning" in " ".join(capsys.readouterr().out.split())
    data = json.loads(js.read_text())
    assert data["settings"]["threads"]["spinning"] is False and data["results"][0]["threads"]["intra_op"] == 1
    so = session_options(3, spinning=False)
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (3, 1)
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_interleaved_sessions_stop_spinning_after_each_run(tmp_path, capsys, mlp, monkeypatch):
    # Alternating sessions on few cores: the previous session's spinning pool must not
    # compete with the running one, so each session's spin ends with its run.
    import onnxopt.bench.core as core

    seen = []
    real = core.ort.InferenceSession

    def recording(src, so, **kw):
        try:
            seen.append(so.get_session_config_entry("session.force_spinning_stop"))
        except RuntimeError:  # not set
            seen.append(None)
        return real(src, so, **kw)

    monkeypatch.setattr(core.ort, "InferenceSession", recording)
    js = tmp_path / "r.json"
    assert main(["bench", mlp, mlp, "--threads", "1", "--runs", "3", "--warmup", "0", "--json", str(js)]) == 0
    assert "spinning stopped after each run" in " ".join(capsys.readouterr().out.split())
    assert seen == ["1", "1"]
    assert json.loads(js.read_text())["settings"]["threads"]["spinning_stops_after_run"] is True
    seen.clear()
    assert main(["bench", mlp, "--threads", "1", "--runs", "3", "--warmup", "0", "--json", str(js)]) == 0
    assert "spinning stopped" not in capsys.readouterr().out
    assert seen == [None]  # one session alone keeps ORT's default: what a deployment sees
    assert json.loads(js.read_text())["settings"]["threads"]["spinning_stops_after_run"] is False


def test_model_that_fails_at_run_time_is_one_line(tmp_path, capsys):
    # Declares a dynamic batch but reshapes to a fixed [1, 64]: an export bug users do hit.
    shape = numpy_helper.from_array(np.array([1, 64], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "fixed_inside",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    line = _one_line_error(capsys, ["bench", str(tmp_path / "m.onnx"), "--batch-sizes", "4", "--runs", "2"],
                           contains="m.onnx: onnxruntime failed to run it at batch 4")
    assert "Reshape" in line or "reshape" in line.lower()


def test_provider_session_args(monkeypatch):
    import onnxopt.bench.providers as providers

    monkeypatch.setattr(providers.ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    config = ProviderConfig("tensorrt", "TensorrtExecutionProvider", {"device_id": "1", "trt_fp16_enable": "True"})
    names, options = config.session_args()
    assert names == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert options == [{"device_id": "1", "trt_fp16_enable": "True"}, {"device_id": "1"}, {}]
    assert config.device == "cuda"


def test_tensorrt_flags_become_provider_options(monkeypatch, tmp_path):
    import onnxopt.bench.providers as providers

    monkeypatch.setattr(providers.ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    cache = tmp_path / "engines"
    config = make_provider_config("trt", trt_fp16=True, trt_int8=True, trt_engine_cache=cache)
    assert config.options == {"trt_fp16_enable": "True", "trt_int8_enable": "True", "trt_engine_cache_enable": "True",
                              "trt_engine_cache_path": str(cache)}
    assert cache.is_dir()
    with pytest.raises(OnnxoptError, match="its parent folder does not exist"):
        make_provider_config("tensorrt", trt_engine_cache=tmp_path / "no" / "engines")
    with pytest.raises(OnnxoptError, match="applies only to --ep tensorrt"):
        make_provider_config("cuda", trt_fp16=True)


def test_unwritable_json_folder(capsys, tmp_path, mlp, monkeypatch):
    import onnxopt.bench.report as report_mod

    # Root ignores permission bits, so simulate what a normal user sees on a read-only folder.
    real_access = os.access
    monkeypatch.setattr(report_mod.os, "access", lambda path, mode, **kw: False if mode & os.W_OK else real_access(path, mode, **kw))
    _one_line_error(capsys, ["bench", mlp, "--json", str(tmp_path / "r.json")], contains="is not writable")
    assert not (tmp_path / "r.json").exists()


def test_block_runs_each_model_back_to_back_and_is_recorded(tmp_path, capsys, mlp, mlp_int8):
    from onnxopt.bench.core import _timed_rounds

    calls: list[str] = []
    times = _timed_rounds([lambda: calls.append("A"), lambda: calls.append("B")], rounds=2, seconds=None,
                          on_round=None, block=3)
    assert "".join(calls) == "AAABBB" + "AAABBB"  # blocks; two models alternate (no B B between rounds)
    assert [len(t) for t in times] == [6, 6]
    report = benchmark([mlp, mlp_int8], runs=7, warmup=1, block=3)
    assert report.settings["block"] == 3 and [r["runs"] for r in report.results] == [7, 7]
    validate_report(report.to_dict())
    js = tmp_path / "b.json"
    assert main(["bench", mlp, mlp_int8, "--block", "4", "--runs", "4", "--warmup", "0", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["settings"]["block"] == 4
    capsys.readouterr()
    _one_line_error(capsys, ["bench", mlp, "--block", "0", "--runs", "2"], contains="--block must be at least 1")


# --- report files never overwrite what was read ----------------------------------------------

@pytest.mark.parametrize("option", ["--json", "--csv"])
def test_cli_refuses_to_overwrite_the_inputs_file(capsys, tmp_path, mlp, option):
    npz = tmp_path / "in.npz"
    np.savez(npz, x=np.ones((1, 64), np.float32))
    before = npz.read_bytes()
    _one_line_error(capsys, ["bench", mlp, "--inputs", str(npz), "--runs", "2", option, str(npz)],
                    contains="is the --inputs file")
    assert npz.read_bytes() == before


def test_api_report_refuses_the_model_an_ir_model_came_from_and_the_inputs(tmp_path, mlp):
    from onnxopt.model_io import load_model

    before = open(mlp, "rb").read()
    report = benchmark(load_model(mlp), memory=False, **FAST)  # in memory, loaded from mlp.onnx
    for write in (report.write_json, report.write_csv):
        with pytest.raises(OnnxoptError, match="is the input model"):
            write(mlp)
    assert open(mlp, "rb").read() == before
    npz = tmp_path / "in.npz"
    np.savez(npz, x=np.ones((1, 64), np.float32))
    report = benchmark(mlp, inputs=npz, memory=False, **FAST)
    with pytest.raises(OnnxoptError, match="is the --inputs file"):
        report.write_csv(npz)
    assert np.load(npz)["x"].shape == (1, 64)


# --- one row per setting ---------------------------------------------------------------------

@pytest.mark.parametrize("args, contains", [
    (["--ep", "cpu,CPUExecutionProvider"], "--ep: CPUExecutionProvider is given twice ('cpu' and 'CPUExecutionProvider')"),
    (["--ep", "cpu", "--ep", "cpu"], "--ep: CPUExecutionProvider is given twice"),
    (["--batch-sizes", "1,2,1"], "--batch-sizes: 1 is given twice"),
])
def test_duplicate_providers_and_batch_sizes_are_refused(capsys, mlp, args, contains):
    _one_line_error(capsys, ["bench", mlp, "--runs", "2", *args], contains=contains)


# --- peak memory -----------------------------------------------------------------------------

def test_peak_memory_is_each_models_own_in_a_fresh_process(mlp):
    from onnxopt.model_io import load_model

    first = benchmark([mlp, mlp, load_model(mlp)], runs=3, warmup=1)
    peaks = [r["peak_memory_mb"] for r in first.results]
    # In-process, the second identical model read 0.16 MB against the first's 9.4 MB,
    # and a second benchmark() call read about 0: now neither order nor history matters.
    assert all(p is not None and p > 0 for p in peaks), peaks
    assert max(peaks) - min(peaks) <= 0.1 * max(peaks), peaks
    again = benchmark(mlp, runs=3, warmup=1).results[0]["peak_memory_mb"]
    assert abs(again - peaks[0]) <= 0.1 * peaks[0], (again, peaks)
    assert first.settings["memory"]["measured"] is True and "child process" in first.settings["memory"]["method"]
    assert not first.warnings
    validate_report(first.to_dict())


def test_no_memory_reports_null(tmp_path, capsys, mlp, monkeypatch):
    import onnxopt.bench.memprobe as memprobe

    monkeypatch.setattr(memprobe, "probe", lambda *a, **k: pytest.fail("--no-memory started a memory probe"))
    js = tmp_path / "r.json"
    assert main(["bench", mlp, "--runs", "2", "--warmup", "0", "--no-memory", "--json", str(js)]) == 0
    data = json.loads(js.read_text())
    validate_report(data)
    assert data["results"][0]["peak_memory_mb"] is None
    assert data["settings"]["memory"] == {"measured": False, "method": None}
    assert benchmark(mlp, memory=False, **FAST).results[0]["peak_memory_mb"] is None


def test_memory_probe_failure_is_a_note_not_a_crash(capsys, mlp, monkeypatch):
    import onnxopt.bench.memprobe as memprobe

    monkeypatch.setattr(memprobe.sys, "executable", os.path.join(os.sep, "no", "such", "python"))
    report = benchmark([mlp, mlp], **FAST)
    for r in report.results:
        assert r["peak_memory_mb"] is None
        assert "cannot start the memory probe" in r["peak_memory_note"]
    assert [w for w in report.warnings if w.startswith("peak memory not measured")] == [
        f"peak memory not measured (shown as ?): {report.results[0]['peak_memory_note']}"]  # once, not per model
    validate_report(report.to_dict())


def test_memory_probe_child_reports_its_error(tmp_path):
    from onnxopt.bench.memprobe import probe

    np.savez(tmp_path / "f.npz", x=np.ones((1, 64), np.float32))
    spec = {"model": str(tmp_path / "missing.onnx"), "feeds": str(tmp_path / "f.npz"),
            "session": {"config": {}, "log_severity": 4, "intra_op": 1, "inter_op": 1},
            "providers": ["CPUExecutionProvider"], "provider_options": [{}], "io_binding": None}
    peak, note = probe(spec, str(tmp_path / "spec.json"), timeout_s=120)
    assert peak is None and note.startswith("the memory probe failed: ")


# --- warm-up, order, rounds ------------------------------------------------------------------

def test_warm_up_is_interleaved_right_before_the_timed_runs(mlp, monkeypatch):
    import onnxopt.bench.core as core

    events: list[str] = []
    real_session, real_init, real_timed = core.ort.InferenceSession, core._Runner.__init__, core._timed_rounds
    names = iter("AB")

    def session(*a, **k):
        events.append("create")
        return real_session(*a, **k)

    def init(self, *a, **k):
        real_init(self, *a, **k)
        name, step = next(names), self.step
        self.step = lambda: (events.append(name), step())[1]

    def timed(*a, **k):
        events.append("timed")
        return real_timed(*a, **k)

    monkeypatch.setattr(core.ort, "InferenceSession", session)
    monkeypatch.setattr(core._Runner, "__init__", init)
    monkeypatch.setattr(core, "_timed_rounds", timed)
    benchmark([mlp, mlp], runs=2, warmup=3, memory=False)
    before_timing = events[:events.index("timed")]
    # Each session runs once when created; all warm-up comes after the last session, interleaved.
    assert before_timing == ["create", "A", "create", "B"] + ["A", "B"] * 3


def test_two_models_alternate_three_rotate():
    from onnxopt.bench.core import _timed_rounds

    calls: list[str] = []
    _timed_rounds([lambda: calls.append("A"), lambda: calls.append("B")], rounds=4, seconds=None, on_round=None)
    assert "".join(calls) == "ABABABAB"  # every run right after the other model's
    calls.clear()
    _timed_rounds([lambda n=n: calls.append(n) for n in "ABC"], rounds=3, seconds=None, on_round=None)
    assert "".join(calls) == "ABC" + "BCA" + "CAB"
    assert all(a != b for a, b in zip(calls, calls[1:]))  # no model follows itself


def test_bootstrap_resamples_whole_rounds():
    # 6 rounds of 20 runs: runs within a round share its ratio (the machine state of that
    # moment); resampled one by one, 120 runs look like far more evidence than 6 rounds are.
    rng = np.random.default_rng(0)
    per_round = 1 + 0.05 * rng.standard_normal(6)
    cand = np.ones(120)
    base = np.repeat(per_round, 20) * (1 + 0.001 * rng.standard_normal(120))
    s_run, (lo_run, hi_run) = paired_speedup(base, cand, seed=3)
    s_round, (lo, hi) = paired_speedup(base, cand, seed=3, block=20)
    assert s_round == s_run  # the point estimate is still the median of the per-run ratios
    assert lo <= lo_run and hi >= hi_run and (hi - lo) > 3 * (hi_run - lo_run)
    assert paired_speedup(base[:110], cand[:110], seed=3, block=20)[1] is not None  # a short last round is fine
    assert paired_speedup(base[:20], cand[:20], block=20) == (float(np.median(base[:20])), None)  # one round


def test_comparisons_report_pairs_and_rounds_and_cli_counts_rounds(tmp_path, capsys, mlp, mlp_int8):
    report = benchmark([mlp, mlp_int8], runs=7, warmup=0, block=3, memory=False)
    (comp,) = report.comparisons
    assert (comp["pairs"], comp["rounds"]) == (7, 3)
    assert report.settings["bootstrap"]["resampled"] == "rounds"
    validate_report(report.to_dict())
    assert main(["bench", mlp, mlp_int8, "--runs", "8", "--block", "4", "--warmup", "0", "--no-memory"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "2 rounds of 4 runs per model: the 95% intervals are rough (--runs 120 or more" in err


def test_block_larger_than_runs_is_refused(capsys, mlp):
    _one_line_error(capsys, ["bench", mlp, mlp, "--runs", "3", "--block", "500"],
                    contains="--block 500 is larger than --runs 3")


# --- the table -------------------------------------------------------------------------------

@pytest.mark.parametrize("width", [80, 100])
def test_table_splits_instead_of_truncating_numbers(tmp_path, mlp, width, monkeypatch):
    from rich.console import Console

    import onnxopt.cli

    long_name = tmp_path / "a_model_with_a_rather_long_file_name.onnx"
    long_name.write_bytes(open(mlp, "rb").read())
    # The command in a terminal this wide: rich used to shrink the columns to "0…".
    terminal = io.StringIO()
    monkeypatch.setattr(onnxopt.cli, "out", Console(file=terminal, width=width, color_system=None, highlight=False))
    assert main(["bench", str(long_name), mlp, "--runs", "3", "--warmup", "0", "--no-memory"]) == 0
    assert "…" not in terminal.getvalue() and "peak MB" in terminal.getvalue()
    assert max(len(line) for line in terminal.getvalue().splitlines()) <= width

    report = benchmark([str(long_name), mlp], memory=False, **FAST)
    buf = io.StringIO()
    console = Console(file=buf, width=width, color_system=None)
    tables = report.tables(width=width)
    assert len(tables) >= 2  # the full table is wider than the terminal
    for t in tables:
        console.print(t)
    text = buf.getvalue()
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= width
    flat = " ".join(text.split())
    c = report.comparisons[0]
    for r in report.results:
        lat = r["latency_ms"]
        for cell in (f"{lat['p50']:.3f}", f"{lat['p99']:.3f}", f"{lat['mean']:.3f} ± {lat['std']:.3f}", f"{lat['min']:.3f}",
                     f"{r['throughput_per_s']:.1f}", f"{r['session_init_ms']:.1f}"):
            assert cell in flat, cell
    assert f"{c['speedup']:.3f}x [{c['speedup_interval'][0]:.3f}, {c['speedup_interval'][1]:.3f}]" in flat
    # Wide enough: one table, as before.
    assert len(report.tables(width=300)) == 1 and len(report.tables()) == 1


# --- which shapes were timed -----------------------------------------------------------------

def _image_model(path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "img",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return str(path)


def test_defaulted_dynamic_dims_are_shown_and_warned(tmp_path, capsys):
    img = _image_model(tmp_path / "img.onnx")
    js = tmp_path / "r.json"
    assert main(["bench", img, "--runs", "2", "--warmup", "0", "--no-memory", "--json", str(js)]) == 0
    captured = capsys.readouterr()
    assert "inputs: x 1x3x64x64 (generated inputs" in " ".join(captured.out.split())
    warnings = [line for line in captured.err.splitlines() if "warning" in line]
    assert warnings == ["onnxopt: warning: dynamic input dimensions set to the default 64: x (dimensions 2, 3: timed at "
                        "1x3x64x64); give the sizes the model is used at with --shape NAME:DIMS (--shape x:1x3x?x?, "
                        "? filled in)"]
    assert json.loads(js.read_text())["settings"]["defaulted_dims"] == {"x": [2, 3]}
    assert main(["bench", img, "--runs", "2", "--warmup", "0", "--no-memory", "--shape", "x:1x3x40x48"]) == 0
    captured = capsys.readouterr()
    assert "inputs: x 1x3x40x48 (generated inputs)" in " ".join(captured.out.split())
    assert "warning" not in captured.err
    report = benchmark(img, batch_sizes=[1, 2], shapes={"x": (1, 3, 8, 8)}, memory=False, **FAST)
    assert [r["input_shapes"] for r in report.results] == [{"x": [1, 3, 8, 8]}, {"x": [2, 3, 8, 8]}]
    assert report.settings["defaulted_dims"] == {} and not report.warnings


# --- small ones ------------------------------------------------------------------------------

@pytest.mark.parametrize("args, contains", [
    (["--seed", "-1"], "--seed must be 0 or more, got -1"),
    (["--include-copies"], "--include-copies applies to device providers"),
    (["--include-copies", "--io-binding"], "--include-copies applies to device providers"),
    (["--inputs", "{tmp}/notes.txt"], "notes.txt: not a readable .npz file (not the zip"),
    (["--inputs", "{tmp}/one.npy"], "one.npy: not a readable .npz file (not the zip"),
])
def test_more_bad_input_is_one_line(capsys, tmp_path, mlp, args, contains):
    (tmp_path / "notes.txt").write_text("x = 1, 2, 3\n")
    np.save(tmp_path / "one.npy", np.zeros((1, 64), np.float32))
    js = tmp_path / "r.json"
    argv = ["bench", mlp, "--runs", "2", "--json", str(js)] + [a.format(tmp=tmp_path) for a in args]
    _one_line_error(capsys, argv, contains=contains)
    assert not js.exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_sizes=[True]), "every batch size must be a positive integer, got True"),
    (dict(batch_sizes=[2.0]), "every batch size must be a positive integer, got 2.0"),
    (dict(batch_sizes={"a": 1}), "batch_sizes=.*expected a list of positive integers"),
    (dict(ep=None), "ep=None: expected a provider name"),
    (dict(ep=["cpu", 1]), "every provider must be a name"),
    (dict(seed=-1), "--seed must be 0 or more"),
])
def test_api_argument_errors_are_onnxopt_errors(mlp, kwargs, message):
    with pytest.raises(OnnxoptError, match=message):
        benchmark(mlp, memory=False, **FAST, **kwargs)


def test_api_accepts_one_batch_size_and_numpy_integers(mlp):
    assert [r["batch"] for r in benchmark(mlp, batch_sizes=8, memory=False, **FAST).results] == [8]
    report = benchmark(mlp, batch_sizes=[np.int64(2), 3], memory=False, **FAST)
    assert [r["batch"] for r in report.results] == [2, 3]
    assert report.settings["batch_sizes"] == [2, 3]
    validate_report(json.loads(report.to_json()))


def test_one_timed_run_has_no_interval(capsys, tmp_path, mlp):
    report = benchmark([mlp, mlp], runs=1, warmup=0, memory=False)
    (comp,) = report.comparisons
    assert comp["speedup_interval"] is None and (comp["pairs"], comp["rounds"]) == (1, 1)
    validate_report(report.to_dict())
    row = list(csv.DictReader(io.StringIO(report.to_csv())))[1]
    assert row["speedup"] != "" and row["speedup_lo"] == "" == row["speedup_hi"]
    js = tmp_path / "r.json"
    assert main(["bench", mlp, mlp, "--runs", "1", "--warmup", "0", "--no-memory", "--json", str(js)]) == 0
    assert "x [n/a]" in capsys.readouterr().out
    assert json.loads(js.read_text())["comparisons"][0]["speedup_interval"] is None


def test_check_outputs_warns_about_values_nan_in_both_models(tmp_path):
    from onnx import TensorProto, helper

    from onnxopt.bench import benchmark

    graph = helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])])
    path = tmp_path / "log.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    report = benchmark([str(path), str(path)], runs=3, warmup=0, check_outputs=True, memory=False)
    out = report.comparisons[0]["outputs"][0]
    assert out["within"] and 0 < out["nonfinite"] < out["size"] == 128
    assert any("NaN or inf in both models" in w for w in report.warnings), report.warnings
