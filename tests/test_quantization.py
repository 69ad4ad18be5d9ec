"""Static int8 quantization on real graphs: QDQ structure, ORT's fused kernels, accuracy, bad input.

The real models (MiniLM at seq 32 with 16 calibration sentences, the PP-OCR direction
classifier at opset 11) are quantized once per module; tests that need them skip with the
reason when their packages are missing.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.cli import main
from onnxopt.errors import OnnxoptError
from onnxopt.quantization import fused_kernels, quantize, quantize_file
from onnxopt.quantization.analysis import mask_tensors
from onnxopt.quantization.opset import ensure_opset
from onnxopt.verify import check_model, make_session, run_model

rm = pytest.importorskip("onnxopt.testing.real_models")


def _initializer_array(model: ir.Model, value: ir.Value) -> np.ndarray | None:
    return value.const_value.numpy() if value is not None and value.const_value is not None else None


def _qdq_nodes(model: ir.Model, op: str) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == op]


# ----------------------------------------------------------------------------------------
# MiniLM
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    try:
        path = rm.minilm_model()
        calib = rm.encode_sentences(rm.sentences("calib", 16), seq_len=32)
    except rm.RealModelUnavailable as exc:
        pytest.skip(str(exc))
    feeds = [{k: v[i : i + 1] for k, v in calib.items()} for i in range(16)]
    report = tmp_path_factory.mktemp("q") / "report.json"
    result = quantize(path, feeds, report=report, progress=False)
    return path, result, report


def test_minilm_qdq_structure(minilm):
    _, result, _ = minilm
    model = result.model
    check_model(model)
    weight_dqs = [n for n in _qdq_nodes(model, "DequantizeLinear") if n.inputs[0].is_initializer()]
    assert len(weight_dqs) == 36  # Q, K, V, attention output, FFN up, FFN down in 6 layers
    for dq in weight_dqs:
        q = _initializer_array(model, dq.inputs[0])
        scale = _initializer_array(model, dq.inputs[1])
        zp = _initializer_array(model, dq.inputs[2])
        assert q.dtype == np.int8 and q.ndim == 2
        assert dq.attributes.get_int("axis") == 1 and scale.shape == (q.shape[1],)  # per output channel
        assert zp.dtype == np.int8 and not zp.any()
        assert q.min() >= -127
    qs = _qdq_nodes(model, "QuantizeLinear")
    assert qs and all(_initializer_array(model, q.inputs[2]).dtype == np.uint8 for q in qs)
    # One Q per activation: Q, K and V read the same LayerNorm output through one pair.
    assert len(qs) == 24
    assert result.report["opset"]["how"] == "unchanged"


def test_minilm_ort_fuses_int8_matmuls(minilm):
    _, result, _ = minilm
    kernels = fused_kernels(result.model)
    assert kernels.get("MatMulIntegerToFloat") == 36
    assert "DequantizeLinear" not in kernels  # every DQ was folded into a kernel
    assert result.report["ort_fused_kernels"] == kernels


def test_minilm_mask_path_and_softmax_stay_float(minilm):
    path, result, _ = minilm
    kept = result.report["kept_float_tensors"]
    assert any(r == "attention-mask path" for r in kept.values())
    assert sum(r in ("Softmax input", "masked attention scores") for r in kept.values()) >= 6
    quantized_inputs = {q.inputs[0].name for q in _qdq_nodes(result.model, "QuantizeLinear")}
    assert not quantized_inputs & set(kept)
    # The analysis of the original export finds the same mask tensors.
    assert set(mask_tensors(ir.load(str(path)))) & set(kept)
    for q in _qdq_nodes(result.model, "QuantizeLinear"):
        producer = q.inputs[0].producer()
        assert producer is not None and producer.op_type not in ("Where", "Softmax")


def test_minilm_accuracy_and_report(minilm):
    path, result, report = minilm
    sents = rm.sentences("eval", 8)
    feeds = rm.encode_sentences(sents, seq_len=32)
    ref = run_model(ir.load(str(path)), feeds)["last_hidden_state"]
    new = run_model(result.model, feeds)["last_hidden_state"]
    agree = rm.embedding_agreement(
        rm.sentence_embeddings(ref, feeds["attention_mask"]), rm.sentence_embeddings(new, feeds["attention_mask"])
    )
    assert agree["cosine_mean"] > 0.98 and agree["cosine_min"] > 0.95
    data = json.loads(report.read_text())
    assert data["quantized_layers"] == 36
    layers = [v for v in data["layers"].values() if v.get("quantized")]
    assert all(np.isfinite(v["sqnr_db"]) and v["sqnr_db"] > 10 for v in layers)
    assert 0 <= data["fallback"]["before"] < 0.05


# ----------------------------------------------------------------------------------------
# PP-OCR direction classifier: opset 11, per-channel Conv, QLinearConv
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cls_model():
    try:
        path = rm.ppocr_model("cls")
        calib = [{"x": rm.cls_preprocess(img)} for _, img in rm.images("calib", 8)]
        evals = [{"x": rm.cls_preprocess(img)} for _, img in rm.images("eval", 6)]
    except rm.RealModelUnavailable as exc:
        pytest.skip(str(exc))
    return path, calib, evals


def test_cls_opset11_per_channel(cls_model):
    path, calib, evals = cls_model
    assert onnx.load(str(path)).opset_import[0].version == 11
    result = quantize(path, calib, progress=False)
    model = result.model
    check_model(model)
    assert result.report["opset"]["from"] == 11 and result.report["opset"]["to"] >= 13
    assert not _qdq_nodes(model, "Constant")  # converter output lifted back to initializers
    conv_w = [n for n in _qdq_nodes(model, "DequantizeLinear")
              if n.inputs[0].is_initializer() and n.inputs[0].const_value.dtype == ir.DataType.INT8]
    assert len(conv_w) >= 50
    assert all(n.attributes.get_int("axis") == 0 for n in conv_w if n.inputs[0].const_value.shape.rank() == 4)
    biases = [n for n in _qdq_nodes(model, "DequantizeLinear")
              if n.inputs[0].is_initializer() and n.inputs[0].const_value.dtype == ir.DataType.INT32]
    assert biases  # int32 bias with scale = input scale * weight scale
    assert fused_kernels(model).get("QLinearConv", 0) >= 50
    assert result.report["ort_fused_kernels"].get("QGemm") == 1  # the head: listed like the convs
    # Each activation is quantized once: no Q reads a DQ (an absorbed Relu's consumer reuses it).
    for q in _qdq_nodes(model, "QuantizeLinear"):
        assert q.inputs[0].producer() is None or q.inputs[0].producer().op_type != "DequantizeLinear"
    ref_model = ir.load(str(path))
    for feed in evals:
        a = run_model(ref_model, feed)
        b = run_model(model, feed)
        for k in a:
            assert np.abs(a[k] - b[k]).max() < 0.2  # class probabilities


def test_ensure_opset_bumps_or_converts():
    try:
        det = ir.load(str(rm.ppocr_model("det")))
        cls = ir.load(str(rm.ppocr_model("cls")))
    except rm.RealModelUnavailable as exc:
        pytest.skip(str(exc))
    feed = {"x": np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)}
    up, how = ensure_opset(det, 13, feeds=feed)
    assert how == "bumped" and up.opset_imports[""] == 13 and det.opset_imports[""] == 12
    up, how = ensure_opset(cls, 13)  # Softmax's axis changed meaning at 13: converter
    assert how == "converted" and not [n for n in up.graph if n.op_type == "Constant"]


# ----------------------------------------------------------------------------------------
# A small hand-built CNN for the option and error paths (fast)
# ----------------------------------------------------------------------------------------


@pytest.fixture
def small_cnn(tmp_path):
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "w1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "b1"),
        numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.3, "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2"),
    ]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "cnn.onnx"
    onnx.save(model, path)
    feeds = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(6)]
    return path, feeds


def test_relu_absorbed_and_tensorrt_scheme(small_cnn):
    path, feeds = small_cnn
    cpu = quantize(path, feeds, progress=False).model
    assert not _qdq_nodes(cpu, "Relu")  # the uint8 output quantizer of conv1 does the Relu's job
    assert fused_kernels(cpu).get("QLinearConv") == 1  # conv2's output stays float (graph output)
    ref = run_model(ir.load(str(path)), feeds[0])["y"]
    assert np.abs(run_model(cpu, feeds[0])["y"] - ref).max() < 0.05 * np.abs(ref).max()
    trt = quantize(path, feeds, target="tensorrt", progress=False).model
    for q in _qdq_nodes(trt, "QuantizeLinear"):
        zp = _initializer_array(trt, q.inputs[2])
        assert zp.dtype == np.int8 and not zp.any()
    assert _qdq_nodes(trt, "Relu")  # symmetric int8 cannot absorb it


def test_per_tensor_and_exclude(small_cnn):
    path, feeds = small_cnn
    model = quantize(path, feeds, per_channel=False, exclude=["conv2"], progress=False).model
    w_dqs = [n for n in _qdq_nodes(model, "DequantizeLinear") if n.inputs[0].name.startswith("w")]
    assert len(w_dqs) == 1 and w_dqs[0].attributes.get("axis") is None
    assert _initializer_array(model, w_dqs[0].inputs[1]).shape == ()


def test_report_does_not_change_the_model(small_cnn, tmp_path):
    # --report used to hold the last fifth of the samples out of calibration (for the
    # sensitivity numbers), so asking for a report changed the ranges and the output.
    path, feeds = small_cnn
    plain = quantize(path, feeds, progress=False).model
    reported = quantize(path, feeds, report=tmp_path / "r.json", progress=False)
    assert reported.report["calibration"]["samples"] == len(feeds)
    assert any("sqnr_db" in v for v in reported.report["layers"].values())

    def scales(m):
        return {n.name: _initializer_array(m, n.inputs[1]).tolist() for n in _qdq_nodes(m, "QuantizeLinear")}

    assert scales(reported.model) == scales(plain)
    np.testing.assert_array_equal(run_model(reported.model, feeds[0])["y"], run_model(plain, feeds[0])["y"])


def test_max_drop_fallback_moves_layers_to_float(small_cnn):
    path, feeds = small_cnn
    before = quantize(path, feeds * 3, sensitivity=True, holdout=4, progress=False).report["fallback"]["before"]
    assert before > 0
    res = quantize(path, feeds * 3, max_drop=before * 0.99, holdout=4, progress=False)
    fb = res.report["fallback"]
    assert fb["before"] == pytest.approx(before)
    assert fb["to_float"] and fb["after"] <= before * 0.99
    assert res.report["layers"][fb["to_float"][0]]["reason"] == "accuracy fallback (--max-drop)"
    with pytest.raises(OnnxoptError, match="not reachable"):
        quantize(path, feeds * 3, max_drop=1e-9, holdout=4, progress=False)


@pytest.mark.parametrize(
    "feeds, message",
    [
        ([{"image": np.zeros((1, 3, 8, 8), np.float32)}], "unknown input name 'image'"),
        ([{}], "missing input 'x'"),
        ([{"x": np.zeros((1, 3, 9, 9), np.float32)}], "input 'x' has shape (1, 3, 9, 9)"),
        ([{"x": np.zeros((1, 3, 8, 8), np.float64)}], "input 'x' has dtype float64"),
    ],
)
def test_bad_calibration_samples(small_cnn, tmp_path, feeds, message):
    path, _ = small_cnn
    out = tmp_path / "q.onnx"
    with pytest.raises(OnnxoptError, match=None) as err:
        quantize_file(path, out, calib=feeds, progress=False)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()


def _cli(capsys, *args) -> tuple[int, str]:
    code = main(["quantize", *map(str, args), "--quiet"])
    err = capsys.readouterr().err.strip()
    return code, err


def test_cli_bad_inputs(small_cnn, tmp_path, capsys):
    path, feeds = small_cnn
    out = tmp_path / "q.onnx"
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "images"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png at all")
    npz = tmp_path / "calib"
    npz.mkdir()
    for i, f in enumerate(feeds):
        np.savez(npz / f"{i}.npz", **f)
    cases = [
        ([path, "-o", out, "--calib", empty], "empty"),
        ([path, "-o", out, "--calib", tmp_path / "missing"], "missing"),
        ([path, "-o", out, "--calib", broken, "--image-size", "8x8"], "a.png"),
        ([path, "-o", out, "--calib", npz, "--exclude", "NoSuchOp"], "NoSuchOp"),
        ([path, "-o", tmp_path / "nodir" / "q.onnx", "--calib", npz], "does not exist"),
        ([path, "-o", path, "--calib", npz], "input model"),
    ]
    for args, needle in cases:
        code, err = _cli(capsys, *args)
        assert code == 2, (args, err)
        assert err.startswith("onnxopt: error:") and needle in err and len(err.splitlines()) == 1, err
        assert not out.exists()
    code, err = _cli(capsys, path, "-o", out, "--calib", npz, "--report", tmp_path / "r.json")
    assert code == 0 and out.exists() and json.loads((tmp_path / "r.json").read_text())["quantized_layers"] == 2
    # The summary says why layers stayed float.
    capsys.readouterr()
    assert main(["quantize", str(path), "-o", str(out), "--calib", str(npz), "--exclude", "conv2", "--quiet"]) == 0
    assert "kept float: 1 excluded by the user (each layer's reason: --report FILE)" in capsys.readouterr().out
    # An already quantized model is refused.
    code, err = _cli(capsys, out, "-o", tmp_path / "qq.onnx", "--calib", npz)
    assert code == 2 and "already quantized" in err and not (tmp_path / "qq.onnx").exists()
    make_session(ir.load(str(out))).close()


def test_hooks_see_float_model_and_quantized_layers(small_cnn):
    path, feeds = small_cnn
    seen = {}

    def record_float(model, ctx):
        seen["float_ops"] = [n.op_type for n in model.graph]
        seen["calib"] = sum(1 for _ in ctx.calib)
        return "looked"

    def shift_bias(qmodel, ctx):
        # A bias-correction-like edit: conv2 has no bias; give it one of +0.5 per channel.
        layer = next(l for l in ctx.layers if l.name == "conv2")
        assert layer.float_weight.shape == (4, 8, 1, 1) and layer.weight_scale.shape == (4,)
        assert np.abs(layer.dequantized_weight - layer.float_weight).max() <= layer.weight_scale.max() / 2 + 1e-7
        bias = ctx.ensure_bias(layer)
        bias.const_value = ir.tensor(np.full(4, 0.5, np.float32), name=bias.name)

    res = quantize(path, feeds, float_transforms=[record_float], weight_transforms=[shift_bias], progress=False)
    assert seen["float_ops"] == ["Conv", "Relu", "Conv"] and seen["calib"] == len(feeds)
    assert res.report["hooks"]["float_transforms"] == [{"name": "record_float", "summary": "looked"}]
    conv2 = next(n for n in res.model.graph if n.name == "conv2")
    bias_dq = conv2.inputs[2].producer()
    assert bias_dq.op_type == "DequantizeLinear" and bias_dq.inputs[0].const_value.dtype == ir.DataType.INT32
    base = quantize(path, feeds, progress=False).model
    diff = run_model(res.model, feeds[0])["y"] - run_model(base, feeds[0])["y"]
    assert np.allclose(diff, 0.5, atol=1e-3)  # the int32 bias carries the hook's edit


def test_smoothquant_folds_into_layernorm_and_keeps_the_function(tmp_path):
    rng = np.random.default_rng(1)
    gamma = rng.uniform(0.5, 1.5, 16).astype(np.float32)
    gamma[3] = 20.0  # an outlier channel, as in BERT's LayerNorm outputs
    inits = [numpy_helper.from_array(gamma, "g"), numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b"),
             numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32) * 0.2, "wq"),
             numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32) * 0.2, "wk")]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["ln", "wq"], ["q"], name="mq"),
             helper.make_node("MatMul", ["ln", "wk"], ["k"], name="mk")]
    graph = helper.make_graph(nodes, "sq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16])],
                              [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 4, 8]),
                               helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 4, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "sq.onnx"
    onnx.save(model, path)
    feeds = [{"x": rng.standard_normal((1, 4, 16)).astype(np.float32)} for _ in range(8)]
    seen = {}

    def capture(qmodel, ctx):
        seen["float"], seen["stats"] = ctx.float_model, ctx.stats

    res = quantize(path, feeds, smoothquant="on", progress=False, weight_transforms=[capture])
    (group,) = res.report["smoothquant"]["groups"]
    assert group["how"] == "folded into LayerNormalization" and sorted(group["layers"]) == ["mk", "mq"]
    assert group["act_absmax_after"] < group["act_absmax_before"] / 2
    # The smoothed tensor's range was derived from the unsmoothed per-channel extremes in the
    # same calibration pass; observing the smoothed model directly gives the same range.
    from onnxopt.calibration import collect_stats

    direct = collect_stats(seen["float"], feeds, ["ln"], progress=False)["ln"]
    assert (seen["stats"]["ln"].min, seen["stats"]["ln"].max) == pytest.approx((direct.min, direct.max), rel=1e-5)
    ref = run_model(ir.load(str(path)), feeds[0])
    out = run_model(res.model, feeds[0])
    for name in ("q", "k"):
        assert np.abs(out[name] - ref[name]).max() < 0.05 * np.abs(ref[name]).max()


# ----------------------------------------------------------------------------------------
# Models with external data, and IR version 3 exports (conformance findings)
# ----------------------------------------------------------------------------------------


def _cnn_proto(opset: int, softmax: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * 0.3, "w1"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32) * 0.1, "b1"),
        numpy_helper.from_array(rng.standard_normal((8, 16, 1, 1)).astype(np.float32) * 0.3, "w2"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32) * 0.1, "b2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2" if softmax else "y"], name="conv2"),
    ]
    if softmax:  # Softmax changed meaning at opset 13: ensure_opset takes the version converter
        nodes.append(helper.make_node("Softmax", ["c2"], ["y"], axis=1, name="softmax"))
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _feeds(n: int = 6) -> list[dict]:
    rng = np.random.default_rng(2)
    return [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("opset, softmax", [(13, False), (11, False), (11, True)])
def test_external_data_model_quantizes_from_another_directory(tmp_path, monkeypatch, opset, softmax):
    """Weights in ``w.data`` next to the model; run from another folder, so any session built
    from serialized bytes (weights resolved against the current directory) fails."""
    from onnxopt.quantization.bias_correction import bias_correction
    from onnxopt.quantization.rounding import gptq_weight_rounding

    src = tmp_path / "src"
    src.mkdir()
    path = src / "model.onnx"
    onnx.save(_cnn_proto(opset, softmax), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.data", size_threshold=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    feeds = _feeds()
    res = quantize(path, feeds, weight_transforms=[bias_correction, gptq_weight_rounding], progress=False)
    assert res.report["opset"]["to"] == 13
    assert res.report["opset"]["how"] == ("unchanged" if opset == 13 else "converted" if softmax else "bumped")
    assert [h["name"] for h in res.report["hooks"]["weight_transforms"]] == ["bias_correction", "gptq_weight_rounding"]
    assert res.report["quantized_layers"] == 2
    assert res.report["ort_fused_kernels"].get("QLinearConv", 0) + res.report["ort_fused_kernels"].get("QuantizeLinear", 0) > 0
    check_model(res.model)
    ref = run_model(ir.load(str(path)), feeds[0])["y"]
    got = run_model(res.model, feeds[0])["y"]
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(path), "-o", str(out), "--calib", "random", "--quiet"]) in (0, None)
    assert out.exists() and not list(elsewhere.iterdir())


@pytest.mark.parametrize("per_channel", [True, False])
def test_ir3_model_initializers_not_inputs_after_quantization(tmp_path, per_channel):
    """An opset 8 / IR 3 export lists every initializer as a graph input; the quantized model
    (new initializers: scales, zero points, int8 weights) gets IR 7 instead of failing the checker."""
    proto = _cnn_proto(8)
    proto.ir_version = 3
    for init in proto.graph.initializer:
        proto.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    onnx.checker.check_model(proto)
    path = tmp_path / "ir3.onnx"
    onnx.save(proto, path)
    feeds = _feeds()
    res = quantize(path, feeds, per_channel=per_channel, progress=False)
    assert res.model.ir_version >= 7 and res.report["quantized_layers"] == 2
    # The float weights are neither dead inputs nor left in the file.
    assert [v.name for v in res.model.graph.inputs] == ["x"]
    assert not {"w1", "w2"} & set(res.model.graph.initializers)
    assert len([n for n in res.model.graph if n.op_type == "QuantizeLinear"]) >= 2
    check_model(res.model)
    ref = run_model(ir.load(str(path)), feeds[0])["y"]
    got = run_model(res.model, feeds[0])["y"]
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_gptq_rounding_of_matmul_weights_lowers_held_out_output_error():
    """GPTQ on a MatMul with a constant [K, N] weight (rows = tokens, per-channel along N):
    with strongly correlated input features, the re-rounded int8 weights (same scales) give
    a smaller output error than round-to-nearest on inputs not used for H, and the hook
    rewrites the int8 initializer of the quantized model."""
    from onnxopt.quantization.context import QuantContext
    from onnxopt.quantization.qdq import build_qdq
    from onnxopt.quantization.analysis import find_layers
    from onnxopt.quantization.rounding import gptq_round, gptq_weight_rounding, matmul_input_hessians
    from onnxopt.quantization.scheme import quantize_weight, scheme_for

    rng = np.random.default_rng(0)
    k, n = 48, 24
    mix = rng.standard_normal((k, k)).astype(np.float32) * 0.3 + np.eye(k, dtype=np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, n])],
        [numpy_helper.from_array(w, "w")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))

    def feeds(count):
        return [{"x": (rng.standard_normal((1, 32, k)).astype(np.float32) @ mix)} for _ in range(count)]

    calib, held = feeds(8), feeds(4)
    node = next(iter(model.graph))
    h = matmul_input_hessians(model, calib, [node])["mm"]
    assert h.shape == (1, k, k)
    x = np.concatenate([f["x"].reshape(-1, k) for f in calib]).astype(np.float64)
    np.testing.assert_allclose(h[0], x.T @ x / len(x), rtol=1e-6)
    q_rtn, scale = quantize_weight(w, 1)
    q = gptq_round(w.T, h, scale, 1).T
    assert np.abs(q).max() <= 127 and np.abs(q - q_rtn).max() >= 1
    xh = np.concatenate([f["x"].reshape(-1, k) for f in held])
    err = lambda qq: np.mean((xh @ (qq * scale[None, :]) - xh @ w) ** 2)  # noqa: E731
    assert err(q) < 0.8 * err(q_rtn)

    # The hook on a QDQ model: int8 initializer replaced by the GPTQ rounding, scales kept.
    layers, _ = find_layers(model, absorb_activations=True)
    scheme = scheme_for("cpu")
    qmodel, qlayers = build_qdq(model, layers, {"x": (-10.0, 10.0)}, scheme)
    ctx = QuantContext(float_model=model, calib=calib, scheme=scheme, layers=qlayers)
    msg = gptq_weight_rounding(qmodel, ctx)
    assert "re-rounded 1 weights" in msg and ctx.report["gptq_rounding"]["layers"] == 1
    wq = qlayers[0].node.inputs[1].producer().inputs[0].const_value.numpy()
    np.testing.assert_array_equal(wq, q.astype(np.int8))
    np.testing.assert_allclose(qlayers[0].dequantized_weight, q * scale[None, :], rtol=1e-6)


# ----------------------------------------------------------------------------------------
# Transformer defaults: SmoothQuant on LayerNorm outputs, MSE ranges on GELU outputs
# ----------------------------------------------------------------------------------------


def test_minilm_defaults_smooth_where_it_pays_and_mse_gelu(minilm):
    path, result, _ = minilm
    rep = result.report
    from onnxopt.quantization import smoothquant as sq

    groups = rep["smoothquant"]["groups"]
    search = rep["smoothquant_search"]
    assert rep["smoothquant"]["mode"] == "auto" and len(search) == 24  # every MatMul input was measured
    smoothed = {g["tensor"] for g in groups}
    assert 6 <= len(smoothed) < 24
    for x, c in search.items():
        gain = c["error_unsmoothed"] - c["error_best"]
        pays = c["alpha"] is not None and gain >= sq.MIN_GAIN * c["error_unsmoothed"] and gain >= sq.MIN_ABS_GAIN
        assert (x in smoothed) == pays, (x, c)
    for g in groups:
        assert g["act_absmax_after"] < g["act_absmax_before"] and g["alpha"] in sq.ALPHAS
    # The FFN-up inputs (a LayerNorm output with outlier channels) are the classic case.
    assert sum(any("/intermediate/dense/" in n for n in g["layers"]) for g in groups) >= 4
    gelu = rep["calibration"].get("mse_for_gelu_outputs", [])
    assert all("intermediate_act_fn" in t and t not in smoothed for t in gelu)

    # Both defaults are there because they measure better than plain min-max: compare on
    # held-out sentences against the same model quantized without them.
    calib = rm.encode_sentences(rm.sentences("calib", 16), seq_len=32)
    feeds = [{k: v[i : i + 1] for k, v in calib.items()} for i in range(16)]
    import onnxopt.quantization.analysis as analysis

    plain_gelu = analysis.gelu_outputs
    try:
        analysis.gelu_outputs = lambda model: set()
        plain = quantize(path, feeds, smoothquant="off", progress=False).model
    finally:
        analysis.gelu_outputs = plain_gelu
    ev = rm.encode_sentences(rm.sentences("eval", 48), seq_len=32)
    ref = rm.sentence_embeddings(run_model(ir.load(str(path)), ev)["last_hidden_state"], ev["attention_mask"])

    def cosine(model):
        emb = rm.sentence_embeddings(run_model(model, ev)["last_hidden_state"], ev["attention_mask"])
        return rm.embedding_agreement(ref, emb)["cosine_mean"]

    assert 1 - cosine(result.model) < 0.8 * (1 - cosine(plain))


def _gelu_graph(kind: str) -> ir.Model:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    c = lambda name, v: numpy_helper.from_array(np.array(v, np.float32), name)  # noqa: E731
    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    if kind == "erf":  # x * 0.5 * (1 + erf(x / sqrt 2)), as torch exports it
        nodes = [helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                 helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["x", "a"], ["m"]),
                 helper.make_node("Mul", ["m", "half"], ["g"])]
        inits = [c("sqrt2", 1.4142135), c("one", 1.0), c("half", 0.5)]
    elif kind == "tanh":  # 0.5 x (1 + tanh(0.79788 (x + 0.044715 x^3)))
        nodes = [helper.make_node("Mul", ["x", "x"], ["x2"]), helper.make_node("Mul", ["x2", "x"], ["x3"]),
                 helper.make_node("Mul", ["x3", "k"], ["kx3"]), helper.make_node("Add", ["x", "kx3"], ["inner"]),
                 helper.make_node("Mul", ["inner", "s"], ["si"]), helper.make_node("Tanh", ["si"], ["t"]),
                 helper.make_node("Add", ["t", "one"], ["a"]), helper.make_node("Mul", ["a", "half"], ["h"]),
                 helper.make_node("Mul", ["x", "h"], ["g"])]
        inits = [c("k", 0.044715), c("s", 0.7978846), c("one", 1.0), c("half", 0.5)]
    else:  # a plain scaled product: not a GELU
        nodes = [helper.make_node("Mul", ["x", "half"], ["m"]), helper.make_node("Mul", ["m", "x"], ["g"])]
        inits = [c("half", 0.5)]
    nodes.append(helper.make_node("MatMul", ["g", "w"], ["y"]))
    graph = helper.make_graph(nodes, "gelu", [x], [y], [*inits, w])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("kind, found", [("erf", {"g"}), ("tanh", {"g"}), ("none", set())])
def test_gelu_outputs_detected(kind, found):
    from onnxopt.quantization.analysis import gelu_outputs

    assert gelu_outputs(_gelu_graph(kind)) == found


def test_range_search_never_worse_than_minmax_and_clips_a_sparse_tail():
    from onnxopt.quantization.analysis import find_layers
    from onnxopt.quantization.range_search import search_matmul_ranges
    from onnxopt.quantization.scheme import scheme_for

    rng = np.random.default_rng(0)
    model = _gelu_graph("none")
    model.graph.initializers["w"].const_value = ir.tensor(rng.standard_normal((8, 4)).astype(np.float32), name="w")
    layers, _ = find_layers(model)
    (layer,) = layers
    rows = np.abs(rng.standard_normal((4000, 8))).astype(np.float32)
    rows[:3] *= 40  # a sparse tail: three rows far out
    ranges = {layer.act_input: (float(rows.min()), float(rows.max()))}
    choice = search_matmul_ranges(model, layers, ranges, scheme_for("cpu"), {layer.act_input: rows})[layer.act_input]
    assert choice.error_chosen <= choice.error_minmax
    assert choice.chosen[1] < choice.minmax[1]  # the tail is clipped
    assert choice.minmax[0] <= choice.chosen[0] <= choice.chosen[1] <= choice.minmax[1]



def test_choose_alphas_smooths_outlier_channels_and_leaves_flat_inputs():
    from onnxopt.quantization.analysis import find_layers
    from onnxopt.quantization.scheme import scheme_for
    from onnxopt.quantization.smoothquant import ALPHAS, choose_alphas, smoothing_groups

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((16, 8)) * 0.2).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])], [w])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    groups = smoothing_groups(find_layers(model)[0])
    flat = rng.standard_normal((2048, 16)).astype(np.float32)
    outlier = flat.copy()
    outlier[:, 3] *= 60.0  # one channel 60x the others: it sets the per-tensor range
    scheme = scheme_for("cpu")
    got = choose_alphas(model, groups, {"x": outlier}, scheme)["x"]
    assert got["alpha"] in ALPHAS and got["error_best"] < 0.5 * got["error_unsmoothed"]
    got_flat = choose_alphas(model, groups, {"x": flat}, scheme)["x"]
    # Nothing to migrate: whatever it picks gains little, and it never reports a loss.
    assert got_flat["error_best"] <= got_flat["error_unsmoothed"]
    assert got_flat["error_unsmoothed"] - got_flat["error_best"] < 0.25 * got_flat["error_unsmoothed"]


def test_layer_with_nan_weight_stays_float(tmp_path):
    rng = np.random.default_rng(0)
    w_bad = rng.standard_normal((8, 4)).astype(np.float32)
    w_bad[2, 1] = np.nan
    nodes = [helper.make_node("MatMul", ["x", "w_ok"], ["h"], name="good"),
             helper.make_node("MatMul", ["x", "w_bad"], ["y2"], name="bad")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 4]),
                               helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w_ok"),
                               numpy_helper.from_array(w_bad, "w_bad")])
    path = tmp_path / "nan.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    feeds = [{"x": rng.standard_normal((2, 8)).astype(np.float32)} for _ in range(4)]
    res = quantize(path, feeds, progress=False)
    assert res.report["layers"]["bad"] == {"quantized": False, "reason": "weight holds NaN/Inf"}
    assert res.report["layers"]["good"]["quantized"]
    ref, out = run_model(ir.load(str(path)), feeds[0]), run_model(res.model, feeds[0])
    np.testing.assert_array_equal(np.isnan(out["y2"]), np.isnan(ref["y2"]))  # the NaN stays where it was
    only_bad = tmp_path / "only_bad.onnx"
    graph2 = helper.make_graph([nodes[1]], "g", graph.input[:], [graph.output[1]], [graph.initializer[1]])
    onnx.save(helper.make_model(graph2, opset_imports=[helper.make_opsetid("", 17)]), only_bad)
    with pytest.raises(OnnxoptError, match="bad: weight holds NaN/Inf"):
        quantize(only_bad, feeds, progress=False)


def test_static_shape_minilm_still_gets_int8_matmuls(tmp_path):
    # With static input shapes ONNX Runtime's MatMulAddFusion rewrites MatMul + 1-D bias into
    # Reshape -> Gemm -> Reshape before its QDQ fusions: nothing fused and int8 ran 2x slower
    # than fp32. The quantizer gives those biases the output's rank, which that fusion skips.
    try:
        proto = onnx.load(str(rm.minilm_model()))
        calib = rm.encode_sentences(rm.sentences("calib", 8), seq_len=32)
    except rm.RealModelUnavailable as exc:
        pytest.skip(str(exc))
    for inp in proto.graph.input:
        for dim, size in zip(inp.type.tensor_type.shape.dim, (1, 32)):
            dim.dim_value = size
    static = tmp_path / "minilm_static.onnx"
    onnx.save(proto, str(static))
    feeds = [{k: v[i : i + 1] for k, v in calib.items()} for i in range(8)]
    result = quantize(static, feeds, progress=False)
    kernels = fused_kernels(result.model)
    assert kernels.get("MatMulIntegerToFloat") == 36 and "DequantizeLinear" not in kernels
    bias_adds = [n for n in result.model.graph if n.op_type == "Add"
                 and any(v.producer() is not None and v.producer().op_type == "MatMul" for v in n.inputs)
                 and any(v.const_value is not None for v in n.inputs)]
    # 24 of the 36 (fold-residual-bias moved the attention-output and FFN-output biases into
    # LayerNorms); every one left has the output's rank.
    assert len(bias_adds) == 24
    assert all(v.const_value.shape == (1, 1, v.const_value.shape[-1]) for n in bias_adds for v in n.inputs
               if v.const_value is not None)
    ref = run_model(ir.load(str(static)), feeds[0])
    out = run_model(result.model, feeds[0])
    for k in ref:
        cos = float(np.dot(ref[k].ravel(), out[k].ravel()) / (np.linalg.norm(ref[k]) * np.linalg.norm(out[k])))
        assert cos > 0.98


def test_drop_says_whether_its_samples_were_held_out(small_cnn, tmp_path, capsys):
    """--report alone (or under 4 samples) holds nothing out: the summary must not claim it did."""
    path, feeds = small_cnn
    rep = quantize(path, feeds, report=tmp_path / "r.json", progress=False).report
    assert rep["calibration"]["held_out"] == 0 and rep["fallback"]["held_out"] is False
    assert "none held out" in rep["fallback"]["metric"]
    rep = quantize(path, feeds, max_drop=0.5, progress=False).report
    assert rep["calibration"]["held_out"] == 1 and rep["fallback"]["held_out"] is True
    assert "1 held-out samples" in rep["fallback"]["metric"]
    npz = tmp_path / "calib.npz"
    np.savez(npz, x=np.concatenate([f["x"] for f in feeds[:3]]))
    assert main(["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--calib", str(npz), "--max-drop", "0.5", "--quiet"]) == 0
    assert "output drop (1 - cosine, calibration samples, none held out)" in capsys.readouterr().out


def test_exclude_by_op_type_finds_layers_the_pipeline_fused(cls_model):
    """cls's MatMul becomes a Gemm in the float pipeline: excluding either op type keeps it float."""
    path, calib, _ = cls_model
    assert [n.op_type for n in onnx.load(str(path)).graph.node].count("MatMul") == 1
    for op in ("MatMul", "Gemm"):
        layers = quantize(path, calib[:2], exclude=[op], progress=False).report["layers"]
        excluded = [k for k, v in layers.items() if v.get("reason") == "excluded by the user"]
        assert excluded == ["MatMul@0"], (op, excluded)


def test_progress_in_a_log_is_lines_without_blanks(small_cnn, tmp_path, capsys):
    """stderr not a terminal (a CI log): each step one line, no empty line left by a live bar."""
    path, feeds = small_cnn
    npz = tmp_path / "calib.npz"
    np.savez(npz, x=np.concatenate([f["x"] for f in feeds]))
    assert main(["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--calib", str(npz)]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert any("calibrating" in line for line in lines) and lines[-1].endswith("done")
    assert all(line.strip() for line in lines), lines


def test_a_float16_model_is_refused_up_front(tmp_path):
    """fp16 models reached ORT as an invalid QDQ model (or an internal error in SmoothQuant)."""
    w = numpy_helper.from_array(np.eye(8, dtype=np.float16), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "half",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 8])], [w])
    path = tmp_path / "half.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(OnnxoptError, match=r"computes in float16 \(input 'x'\).*quantize the model's float32 export"):
        quantize(path, "random", progress=False)


def test_layers_inside_an_if_are_named_when_nothing_else_can_be_quantized(tmp_path):
    """'no Conv, MatMul or Gemm' read as false on a model whose MatMuls sit in If branches."""
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")

    def branch(name):
        return helper.make_graph([helper.make_node("MatMul", ["x", "W"], [f"{name}_y"])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 4])])

    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch("then"), else_branch=branch("else"))], "if",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    path = tmp_path / "if.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    with pytest.raises(OnnxoptError, match=r"in its main graph \(2 sit inside If/Loop/Scan subgraphs, which are not quantized\)"):
        quantize(path, "random", progress=False)


def test_every_quantization_checks_its_output_and_says_when_it_is_far_off(small_cnn, tmp_path, capsys):
    """Without --max-drop or --report nothing compared int8 with fp32: entropy ranges or
    per-tensor weights on PP-OCR rec misread every line (drop 0.5-0.6) with no word."""
    path, feeds = small_cnn
    rep = quantize(path, feeds, progress=False).report
    assert rep["fallback"]["after"] < 0.05 and rep["fallback"]["held_out"] is False
    assert not rep.get("warnings")
    out = tmp_path / "q.onnx"
    npz = tmp_path / "calib.npz"
    np.savez(npz, x=np.concatenate([f["x"] for f in feeds]))
    assert main(["quantize", str(path), "-o", str(out), "--calib", str(npz), "--quiet", "--report", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr()
    assert "output drop vs fp32 (1 - cosine, calibration samples, none held out): " in printed.out
    assert "warning" not in printed.err
    report = json.loads((tmp_path / "r.json").read_text())
    # --report from the CLI carries the per-layer SQNR too (it was left out: quantize_file
    # wrote the report itself and never asked for the sensitivity)
    assert all("sqnr_db" in v for v in report["layers"].values() if v["quantized"])


def test_a_far_off_result_is_warned_about():
    try:
        path = rm.ppocr_model("rec")
        page = dict(rm.images("eval"))["page.png"]
    except rm.RealModelUnavailable as exc:
        pytest.skip(str(exc))
    lines = [{"x": rm.rec_preprocess(page[8 + 30 * k: 38 + 30 * k, 5:300])} for k in range(6)]
    rep = quantize(path, lines, per_channel=False, progress=False).report  # per-tensor weights after BN folding
    # rec (convs + a MatMul neck, no Gemm head) gets MSE ranges on its hard-swish outputs
    # as det does: CER against fp32 10.5% -> 7.6% on 100 rendered lines
    assert len(rep["calibration"].get("mse_tensors", [])) >= 10
    assert rep["fallback"]["after"] > 0.05
    assert len(rep["warnings"]) == 1 and "far from fp32" in rep["warnings"][0]
    assert "--max-drop" in rep["warnings"][0] and "--per-channel" in rep["warnings"][0]
