"""Structured channel pruning (onnxopt.pruning): channel groups on hand-built and real graphs,
exactness when the removed channels carry nothing, the least-squares refit, the CLI and its
bad input."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.cli import main
from onnxopt.errors import OnnxoptError
from onnxopt.pruning import find_channel_spaces, prune

ort.set_default_logger_severity(3)


def _run(model, feeds: dict) -> np.ndarray:
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _block_net(dead=(), seed=0) -> onnx.ModelProto:
    """x[1,3,16,16] -> A 3x3 (16) -> Relu -> depthwise 3x3 -> Relu -> B 1x1 (16) -> Add(A's Relu)
    -> squeeze-excite (GAP -> S1 (8) -> Relu -> S2 (16) -> HardSigmoid -> Mul) -> Concat with
    C 1x1 (8) of A's Relu -> Mul by a per-channel constant -> D 1x1 (4) -> y.

    A, B, S2 and the depthwise conv share one channel group (the Add and the Mul tie them).
    ``dead``: channels of that group whose filters and biases are all zero: they carry 0.
    """
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    inits = {
        "WA": w(16, 3, 3, 3), "bA": w(16), "Wdw": w(16, 1, 3, 3), "bdw": w(16), "WB": w(16, 16, 1, 1), "bB": w(16),
        "WS1": w(8, 16, 1, 1), "bS1": w(8), "WS2": w(16, 8, 1, 1), "bS2": w(16), "WC": w(8, 16, 1, 1), "bC": w(8),
        "scale": (1 + rng.random((1, 24, 1, 1))).astype(np.float32), "WD": w(4, 24, 1, 1), "bD": w(4),
    }
    for c in dead:
        for name in ("WA", "bA", "bdw", "WB", "bB", "WS2", "bS2"):
            inits[name][c] = 0
    pad = {"pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["x", "WA", "bA"], ["a"], name="A", **pad),
        helper.make_node("Relu", ["a"], ["ar"]),
        helper.make_node("Conv", ["ar", "Wdw", "bdw"], ["d"], name="DW", group=16, **pad),
        helper.make_node("Relu", ["d"], ["dr"]),
        helper.make_node("Conv", ["dr", "WB", "bB"], ["b"], name="B"),
        helper.make_node("Add", ["b", "ar"], ["res"]),
        helper.make_node("GlobalAveragePool", ["res"], ["g"]),
        helper.make_node("Conv", ["g", "WS1", "bS1"], ["s1"], name="S1"),
        helper.make_node("Relu", ["s1"], ["s1r"]),
        helper.make_node("Conv", ["s1r", "WS2", "bS2"], ["s2"], name="S2"),
        helper.make_node("HardSigmoid", ["s2"], ["gate"]),
        helper.make_node("Mul", ["res", "gate"], ["se"]),
        helper.make_node("Conv", ["ar", "WC", "bC"], ["c"], name="C"),
        helper.make_node("Concat", ["se", "c"], ["cat"], axis=1),
        helper.make_node("Mul", ["cat", "scale"], ["scaled"]),
        helper.make_node("Conv", ["scaled", "WD", "bD"], ["y"], name="D"),
    ]
    graph = helper.make_graph(
        nodes, "blocks", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _feeds(n, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(n)]


def _weights(model: ir.Model) -> dict[str, tuple[int, ...]]:
    return {n.name: tuple(n.inputs[1].const_value.shape) for n in model.graph if n.op_type == "Conv"}


def test_channel_groups_follow_adds_muls_depthwise_and_concat():
    spaces = find_channel_spaces(ir.from_proto(_block_net()))
    by_producers = {tuple(sorted(p.name for p in s.producers)): s for s in spaces}
    tied = by_producers[("A", "B", "S2")]
    assert tied.channels == 16 and not tied.pinned
    assert "DW" in {u.node.name for u in tied.uses if u.kind == "depthwise"}
    # D reads the Concat: both the tied group and C's channels, at their offsets.
    assert {n.name for n in tied.consumers} == {"B", "S1", "C", "D"}
    assert "D" in {n.name for n in by_producers[("C",)].consumers}
    assert by_producers[("D",)].pinned == ["graph output y"]
    # The per-channel scale of the Concat output follows both groups.
    assert any(u.kind == "param" and u.node.op_type == "Mul" for u in by_producers[("C",)].uses)


def test_removing_channels_that_carry_nothing_is_exact():
    dead = (1, 6, 9, 14)
    src = _block_net(dead=dead)
    for calib in (None, _feeds(4)):
        res = prune(ir.from_proto(src), ratio=0.25, multiple=1, exclude=["S1", "C"], calib=calib, progress=False)
        shapes = _weights(res.model)
        assert shapes["A"][0] == 12 and shapes["B"] == (12, 12, 1, 1) and shapes["DW"] == (12, 1, 3, 3)
        assert shapes["S2"][0] == 12 and shapes["S1"] == (8, 12, 1, 1) and shapes["D"] == (4, 20, 1, 1)
        dw = next(n for n in res.model.graph if n.name == "DW")
        assert dw.attributes["group"].value == 12
        for feed in _feeds(3, seed=7):
            ref, new = _run(src, feed), _run(res.model, feed)
            assert np.abs(ref - new).max() <= 2e-3 * np.abs(ref).max()
        assert res.report["params_after"] < res.report["params_before"]


def test_least_squares_refit_lowers_the_output_error():
    src = _block_net(seed=3)
    calib, held = _feeds(8), _feeds(4, seed=11)

    def err(model):
        return np.mean([np.linalg.norm(_run(src, f) - _run(model, f)) / np.linalg.norm(_run(src, f)) for f in held])

    cut = prune(ir.from_proto(src), ratio=0.5, multiple=1, calib=calib, reconstruct=False, progress=False)
    refit = prune(ir.from_proto(src), ratio=0.5, multiple=1, calib=calib, progress=False)
    assert _weights(cut.model) == _weights(refit.model)
    assert set(refit.report["refit_layers"]) >= {"B", "D"}
    assert err(refit.model) < 0.7 * err(cut.model)


def test_max_drop_picks_the_largest_ratio_within_the_bound():
    src = _block_net(seed=3)
    feeds = _feeds(10)
    res = prune(ir.from_proto(src), ratio=0.75, multiple=1, calib=feeds, max_drop=0.02, progress=False)
    search = res.report["max_drop_search"]
    assert 0 < res.report["ratio"] <= 0.75 and {t["ratio"] for t in search} >= {res.report["ratio"]}
    assert all(t["drop"] <= 0.02 for t in search if t["ratio"] <= res.report["ratio"])
    assert all(t["drop"] > 0.02 for t in search if t["ratio"] > res.report["ratio"])
    held = feeds[-2:]  # the held-out fifth the drop was measured on
    ref = np.concatenate([_run(src, f).ravel() for f in held])
    new = np.concatenate([_run(res.model, f).ravel() for f in held])
    assert 1 - ref @ new / np.linalg.norm(ref) / np.linalg.norm(new) <= 0.02 + 1e-6
    assert res.report["evaluated_on"] == "2 held-out calibration samples"
    with pytest.raises(OnnxoptError, match="even ratio 0.0625"):
        prune(ir.from_proto(src), ratio=0.5, multiple=1, calib=feeds, max_drop=1e-12, progress=False)
    with pytest.raises(OnnxoptError, match="needs --calib"):
        prune(ir.from_proto(src), ratio=0.5, max_drop=0.01, progress=False)


def test_reshape_and_graph_outputs_pin_their_channels():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], name="c1"),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["flat"]),
             helper.make_node("Conv", ["r", "W2"], ["y2"], name="c2")]
    graph = helper.make_graph(
        nodes, "pins", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("flat", TensorProto.FLOAT, [1, 1024]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(rng.standard_normal((16, 3, 1, 1)).astype(np.float32), "W1"),
         numpy_helper.from_array(rng.standard_normal((4, 16, 1, 1)).astype(np.float32), "W2"),
         numpy_helper.from_array(np.array([1, -1], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    spaces = {s.producers[0].name: s for s in find_channel_spaces(ir.from_proto(model))}
    assert spaces["c1"].pinned and "Reshape" in spaces["c1"].pinned[0]
    assert spaces["c2"].pinned == ["graph output y2"]
    with pytest.raises(OnnxoptError, match="nothing to prune"):
        prune(ir.from_proto(model), ratio=0.5, progress=False)


def test_bad_arguments_are_refused():
    model = ir.from_proto(_block_net())
    for ratio in (0.0, 1.0, -0.2, float("nan")):
        with pytest.raises(OnnxoptError, match="--ratio"):
            prune(model, ratio=ratio, progress=False)
    with pytest.raises(OnnxoptError, match="--exclude 'nope'"):
        prune(model, ratio=0.25, exclude=["nope"], progress=False)


def _real(name):
    from onnxopt.testing.real_models import RealModelUnavailable, ppocr_model

    try:
        return str(ppocr_model(name))
    except RealModelUnavailable as e:
        pytest.skip(str(e))


def test_prune_real_ppocr_det_shrinks_and_runs():
    det = _real("det")
    res = prune(det, ratio=0.25, progress=False)
    rep = res.report
    assert rep["spaces_pruned"] >= 15 and rep["params_after"] < 0.7 * rep["params_before"]
    # Residual blocks tie several convs into one group; they were pruned together.
    assert any(len(s["producers"]) >= 2 and s["kept"] < s["channels"] for s in rep["spaces"])
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 320, 320)).astype(np.float32)
    ref = ort.InferenceSession(det, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    out = _run(res.model, {"x": x})
    assert out.shape == ref.shape and np.all((out >= 0) & (out <= 1))
    after = _weights(res.model)
    for space in rep["spaces"]:
        for producer in space["producers"]:
            if producer in after:
                assert after[producer][0] == space["kept"], producer


def test_cli_prune_writes_the_model_and_refuses_bad_input(tmp_path, capsys):
    src = tmp_path / "net.onnx"
    onnx.save(_block_net(), src)
    out = tmp_path / "net.pruned.onnx"
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0.5", "--multiple", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "channel groups pruned" in printed and "cosine min" in printed
    assert _weights(ir.load(out))["A"][0] == 8
    assert main(["prune", str(src), "-o", str(out), "--ratio", "0.5", "--calib", "random", "--samples", "4", "--quiet"]) == 0
    assert "calibrated on random data" in capsys.readouterr().err
    for args, message in ((["--ratio", "2"], "--ratio 2.0"), (["--ratio", "0.3", "--samples", "2"], "need --calib"),
                          (["--ratio", "0.3", "--max-drop", "0.01"], "need --calib"),
                          (["--ratio", "0.3", "--calib", str(tmp_path / "missing")], "missing")):
        bad = tmp_path / "bad.onnx"
        assert main(["prune", str(src), "-o", str(bad), "--quiet", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and not bad.exists()
    assert main(["prune", str(src), "-o", str(src), "--ratio", "0.3", "--quiet"]) == 2  # never overwrite the input
    assert onnx.load(src).graph.node[0].name == "A"


def _ffn_net(dead=(), seed=0) -> onnx.ModelProto:
    """A transformer FFN on [batch, seq, 8]: MatMul (8 -> 32) -> bias Add -> erf GELU ->
    MatMul (32 -> 8) -> residual Add -> LayerNormalization. ``dead``: hidden neurons whose
    up-projection column and bias are zero (GELU(0) = 0: they carry nothing)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((8, 32)) / 3).astype(np.float32)
    b1 = (rng.standard_normal(32) / 3).astype(np.float32)
    w1[:, list(dead)] = 0
    b1[list(dead)] = 0
    inits = {"W1": w1, "b1": b1, "W2": (rng.standard_normal((32, 8)) / 6).astype(np.float32),
             "sqrt2": np.array(np.sqrt(2), np.float32), "one": np.array(1, np.float32), "half": np.array(0.5, np.float32),
             "g": np.ones(8, np.float32), "beta": np.zeros(8, np.float32)}
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="up"),
        helper.make_node("Add", ["b1", "h0"], ["h"]),
        helper.make_node("Div", ["h", "sqrt2"], ["hd"]),
        helper.make_node("Erf", ["hd"], ["he"]),
        helper.make_node("Add", ["he", "one"], ["he1"]),
        helper.make_node("Mul", ["h", "he1"], ["hm"]),
        helper.make_node("Mul", ["hm", "half"], ["gelu"]),
        helper.make_node("MatMul", ["gelu", "W2"], ["down"], name="down"),
        helper.make_node("Add", ["down", "x"], ["res"]),
        helper.make_node("LayerNormalization", ["res", "g", "beta"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8]),
                       helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 8])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_transformer_ffn_neurons_are_pruned_on_the_last_axis():
    dead = tuple(range(0, 32, 4))  # 8 of 32
    src = _ffn_net(dead=dead)
    rng = np.random.default_rng(5)
    feeds = [{"x": rng.standard_normal((4, 16, 8)).astype(np.float32),
              "attention_mask": (np.arange(16)[None, :] < rng.integers(4, 17, (4, 1))).astype(np.int64)}
             for _ in range(8)]
    spaces = find_channel_spaces(ir.from_proto(src))
    hidden = next(s for s in spaces if [p.name for p in s.producers] == ["up"])
    assert hidden.channels == 32 and not hidden.pinned and [n.name for n in hidden.consumers] == ["down"]
    # The residual stream is normalised over its channels: LayerNormalization pins it.
    assert all(s.pinned for s in spaces if [p.name for p in s.producers] == ["down"])
    for calib in (None, feeds):
        res = prune(ir.from_proto(src), ratio=0.25, multiple=1, calib=calib, progress=False)
        w = {n.name: tuple(n.inputs[1].const_value.shape) for n in res.model.graph if n.op_type == "MatMul"}
        assert w == {"up": (8, 24), "down": (24, 8)}
        for feed in feeds[:2]:
            ref, new = _run(src, {"x": feed["x"], "attention_mask": feed["attention_mask"]}), _run(res.model, feed)
            assert np.abs(ref - new).max() <= 2e-3 * np.abs(ref).max()


def test_prune_real_minilm_ffns():
    from onnxopt.testing.real_models import RealModelUnavailable, encode_sentences, minilm_model, sentences

    try:
        path = str(minilm_model())
    except RealModelUnavailable as e:
        pytest.skip(str(e))
    res = prune(path, ratio=0.25, progress=False)
    assert res.report["spaces_pruned"] == 6  # one per layer: the FFN hidden neurons; attention and residual pinned
    shapes = sorted(tuple(n.inputs[1].const_value.shape) for n in res.model.graph
                    if n.op_type == "MatMul" and n.inputs[1].const_value is not None and 1152 in n.inputs[1].const_value.shape)
    assert shapes == [(384, 1152)] * 6 + [(1152, 384)] * 6
    feed = encode_sentences(sentences("eval", 2), 32)
    ref = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    assert _run(res.model, feed).shape == ref.shape


def test_refit_shift_of_a_matmul_that_is_the_graph_output():
    # No bias Add after the down projection: the refit's shift gets its own Add, and the
    # graph output keeps its name and shape.
    src = _ffn_net(dead=tuple(range(0, 32, 4)))
    del src.graph.node[-2:]  # drop the residual Add and the LayerNorm
    src.graph.output[0].name = "down"
    rng = np.random.default_rng(5)
    feeds = [{"x": rng.standard_normal((4, 16, 8)).astype(np.float32), "attention_mask": np.ones((4, 16), np.int64)}
             for _ in range(8)]
    res = prune(ir.from_proto(src), ratio=0.25, multiple=1, calib=feeds, progress=False)
    assert res.report["refit_layers"] == ["down"] and [o.name for o in res.model.graph.outputs] == ["down"]
    assert [n.op_type for n in res.model.graph][-2:] == ["MatMul", "Add"]
    ref, new = _run(src, feeds[0]), _run(res.model, feeds[0])
    assert np.abs(ref - new).max() <= 2e-3 * np.abs(ref).max()


def test_shared_weights_are_not_cut_into_copies():
    """Two layers reading one weight (tied or cloned layers): cutting gave each its own pruned
    copy, and the model grew (a TorchScript TransformerEncoder export: 116% of its parameters)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32) / 4, "W"),
             numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "W3"),
             numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "W2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"]), helper.make_node("Relu", ["a"], ["ra"]),
             helper.make_node("MatMul", ["ra", "W"], ["b"]), helper.make_node("Relu", ["b"], ["rb"]),
             helper.make_node("MatMul", ["rb", "W"], ["c"]), helper.make_node("Relu", ["c"], ["rc"]),
             helper.make_node("MatMul", ["rc", "W3"], ["d"]), helper.make_node("Relu", ["d"], ["rd"]),
             helper.make_node("MatMul", ["rd", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    res = prune(model, ratio=0.5, progress=False)
    assert res.report["params_after"] < res.report["params_before"]  # W3's output channels still go
    shared = [v for v in res.model.graph.initializers.values() if len({id(n) for n, _ in v.uses()}) == 2]
    assert [v.const_value.shape for v in shared] == [ir.Shape([16, 16])]  # W: uncut, still one tensor


@pytest.mark.parametrize("opset", [13, 18])
def test_a_spatial_reduce_mean_prunes_like_global_average_pool(opset):
    """dynamo exports global pooling and squeeze-excite as ReduceMean over H, W: it keeps the
    channels apart, so it must not pin them (it did: 6 groups pruned against 9 with GAP)."""
    rng = np.random.default_rng(0)

    def w(*shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32))

    def net(pool: str) -> onnx.ModelProto:
        inits = [w(16, 3, 3, 3), w(8, 16, 1, 1), w(16, 8, 1, 1), w(4, 16, 1, 1)]
        for t, name in zip(inits, ("A", "S1", "S2", "D")):
            t.name = name
        if pool == "ReduceMean" and opset >= 18:
            inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "axes"))
            gap = helper.make_node("ReduceMean", ["ra", "axes"], ["g"], keepdims=1)
        elif pool == "ReduceMean":
            gap = helper.make_node("ReduceMean", ["ra"], ["g"], axes=[-2, -1], keepdims=1)
        else:
            gap = helper.make_node("GlobalAveragePool", ["ra"], ["g"])
        nodes = [helper.make_node("Conv", ["x", "A"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["ra"]), gap,
                 helper.make_node("Conv", ["g", "S1"], ["s1"]), helper.make_node("Relu", ["s1"], ["rs1"]),
                 helper.make_node("Conv", ["rs1", "S2"], ["s2"]), helper.make_node("Sigmoid", ["s2"], ["gate"]),
                 helper.make_node("Mul", ["ra", "gate"], ["se"]), helper.make_node("Conv", ["se", "D"], ["y"])]
        graph = helper.make_graph(nodes, "se", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])

    feeds = {"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)}
    reports = {}
    for pool in ("GlobalAveragePool", "ReduceMean"):
        res = prune(ir.from_proto(net(pool)), ratio=0.5, progress=False)
        assert _run(res.model, feeds).shape == (1, 4, 16, 16)
        reports[pool] = (res.report["spaces_pruned"], res.report["channels_after"])
    assert reports["ReduceMean"] == reports["GlobalAveragePool"] and reports["ReduceMean"][0] >= 1


def test_a_reshape_to_minus_one_c_after_the_pool_is_rewritten_with_the_new_c():
    """dynamo flattens a pooled [N, C, 1, 1] with Reshape(x, [-1, C]): C lives in a shape
    constant, so it pinned the channels; now the cut writes [-1, C'] there."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32) / 5, "A"),
             numpy_helper.from_array(rng.standard_normal((10, 16)).astype(np.float32) / 4, "W"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.array([-1, 16], np.int64), "flat")]
    nodes = [helper.make_node("Conv", ["x", "A"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["a"], ["ra"]),
             helper.make_node("ReduceMean", ["ra", "axes"], ["g"], keepdims=1),
             helper.make_node("Reshape", ["g", "flat"], ["v"], allowzero=1),
             helper.make_node("Gemm", ["v", "W"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], inits)
    res = prune(ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])), ratio=0.5, progress=False)
    assert res.report["channels_after"] == 8
    reshape = next(n for n in res.model.graph if n.op_type == "Reshape")
    assert reshape.inputs[1].const_value.numpy().tolist() == [-1, 8]
    for batch in (1, 3):
        assert _run(res.model, {"x": rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)}).shape == (batch, 10)


def test_an_inf_pixel_in_one_sample_does_not_scramble_the_ranking():
    # inf - inf = NaN through the first conv: every activation score of that sample was NaN,
    # the ranking arbitrary and the dead channels kept (max error 1.3 instead of 1e-3).
    src = _block_net(dead=(1, 6, 9, 14))
    clean = _feeds(4)
    dirty = [dict(f) for f in clean]
    x = dirty[2]["x"].copy()
    x[0, 0, 3, 3] = np.inf
    dirty[2] = {"x": x}
    ref = _run(src, _feeds(1, seed=7)[0])
    errors = []
    for calib in (clean, dirty):
        res = prune(ir.from_proto(src), ratio=0.25, multiple=1, exclude=["S1", "C"], calib=calib, progress=False)
        errors.append(float(np.abs(ref - _run(res.model, _feeds(1, seed=7)[0])).max()))
        assert all(np.all(np.isfinite(t.const_value.numpy())) for t in res.model.graph.initializers.values())
    assert errors[1] <= 2e-3 * np.abs(ref).max(), errors
