"""Fusion passes: each must fire where the algebra holds and stay put where it does not.

Every positive case compares ONNX Runtime on the rewritten model with ONNX Runtime on the
original (or numpy where ORT cannot run the opset) and checks the node kinds left.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.graph import all_nodes, op_histogram
from onnxopt.passes import get_pass
from onnxopt.testing import real_models as rm
from onnxopt.verify import run_model

RNG = np.random.default_rng(0)
F = TensorProto.FLOAT


def rand(*shape, positive=False):
    a = RNG.standard_normal(shape).astype(np.float32)
    return np.abs(a) + 0.5 if positive else a


def model(nodes, inputs, outputs, inits=(), opset=17, ir_version=8):
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        [numpy_helper.from_array(v, k) for k, v in dict(inits).items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir_version
    # Outputs declared without a shape get the inferred one (the checker wants one).
    inferred = onnx.shape_inference.infer_shapes(m)
    for out, inf in zip(m.graph.output, inferred.graph.output):
        if not out.type.tensor_type.HasField("shape"):
            out.CopyFrom(inf)
    return ir.serde.deserialize_model(m)


def run_passes(m: ir.Model, *names: str) -> ir.Model:
    m = ir.serde.deserialize_model(ir.serde.serialize_model(m))  # keep the original intact
    for name in names:
        get_pass(name).factory()(m)
    get_pass("remove-unused").factory()(m)
    onnx.checker.check_model(ir.serde.serialize_model(m))
    return m


def ops(m: ir.Model) -> list[str]:
    return [n.op_type for n in all_nodes(m)]


def assert_same(original: ir.Model, rewritten: ir.Model, feeds, rtol=1e-5, atol=1e-5):
    ref = run_model(original, feeds)
    new = run_model(rewritten, feeds)
    assert list(new) == list(ref)  # same output names, same order
    for k in ref:
        np.testing.assert_allclose(new[k], ref[k], rtol=rtol, atol=atol)


def bn_inits(c, prefix="bn"):
    return {f"{prefix}_s": rand(c), f"{prefix}_b": rand(c), f"{prefix}_m": rand(c), f"{prefix}_v": rand(c, positive=True)}


def bn_node(x, y, prefix="bn", **kw):
    return helper.make_node("BatchNormalization", [x, f"{prefix}_s", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"], [y], **kw)


X4 = [("x", F, ["N", 4, 8, 8])]


# -- fuse-batchnorm ---------------------------------------------------------------------


def test_batchnorm_into_conv_keeps_output_name():
    m = model(
        [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]), bn_node("c", "y", epsilon=1e-3)],
        X4, [("y", F, ["N", 6, 8, 8])], {"W": rand(6, 4, 3, 3), "B": rand(6), **bn_inits(6)}, opset=15,
    )
    out = run_passes(m, "fuse-batchnorm")
    assert ops(out) == ["Conv"] and out.graph.outputs[0].name == "y"
    assert_same(m, out, {"x": rand(2, 4, 8, 8)})


def test_batchnorm_into_grouped_conv_transpose():
    m = model(
        [helper.make_node("ConvTranspose", ["x", "W"], ["c"], group=2, strides=[2, 2]), bn_node("c", "y")],
        X4, [("y", F, None)], {"W": rand(4, 3, 2, 2), **bn_inits(6)},
    )
    out = run_passes(m, "fuse-batchnorm")
    assert ops(out) == ["ConvTranspose"]
    assert_same(m, out, {"x": rand(1, 4, 8, 8)})


def test_batchnorm_into_gemm_and_2d_matmul():
    gemm = model(
        [helper.make_node("Gemm", ["x", "W", "C"], ["g"], transB=1, beta=0.5), bn_node("g", "y")],
        [("x", F, ["N", 5])], [("y", F, ["N", 3])], {"W": rand(3, 5), "C": rand(3), **bn_inits(3)},
    )
    out = run_passes(gemm, "fuse-batchnorm")
    assert ops(out) == ["Gemm"]
    assert_same(gemm, out, {"x": rand(4, 5)})
    mm = model(
        [helper.make_node("MatMul", ["x", "W"], ["g"]), bn_node("g", "y")],
        [("x", F, ["N", 5])], [("y", F, ["N", 3])], {"W": rand(5, 3), **bn_inits(3)},
    )
    out = run_passes(mm, "fuse-batchnorm")
    assert ops(out) == ["Gemm"]
    assert_same(mm, out, {"x": rand(4, 5)})


def test_batchnorm_not_fused_when_unsafe():
    # 3-D MatMul: the BN channel axis (1) is not the MatMul's output axis.
    mm3 = model(
        [helper.make_node("MatMul", ["x", "W"], ["g"]), bn_node("g", "y")],
        [("x", F, ["N", 3, 5])], [("y", F, None)], {"W": rand(5, 3), **bn_inits(3)},
    )
    assert ops(run_passes(mm3, "fuse-batchnorm")) == ["MatMul", "BatchNormalization"]
    # Training mode (opset 15 attribute, extra outputs).
    train = model(
        [helper.make_node("Conv", ["x", "W"], ["c"]),
         helper.make_node("BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], ["y", "rm", "rv"], training_mode=1)],
        X4, [("y", F, None)], {"W": rand(6, 4, 1, 1), **bn_inits(6)}, opset=15,
    )
    assert ops(run_passes(train, "fuse-batchnorm")) == ["Conv", "BatchNormalization"]
    # A weight shared with another Conv must not change under that Conv.
    shared = model(
        [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y"), helper.make_node("Conv", ["x", "W"], ["z"])],
        X4, [("y", F, None), ("z", F, None)], {"W": rand(6, 4, 1, 1), **bn_inits(6)},
    )
    assert op_histogram(run_passes(shared, "fuse-batchnorm")) == {"Conv": 2, "BatchNormalization": 1}
    # The Conv output is also a graph output: it must stay as it is.
    visible = model(
        [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y")],
        X4, [("y", F, None), ("c", F, None)], {"W": rand(6, 4, 1, 1), **bn_inits(6)},
    )
    assert ops(run_passes(visible, "fuse-batchnorm")) == ["Conv", "BatchNormalization"]
    # var + epsilon <= 0 (a broken export): folding would bake NaN weights into the Conv.
    bad = {"W": rand(6, 4, 1, 1), **bn_inits(6)}
    bad["bn_v"] = bad["bn_v"].copy()
    bad["bn_v"][2] = -1.0
    negvar = model([helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y")], X4, [("y", F, None)], bad)
    assert ops(run_passes(negvar, "fuse-batchnorm")) == ["Conv", "BatchNormalization"]


def _numpy_bn(c, s, b, m, v, eps):
    shape = (1, -1, 1, 1)
    return (c - m.reshape(shape)) / np.sqrt(v.reshape(shape) + eps) * s.reshape(shape) + b.reshape(shape)


@pytest.mark.parametrize("opset,attrs,fuses", [
    (6, {"spatial": 1, "is_test": 1}, True),
    (6, {"is_test": 0}, False),          # training: batch statistics
    (5, {"consumed_inputs": [0, 0, 0, 1, 1], "is_test": 1}, True),
    (7, {"spatial": 0}, False),          # per-element normalisation
    (8, {"spatial": 1}, True),
])
def test_batchnorm_old_opsets(opset, attrs, fuses):
    inits = {"W": rand(6, 4, 3, 3), **bn_inits(6)}
    m = model([helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y", epsilon=1e-4, **attrs)],
              X4, [("y", F, ["N", 6, 6, 6])], inits, opset=opset, ir_version=4)
    out = run_passes(m, "fuse-batchnorm")
    assert ops(out) == (["Conv"] if fuses else ["Conv", "BatchNormalization"])
    if not fuses:
        return
    # ORT runs opset >= 7 only; Conv is the same op in opsets 1-10, so run both sides at 7:
    # the bare Conv (reference, then BN in numpy) and the fused Conv.
    x = rand(2, 4, 8, 8)
    conv_only = model([helper.make_node("Conv", ["x", "W"], ["y"])], X4, [("y", F, ["N", 6, 6, 6])], {"W": inits["W"]}, opset=7, ir_version=4)
    ref = _numpy_bn(run_model(conv_only, {"x": x})["y"], inits["bn_s"], inits["bn_b"], inits["bn_m"], inits["bn_v"], 1e-4)
    out.opset_imports[""] = 7
    np.testing.assert_allclose(run_model(out, {"x": x})["y"], ref, rtol=1e-5, atol=1e-5)


def test_batchnorm_inside_if_branch():
    then = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "t")], "then", [], [helper.make_tensor_value_info("t", F, None)]
    )
    other = helper.make_graph([helper.make_node("Relu", ["x"], ["e"])], "else", [], [helper.make_tensor_value_info("e", F, None)])
    m = model([helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other)],
              [*X4, ("cond", TensorProto.BOOL, [])], [("y", F, None)], {"W": rand(4, 4, 1, 1), **bn_inits(4)})
    out = run_passes(m, "fuse-batchnorm")
    assert "BatchNormalization" not in ops(out)
    then_out = out.graph.node(0).attributes["then_branch"].value.outputs[0]
    assert then_out.name == "t"
    for cond in (True, False):
        assert_same(m, out, {"x": rand(1, 4, 8, 8), "cond": np.array(cond)})


# -- fuse-conv-bias / fuse-matmul-add ----------------------------------------------------


@pytest.mark.parametrize("shape,op", [((1, 6, 1, 1), "Add"), ((6, 1, 1), "Add"), ((1,), "Add"), ((1, 6, 1, 1), "Sub")])
def test_conv_bias_fused(shape, op):
    m = model([helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node(op, ["c", "k"], ["y"])],
              X4, [("y", F, None)], {"W": rand(6, 4, 3, 3), "k": rand(*shape)})
    out = run_passes(m, "fuse-conv-bias")
    assert ops(out) == ["Conv"] and len(out.graph.node(0).inputs) == 3
    assert_same(m, out, {"x": rand(1, 4, 8, 8)})


def test_conv_bias_not_fused():
    # Varies over a spatial axis: not a bias.
    spatial = model([helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("Add", ["c", "k"], ["y"])],
                    X4, [("y", F, None)], {"W": rand(6, 4, 1, 1), "k": rand(1, 6, 8, 8)})
    assert ops(run_passes(spatial, "fuse-conv-bias")) == ["Conv", "Add"]
    # Not a constant.
    dyn = model([helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("Add", ["c", "k"], ["y"])],
                [*X4, ("k", F, [1, 6, 1, 1])], [("y", F, None)], {"W": rand(6, 4, 1, 1)})
    assert ops(run_passes(dyn, "fuse-conv-bias")) == ["Conv", "Add"]


@pytest.mark.parametrize("pads,fuses", [([0, 0, 0, 0], True), ([1, 1, 1, 1], False)])
def test_input_bias_into_unpadded_conv(pads, fuses):
    m = model([helper.make_node("Add", ["x", "k"], ["a"]), helper.make_node("Conv", ["a", "W", "B"], ["y"], group=2, pads=pads)],
              X4, [("y", F, None)], {"W": rand(6, 2, 3, 3), "B": rand(6), "k": rand(1, 4, 1, 1)})
    out = run_passes(m, "fuse-conv-input-bias")
    assert ops(out) == (["Conv"] if fuses else ["Add", "Conv"])
    assert_same(m, out, {"x": rand(1, 4, 8, 8)})


def test_matmul_add_to_gemm_only_for_2d():
    two = model([helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["b", "m"], ["y"])],
                [("x", F, ["N", 5])], [("y", F, ["N", 3])], {"W": rand(5, 3), "b": rand(3)})
    out = run_passes(two, "fuse-matmul-add")
    assert ops(out) == ["Gemm"] and out.graph.outputs[0].name == "y"
    assert_same(two, out, {"x": rand(4, 5)})
    three = model([helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
                  [("x", F, ["N", 2, 5])], [("y", F, None)], {"W": rand(5, 3), "b": rand(3)})
    assert ops(run_passes(three, "fuse-matmul-add")) == ["MatMul", "Add"]


# -- fuse-scale ------------------------------------------------------------------------------


def test_scale_after_conv_gemm_matmul():
    conv = model([helper.make_node("Conv", ["x", "W", "B"], ["c"]), helper.make_node("Mul", ["s", "c"], ["y"])],
                 X4, [("y", F, None)], {"W": rand(6, 4, 3, 3), "B": rand(6), "s": rand(1, 6, 1, 1)})
    out = run_passes(conv, "fuse-scale")
    assert ops(out) == ["Conv"]
    assert_same(conv, out, {"x": rand(1, 4, 8, 8)})
    mm = model([helper.make_node("MatMul", ["x", "W"], ["c"]), helper.make_node("Div", ["c", "s"], ["y"])],
               [("x", F, ["N", 7, 5])], [("y", F, None)], {"W": rand(5, 3), "s": rand(3, positive=True)})
    out = run_passes(mm, "fuse-scale")
    assert ops(out) == ["MatMul"]
    assert_same(mm, out, {"x": rand(2, 7, 5)})


def test_non_finite_scale_is_not_moved_into_weights():
    # (X @ W) * inf is inf or NaN by the sign of each product; X @ (W * inf) is NaN wherever a
    # term is 0 * inf. The fuzzer found the safety net rolling this back (seed 2718).
    mm = model([helper.make_node("MatMul", ["x", "W"], ["c"]), helper.make_node("Mul", ["c", "s"], ["y"])],
               [("x", F, ["N", 5])], [("y", F, None)], {"W": rand(5, 3), "s": np.array([1.0, np.inf, 2.0], np.float32)})
    assert ops(run_passes(mm, "fuse-scale")) == ["MatMul", "Mul"]


def test_scale_before_grouped_conv_and_gemm():
    conv = model([helper.make_node("Mul", ["x", "s"], ["a"]), helper.make_node("Conv", ["a", "W"], ["y"], group=2, pads=[1, 1, 1, 1])],
                 X4, [("y", F, None)], {"W": rand(6, 2, 3, 3), "s": rand(4, 1, 1)})
    out = run_passes(conv, "fuse-scale")
    assert ops(out) == ["Conv"]
    assert_same(conv, out, {"x": rand(1, 4, 8, 8)})
    gemm = model([helper.make_node("Mul", ["x", "s"], ["a"]), helper.make_node("Gemm", ["a", "W"], ["y"])],
                 [("x", F, ["N", 5])], [("y", F, None)], {"W": rand(5, 3), "s": np.array(0.25, np.float32)})
    out = run_passes(gemm, "fuse-scale")
    assert ops(out) == ["Gemm"]
    assert_same(gemm, out, {"x": rand(4, 5)})


def test_scale_chain_merged_and_dynamic_scale_left():
    chain = model([helper.make_node("Div", ["x", "a"], ["d"]), helper.make_node("Mul", ["b", "d"], ["y"])],
                  X4, [("y", F, None)], {"a": np.array(6.0, np.float32), "b": rand(1)})
    out = run_passes(chain, "fuse-scale")
    assert ops(out) == ["Mul"]
    assert_same(chain, out, {"x": rand(1, 4, 8, 8)})
    dyn = model([helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("Mul", ["c", "s"], ["y"])],
                [*X4, ("s", F, [1, 6, 1, 1])], [("y", F, None)], {"W": rand(6, 4, 1, 1)})
    assert ops(run_passes(dyn, "fuse-scale")) == ["Conv", "Mul"]


# -- fuse-pad ----------------------------------------------------------------------------------


def _pad_model(mode, pads, consumer):
    inits = {"p": np.array(pads, np.int64), "W": rand(6, 4, 3, 3)}
    nodes = [helper.make_node("Pad", ["x", "p"], ["q"], mode=mode)]
    if consumer == "Conv":
        nodes.append(helper.make_node("Conv", ["q", "W"], ["y"], pads=[1, 0, 1, 0]))
    else:
        nodes.append(helper.make_node("AveragePool", ["q"], ["y"], kernel_shape=[3, 3], **consumer))
    return model(nodes, X4, [("y", F, None)], inits, opset=13)


@pytest.mark.parametrize("mode,pads,consumer,fuses", [
    ("constant", [0, 0, 1, 2, 0, 0, 2, 1], "Conv", True),
    ("reflect", [0, 0, 1, 1, 0, 0, 1, 1], "Conv", False),
    ("constant", [0, 1, 1, 1, 0, 0, 1, 1], "Conv", False),  # pads a channel
    ("constant", [0, 0, 1, 1, 0, 0, 1, 1], {"count_include_pad": 1}, True),
    ("constant", [0, 0, 1, 1, 0, 0, 1, 1], {}, False),  # count_include_pad=0 averages differently
])
def test_fuse_pad(mode, pads, consumer, fuses):
    m = _pad_model(mode, pads, consumer)
    out = run_passes(m, "fuse-pad")
    assert ("Pad" not in ops(out)) == fuses
    if not (consumer == "Conv" and pads[1]):
        assert_same(m, out, {"x": rand(1, 4, 8, 8)})


# -- fuse-chains -------------------------------------------------------------------------------


def test_chains_fire():
    t = model([helper.make_node("Transpose", ["x"], ["a"], perm=[0, 2, 3, 1]), helper.make_node("Transpose", ["a"], ["b"], perm=[0, 3, 1, 2]),
               helper.make_node("Transpose", ["b"], ["c"], perm=[1, 0, 2, 3]), helper.make_node("Transpose", ["c"], ["y"], perm=[0, 2, 1, 3])],
              X4, [("y", F, None)])
    out = run_passes(t, "fuse-chains")
    assert ops(out) == ["Transpose"] and out.graph.outputs[0].name == "y"
    assert_same(t, out, {"x": rand(2, 4, 8, 8)})
    r = model([helper.make_node("Reshape", ["x", "s1"], ["a"]), helper.make_node("Reshape", ["a", "s2"], ["y"])],
              X4, [("y", F, None)], {"s1": np.array([-1, 16], np.int64), "s2": np.array([2, -1, 4], np.int64)})
    out = run_passes(r, "fuse-chains")
    assert ops(out) == ["Reshape"]
    assert_same(r, out, {"x": rand(2, 4, 8, 8)})
    su = model([helper.make_node("Unsqueeze", ["x", "a0"], ["a"]), helper.make_node("Unsqueeze", ["a", "a2"], ["b"]),
                helper.make_node("Squeeze", ["b", "a2"], ["c"]), helper.make_node("Cast", ["c"], ["d"], to=TensorProto.DOUBLE),
                helper.make_node("Cast", ["d"], ["y"], to=TensorProto.FLOAT)],
               X4, [("y", F, None)], {"a0": np.array([0], np.int64), "a2": np.array([2], np.int64)})
    out = run_passes(su, "fuse-chains")
    assert ops(out) == ["Unsqueeze"]
    assert_same(su, out, {"x": rand(2, 4, 8, 8)})
    uu = model([helper.make_node("Unsqueeze", ["x", "a0"], ["a"]), helper.make_node("Unsqueeze", ["a", "a2"], ["y"])],
               X4, [("y", F, None)], {"a0": np.array([0, 3], np.int64), "a2": np.array([2, 5], np.int64)})
    out = run_passes(uu, "fuse-chains")
    assert ops(out) == ["Unsqueeze"]
    assert_same(uu, out, {"x": rand(2, 4, 8, 8)})


def test_chains_left_alone():
    # Narrowing intermediate: int32 -> float -> int32 loses integers above 2**24.
    cast = model([helper.make_node("Cast", ["x"], ["a"], to=TensorProto.FLOAT), helper.make_node("Cast", ["a"], ["y"], to=TensorProto.INT32)],
                 [("x", TensorProto.INT32, [3])], [("y", TensorProto.INT32, [3])])
    assert ops(run_passes(cast, "fuse-chains")) == ["Cast", "Cast"]
    # A 0 in the outer target copies a dim of the intermediate, not of x.
    r = model([helper.make_node("Reshape", ["x", "s1"], ["a"]), helper.make_node("Reshape", ["a", "s2"], ["y"])],
              X4, [("y", F, None)], {"s1": np.array([-1, 16], np.int64), "s2": np.array([0, -1], np.int64)})
    assert ops(run_passes(r, "fuse-chains")) == ["Reshape", "Reshape"]


# -- fuse-layernorm / fuse-gelu / upgrade-opset ----------------------------------------------


def _layernorm_nodes(square="Pow", axes_input=False):
    kw = {} if axes_input else {"axes": [-1]}
    ins = (lambda v: [v, "ax"]) if axes_input else (lambda v: [v])
    sq = (helper.make_node("Pow", ["d", "two"], ["sq"]) if square == "Pow" else helper.make_node("Mul", ["d", "d"], ["sq"]))
    return [
        helper.make_node("ReduceMean", ins("x"), ["mu"], **kw), helper.make_node("Sub", ["x", "mu"], ["d"]), sq,
        helper.make_node("ReduceMean", ins("sq"), ["var"], **kw), helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["sd"]), helper.make_node("Div", ["d", "sd"], ["n"]),
        helper.make_node("Mul", ["n", "gamma"], ["ng"]), helper.make_node("Add", ["ng", "beta"], ["y"]),
    ]


LN_INITS = {"two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32), "gamma": rand(16), "beta": rand(16), "ax": np.array([-1], np.int64)}


@pytest.mark.parametrize("opset,square,fuses", [(17, "Pow", True), (17, "Mul", True), (18, "Pow", True), (16, "Pow", False)])
def test_layernorm(opset, square, fuses):
    m = model(_layernorm_nodes(square, axes_input=opset >= 18), [("x", F, ["B", "S", 16])], [("y", F, None)], LN_INITS, opset=opset)
    out = run_passes(m, "fuse-layernorm")
    assert (ops(out) == ["LayerNormalization"]) == fuses
    assert out.graph.outputs[0].name == "y"
    assert_same(m, out, {"x": rand(2, 5, 16)})


@pytest.mark.parametrize("eps", [np.nan, np.inf, -1e-5])
def test_layernorm_with_an_invalid_epsilon_is_left_alone(eps):
    # LayerNormalization needs a finite epsilon >= 0 (ORT refuses to load it otherwise).
    m = model(_layernorm_nodes(), [("x", F, ["B", "S", 16])], [("y", F, None)], {**LN_INITS, "eps": np.array(eps, np.float32)})
    assert ops(run_passes(m, "fuse-layernorm")) == ops(m)


def _gelu_nodes(form):
    if form == "erf":
        return [helper.make_node("Div", ["x", "sqrt2"], ["a"]), helper.make_node("Erf", ["a"], ["e"]),
                helper.make_node("Add", ["e", "one"], ["b"]), helper.make_node("Mul", ["x", "half"], ["h"]),
                helper.make_node("Mul", ["h", "b"], ["y"])]
    return [helper.make_node("Pow", ["x", "three"], ["p"]), helper.make_node("Mul", ["p", "k"], ["q"]),
            helper.make_node("Add", ["x", "q"], ["r"]), helper.make_node("Mul", ["r", "c"], ["s"]),
            helper.make_node("Tanh", ["s"], ["t"]), helper.make_node("Add", ["t", "one"], ["b"]),
            helper.make_node("Mul", ["x", "b"], ["xb"]), helper.make_node("Mul", ["xb", "half"], ["y"])]


GELU_INITS = {"sqrt2": np.array(np.sqrt(2), np.float32), "one": np.array(1, np.float32), "half": np.array(0.5, np.float32),
              "three": np.array(3, np.float32), "k": np.array(0.044715, np.float32), "c": np.array(np.sqrt(2 / np.pi), np.float32)}


@pytest.mark.parametrize("form,opset,fuses", [("erf", 20, True), ("tanh", 20, True), ("erf", 19, False)])
def test_gelu(form, opset, fuses):
    m = model(_gelu_nodes(form), [("x", F, ["B", 16])], [("y", F, None)], GELU_INITS, opset=opset, ir_version=9)
    out = run_passes(m, "fuse-gelu")
    assert (ops(out) == ["Gelu"]) == fuses
    assert_same(m, out, {"x": rand(3, 16) * 3})


def test_target_opset_upgrades_then_fuses_layernorm(tmp_path):
    from onnxopt.cli import main
    from onnxopt.optimize import optimize

    m = model(_layernorm_nodes("Pow"), [("x", F, ["B", "S", 16])], [("y", F, ["B", "S", 16])], LN_INITS, opset=13)
    assert "LayerNormalization" not in ops(optimize(m).model)  # default preset keeps opset 13
    result = optimize(m, target_opset=17)
    assert result.model.opset_imports[""] == 17 and ops(result.model) == ["LayerNormalization"]
    assert not any(n.op_type == "Constant" for n in all_nodes(result.model))
    assert_same(m, result.model, {"x": rand(2, 5, 16)})
    path = tmp_path / "m.onnx"
    ir.save(m, path)
    # Downgrades are refused with one line, before anything is written.
    assert main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--target-opset", "12"]) == 2
    assert not (tmp_path / "o.onnx").exists()
    assert main(["optimize", str(path), "-o", str(tmp_path / "o.onnx"), "--target-opset", "17"]) == 0
    assert onnx.load(tmp_path / "o.onnx").opset_import[0].version == 17


# -- the real models through `default` ---------------------------------------------------------

# Lowest node count any peer (onnxsim, onnxslim, onnxscript) reaches on each model.
PEER_BEST = {"det": 326, "rec": 393, "cls": 179, "minilm": 365}


def _real_feeds(name):
    from onnxopt.testing import real_models as rm

    if name == "minilm":
        return rm.encode_sentences(rm.sentences("eval", 4), seq_len=32)
    img = rm.images("eval", 7)[-1][1]  # page.png: printed text
    pre = {"det": lambda i: rm.det_preprocess(i, 320), "rec": rm.rec_preprocess, "cls": rm.cls_preprocess}[name](img)
    return {"x": pre if pre.ndim == 4 else pre[None]}


@pytest.mark.parametrize("name", ["det", "rec", "cls", "minilm"])
def test_real_models_default_preset(name):
    from tests.conftest import real_model

    from onnxopt.model_io import load_model
    from onnxopt.optimize import optimize

    original = load_model(real_model(name))
    feeds = _real_feeds(name)
    result = optimize(original, inputs=feeds)
    assert result.rolled_back == {}
    assert result.nodes_after <= PEER_BEST[name], op_histogram(result.model)
    hist = op_histogram(result.model)
    assert "BatchNormalization" not in hist and "Constant" not in hist
    assert_same(original, result.model, feeds, rtol=1e-4, atol=1e-5)


# -- fuse-hardswish ----------------------------------------------------------------------------


@pytest.mark.parametrize("opset,fuses", [(14, True), (13, False)])
def test_hardswish(opset, fuses):
    inits = {"three": np.array(3, np.float32), "zero": np.array(0, np.float32), "six": np.array(6, np.float32), "s": rand(1)}
    nodes = [helper.make_node("Add", ["x", "three"], ["a"]), helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
             helper.make_node("Mul", ["x", "c"], ["m"]), helper.make_node("Div", ["m", "six"], ["h"]),
             helper.make_node("Mul", ["h", "s"], ["y"])]  # the scale after it must not hide the pattern
    m = model(nodes, X4, [("y", F, None)], inits, opset=opset)
    out = run_passes(m, "fuse-hardswish", "fuse-scale")
    assert ops(out) == (["HardSwish", "Mul"] if fuses else ["Add", "Clip", "Mul", "Mul"])
    assert_same(m, out, {"x": rand(1, 4, 8, 8) * 4})


def test_initializer_listed_as_input_is_not_a_constant():
    # IR < 4 models list initializers as graph inputs: a caller may feed another value, so
    # the BN parameters are not constants and nothing is fused.
    inits = {"W": rand(6, 4, 1, 1), **bn_inits(6)}
    m = model([helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y")],
              X4 + [(k, F, list(v.shape)) for k, v in inits.items()], [("y", F, ["N", 6, 8, 8])], inits, ir_version=3, opset=7)
    assert ops(run_passes(m, "fuse-batchnorm")) == ["Conv", "BatchNormalization"]


def test_scale_keeps_the_gelu_pattern_for_onnxruntime():
    # Below opset 20 there is no Gelu op, but ORT fuses the decomposed form itself; folding
    # the trailing 0.5 into the next MatMul would hide it (measured slower on MiniLM).
    nodes = [helper.make_node("Div", ["x", "sqrt2"], ["a"]), helper.make_node("Erf", ["a"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["b"]), helper.make_node("Mul", ["x", "b"], ["xb"]),
             helper.make_node("Mul", ["xb", "half"], ["g"]), helper.make_node("MatMul", ["g", "W"], ["y"])]
    m = model(nodes, [("x", F, ["B", 16])], [("y", F, None)], {**GELU_INITS, "W": rand(16, 4)}, opset=17)
    out = run_passes(m, "fuse-scale")
    assert op_histogram(out) == op_histogram(m)
    assert_same(m, out, {"x": rand(3, 16)})


def test_batchnorm_inside_a_local_function():
    # Functions have no initializers: the weights are Constant nodes and stay Constant nodes.
    w, p = rand(4, 4, 1, 1), bn_inits(4)
    consts = [helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k)) for k, v in {"W": w, **p}.items()]
    fn = helper.make_function("local", "ConvBn", ["x"], ["y"],
                              consts + [helper.make_node("Conv", ["x", "W"], ["c"]), bn_node("c", "y")],
                              [helper.make_opsetid("", 17)])
    g = helper.make_graph([helper.make_node("ConvBn", ["x"], ["y"], domain="local")], "g",
                          [helper.make_tensor_value_info("x", F, ["N", 4, 8, 8])], [helper.make_tensor_value_info("y", F, ["N", 4, 8, 8])])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)], functions=[fn])
    proto.ir_version = 8
    m = ir.serde.deserialize_model(proto)
    out = run_passes(m, "fuse-batchnorm")
    fn_ops = [n.op_type for n in next(iter(out.functions.values()))]
    assert "BatchNormalization" not in fn_ops and fn_ops.count("Conv") == 1
    assert_same(m, out, {"x": rand(1, 4, 8, 8)})


# -- seeded random chains: the fusions against ORT on graphs nobody wrote by hand -----------


def _random_chain(seed: int):
    """x[2,C,6,6] through 3-6 random ops (Conv/ConvTranspose/BN/Mul/Add/Sub/Div/Pad/Transpose pairs/Relu)."""
    rng = np.random.default_rng(seed)
    c, hw = 4, 6
    nodes, inits, extra_outputs = [], {}, []
    cur = "x"

    def const(name, shape):
        inits[name] = (rng.standard_normal(shape) * 0.5 + (1.0 if rng.random() < 0.5 else 0.0)).astype(np.float32)
        return name

    for i in range(int(rng.integers(3, 7))):
        out = f"t{i}"
        kind = rng.choice(["conv", "convT", "bn", "mul", "add", "sub", "div", "pad", "transpose", "relu"])
        if kind == "conv":
            c_out = int(rng.choice([c, 6]))
            group = c if (c_out == c and rng.random() < 0.4) else 1
            ins = [cur, const(f"w{i}", (c_out, c // group, 3, 3))] + ([const(f"b{i}", (c_out,))] if rng.random() < 0.5 else [])
            nodes.append(helper.make_node("Conv", ins, [out], group=group, pads=[1, 1, 1, 1] if rng.random() < 0.7 else [0, 0, 0, 0]))
            if nodes[-1].attribute[-1].ints[0] == 0:
                hw -= 2
            c = c_out
        elif kind == "convT":
            nodes.append(helper.make_node("ConvTranspose", [cur, const(f"w{i}", (c, 3, 1, 1))], [out]))
            c = 3
        elif kind == "bn":
            s, b, m = (const(f"{k}{i}", (c,)) for k in "sbm")
            inits[f"v{i}"] = (np.abs(rng.standard_normal(c)) + 0.5).astype(np.float32)
            nodes.append(helper.make_node("BatchNormalization", [cur, s, b, m, f"v{i}"], [out]))
        elif kind in ("mul", "add", "sub", "div"):
            shape = [(), (1,), (1, c, 1, 1), (c, 1, 1), (1, 1, 1, hw), (1, c, hw, hw)][int(rng.integers(6))]
            k = const(f"k{i}", shape)
            if kind == "div":
                inits[k] = np.abs(inits[k]) + 0.5
            op = {"mul": "Mul", "add": "Add", "sub": "Sub", "div": "Div"}[kind]
            nodes.append(helper.make_node(op, [k, cur] if kind in ("mul", "add") and rng.random() < 0.5 else [cur, k], [out]))
        elif kind == "pad":
            inits[f"p{i}"] = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)
            nodes.append(helper.make_node("Pad", [cur, f"p{i}"], [out], mode="constant" if rng.random() < 0.7 else "reflect"))
            hw += 2
        elif kind == "transpose":
            nodes.append(helper.make_node("Transpose", [cur], [f"{out}a"], perm=[0, 2, 3, 1]))
            nodes.append(helper.make_node("Transpose", [f"{out}a"], [out], perm=[0, 3, 1, 2]))
        else:
            nodes.append(helper.make_node("Relu", [cur], [out]))
        if rng.random() < 0.15:
            extra_outputs.append(out)  # an intermediate the caller also reads
        cur = out
    outputs = [(cur, F, None)] + [(o, F, None) for o in extra_outputs if o != cur]
    return model(nodes, [("x", F, [2, 4, 6, 6])], outputs, inits, opset=13)


@pytest.mark.parametrize("seed", range(30))
def test_random_chains_through_default(seed):
    from onnxopt.optimize import optimize

    m = _random_chain(seed)
    result = optimize(m, verify="off")
    assert [v.name for v in result.model.graph.outputs] == [v.name for v in m.graph.outputs]
    assert_same(m, result.model, {"x": rand(2, 4, 6, 6)}, rtol=1e-4, atol=1e-4)


def test_batchnorm_inside_loop_body_with_outer_weights():
    # The body reads W and the BN parameters from the outer graph's initializers.
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Conv", ["h", "W"], ["c"]), bn_node("c", "h_out")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h", F, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("h_out", F, ["N", 4, 8, 8])],
    )
    m = model([helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)], [*X4, ("n", TensorProto.INT64, [])],
              [("y", F, ["N", 4, 8, 8])], {"W": rand(4, 4, 1, 1) * 0.5, **bn_inits(4)})
    out = run_passes(m, "fuse-batchnorm")
    assert "BatchNormalization" not in ops(out)
    assert_same(m, out, {"x": rand(1, 4, 8, 8), "n": np.array(3, np.int64)}, rtol=1e-4)


def test_real_minilm_opset14_gets_layernorm_and_gelu_with_target_opset():
    # torch's opset-14 export writes LayerNorm out as ReduceMean/Sub/Pow/...: converting to
    # opset 20 first lets all 13 LayerNorms and 6 GELUs fuse into single standard ops.
    from onnxopt.model_io import load_model
    from onnxopt.optimize import optimize
    from onnxopt.testing import real_models as rm

    try:
        original = load_model(rm.minilm_model(opset=14))
    except rm.RealModelUnavailable as e:
        pytest.skip(str(e))
    feeds = rm.encode_sentences(rm.sentences("eval", 4), seq_len=32)
    result = optimize(original, inputs=feeds, target_opset=20)
    hist = op_histogram(result.model)
    assert result.rolled_back == {} and result.model.opset_imports[""] == 20
    assert hist.get("LayerNormalization") == 13 and hist.get("Gelu") == 6
    assert "ReduceMean" not in hist and "Erf" not in hist
    assert_same(original, result.model, feeds, rtol=1e-4, atol=1e-5)


# -- sink-nan-guard ---------------------------------------------------------------------


def _attention(guard_value=0.0, axis=-1, extra_reader=False):
    """Softmax(S + Where(mask, 0, -inf)) -> Where(IsNaN(P), guard, P) -> MatMul(., V), as torch exports SDPA."""
    nodes = [
        helper.make_node("Where", ["mask", "zero", "ninf"], ["m"]),
        helper.make_node("Add", ["s", "m"], ["sm"]),
        helper.make_node("Softmax", ["sm"], ["p"], axis=axis),
        helper.make_node("IsNaN", ["p"], ["nan"]),
        helper.make_node("Where", ["nan", "guard", "p"], ["g"]),
        helper.make_node("MatMul", ["g", "v"], ["y"]),
    ]
    outputs = [("y", F, None)]
    if extra_reader:
        nodes.append(helper.make_node("Neg", ["g"], ["z"]))
        outputs.append(("z", F, None))
    inits = {"zero": np.zeros(1, np.float32), "ninf": np.full(1, -np.inf, np.float32),
             "guard": np.full(1, guard_value, np.float32)}
    inputs = [("s", F, ["B", 2, "S", "S"]), ("mask", TensorProto.BOOL, ["B", 1, "S", "S"]), ("v", F, ["B", 2, "S", 4])]
    return model(nodes, inputs, outputs, inits, opset=17)


def _attention_feeds():
    mask = RNG.random((2, 1, 6, 6)) > 0.3
    mask[0, :, 2, :] = False  # a fully masked query row: the softmax row is NaN
    mask[1] = False  # a fully masked sample
    return {"s": rand(2, 2, 6, 6) * 3, "mask": mask, "v": rand(2, 2, 6, 4)}


def test_nan_guard_moves_past_the_attention_matmul():
    m = _attention()
    out = run_passes(m, "sink-nan-guard")
    assert ops(out)[-3:] == ["MatMul", "IsNaN", "Where"]
    assert ops(out).count("IsNaN") == 1 and [o.name for o in out.graph.outputs] == ["y"]
    feeds = _attention_feeds()
    ref = run_model(m, feeds)["y"]
    assert np.isnan(ref).sum() == 0 and np.all(ref[1] == 0)  # the guard's job, kept
    assert_same(m, out, feeds, rtol=0, atol=0)


@pytest.mark.parametrize("kw", [{"guard_value": 1.0}, {"axis": 2}, {"extra_reader": True}])
def test_nan_guard_left_alone(kw):
    # A non-zero fill is not 0 @ V; a softmax over another axis makes NaN columns, not rows;
    # another reader of the guarded tensor still needs it.
    m = _attention(**kw)
    out = run_passes(m, "sink-nan-guard")
    assert ops(out) == ops(m)


def _real_minilm_and_copy() -> tuple[ir.Model, ir.Model]:
    """The real MiniLM export and a copy to rewrite (skips when the model is unavailable)."""
    from onnxopt.model_io import load_model

    try:
        original = load_model(rm.minilm_model())
    except rm.RealModelUnavailable as e:
        pytest.skip(str(e))
    return original, ir.serde.deserialize_model(ir.serde.serialize_model(original))


def test_real_minilm_nan_guards_sink_and_outputs_stay_bitwise_equal():
    original, out = _real_minilm_and_copy()
    sink = get_pass("sink-nan-guard").factory()
    sink(out)
    assert sink.rewrites == 6  # one per layer
    feeds = rm.encode_sentences(rm.sentences("eval", 3), seq_len=24)
    feeds["attention_mask"][2] = 0  # a fully masked sentence: every row NaN before the guard
    ref, new = run_model(original, feeds), run_model(out, feeds)
    for k in ref:
        np.testing.assert_array_equal(new[k], ref[k])


# -- finite-attention-mask --------------------------------------------------------------


def test_finite_mask_replaces_the_sunk_guards_and_keeps_fully_masked_rows_zero():
    m = _attention()
    out = run_passes(m, "sink-nan-guard", "finite-attention-mask")
    assert "IsNaN" not in ops(out) and ops(out).count("Where") == 1 and ops(out)[-1] == "Mul"
    finite = next(n for n in out.graph if n.op_type == "Where")
    assert np.isfinite(finite.inputs[2].const_value.numpy()).all()
    feeds = _attention_feeds()
    ref, new = run_model(m, feeds)["y"], run_model(out, feeds)["y"]
    assert np.all(new[1] == 0) and np.all(new[0, :, 2] == 0)  # fully masked: zeros, as the guard gave
    np.testing.assert_allclose(new, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw", [{"guard_value": 1.0}, {"extra_reader": True}])
def test_finite_mask_left_alone_without_a_sunk_zero_guard(kw):
    m = run_passes(_attention(**kw), "sink-nan-guard")
    out = run_passes(m, "finite-attention-mask")
    assert ops(out) == ops(m)


def test_real_minilm_finite_mask_matches_the_original_with_masked_sentences():
    original, out = _real_minilm_and_copy()
    for name in ("sink-nan-guard", "finite-attention-mask"):
        p = get_pass(name).factory()
        p(out)
        assert p.rewrites == 6
    assert "IsNaN" not in op_histogram(out)
    feeds = rm.encode_sentences(rm.sentences("eval", 3), seq_len=24)
    feeds["attention_mask"][2] = 0
    ref, new = run_model(original, feeds), run_model(out, feeds)
    for k in ref:
        np.testing.assert_allclose(new[k], ref[k], rtol=1e-5, atol=1e-5)


# -- fold-residual-bias -----------------------------------------------------------------


def _post_ln_block(variant=""):
    """L = LN(x); q = L @ Wq + bq; y = LN2((h @ Wo + bo) + L): a post-LN block's end."""
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g1", "be1"], ["L"], axis=-1, epsilon=1e-5),
        helper.make_node("MatMul", ["L", "wq"], ["lq"]),
        helper.make_node("Add", ["lq", "bq"], ["q"]),
        helper.make_node("MatMul", ["h", "wo"], ["ho"]),
        helper.make_node("Add", ["bo", "ho"], ["hb"]),
        helper.make_node("Add", ["hb", "L"], ["r"]),
        helper.make_node("LayerNormalization", ["r", "g2", "be2"], ["y"], axis=-1, epsilon=1e-5),
    ]
    outputs = [("q", F, None), ("y", F, None)]
    if variant == "L_is_output":
        outputs.append(("L", F, None))
    if variant == "relu_reader":
        nodes.append(helper.make_node("Relu", ["L"], ["z"]))
        outputs.append(("z", F, None))
    if variant == "shared_bias":
        nodes.append(helper.make_node("Add", ["q", "bo2"], ["q2"]))
        outputs.append(("q2", F, None))
        # b itself is read elsewhere too (ALBERT-style sharing): it must stay as it is there
        nodes.append(helper.make_node("Add", ["h8", "bo"], ["h8b"]))
        outputs.append(("h8b", F, ["B", "S", 8]))
    inits = {"g1": rand(8, positive=True), "be1": rand(8), "wq": rand(8, 5), "bq": rand(5), "wo": rand(6, 8),
             "bo": rand(8), "g2": rand(8, positive=True), "be2": rand(8)}
    if variant == "shared_bias":
        inits["bo2"] = inits["bq"]
        next(n for n in nodes if n.output[0] == "q2").input[1] = "bq"  # the Q bias is read by another Add
    inputs = [("x", F, ["B", "S", 8]), ("h", F, ["B", "S", 6])]
    if variant == "shared_bias":
        inputs.append(("h8", F, ["B", "S", 8]))
    return model(nodes, inputs, outputs, inits, opset=17)


def test_residual_bias_folds_into_the_layernorm_and_its_readers_compensate():
    m = _post_ln_block()
    out = run_passes(m, "fold-residual-bias")
    assert ops(out).count("Add") == ops(m).count("Add") - 1
    ln = next(n for n in out.graph if n.op_type == "LayerNormalization" and n.outputs[0].name == "L")
    assert ln.inputs[2].name != "be1"  # a new beta, the bias folded in
    assert_same(m, out, {"x": rand(2, 3, 8) * 2, "h": rand(2, 3, 6)}, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["L_is_output", "relu_reader"])
def test_residual_bias_left_alone(variant):
    # L itself is an output, or read by something that would see L + b.
    m = _post_ln_block(variant)
    assert ops(run_passes(m, "fold-residual-bias")) == ops(m)


def test_residual_bias_fold_copies_shared_biases():
    m = _post_ln_block("shared_bias")
    out = run_passes(m, "fold-residual-bias")
    assert ops(out).count("Add") == ops(m).count("Add") - 1
    assert_same(m, out, {"x": rand(2, 3, 8), "h": rand(2, 3, 6), "h8": rand(2, 3, 8)}, rtol=1e-4, atol=1e-5)


def test_real_minilm_residual_biases_fold():
    original, out = _real_minilm_and_copy()
    for name in ("fold-residual-bias", "remove-unused"):
        p = get_pass(name).factory()
        p(out)
        if name == "fold-residual-bias":
            assert p.rewrites == 12  # attention output and FFN output, in 6 layers
    feeds = rm.encode_sentences(rm.sentences("eval", 3), seq_len=24)
    assert_same(original, out, feeds, rtol=1e-4, atol=2e-5)


# -- drop-key-bias ----------------------------------------------------------------------


def _scores_model(k_perm=(0, 2, 3, 1), softmax_axis=-1, key_side=1, extra_reader=False):
    """q/k projections with biases, heads split [B, S, 2, 4], scores, mask Add, Softmax."""
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q0"]), helper.make_node("Add", ["q0", "bq"], ["q1"]),
        helper.make_node("Reshape", ["q1", "heads"], ["q2"]), helper.make_node("Transpose", ["q2"], ["q"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["x", "wk"], ["k0"]), helper.make_node("Add", ["bk", "k0"], ["k1"]),
        helper.make_node("Reshape", ["k1", "heads"], ["k2"]), helper.make_node("Transpose", ["k2"], ["k3"], perm=list(k_perm)),
        helper.make_node("Mul", ["k3", "c"], ["k"]),
        helper.make_node("MatMul", ["q", "k"] if key_side == 1 else ["k", "q"], ["s"]),
        helper.make_node("Div", ["s", "c"], ["s1"]),
        helper.make_node("Add", ["s1", "mask"], ["s2"]),
        helper.make_node("Softmax", ["s2"], ["p"], axis=softmax_axis),
    ]
    outputs = [("p", F, None)]
    if extra_reader:
        outputs.append(("s", F, None))
    inits = {"wq": rand(8, 8), "bq": rand(8), "wk": rand(8, 8), "bk": rand(8) * 3, "c": np.array(0.7, np.float32),
             "heads": np.array([0, 0, 2, -1], np.int64)}
    inputs = [("x", F, ["B", "S", 8]), ("mask", F, ["B", 1, "S", "S"])]
    return model(nodes, inputs, outputs, inits, opset=17)


def _scores_feeds():
    mask = np.where(RNG.random((2, 1, 5, 5)) > 0.3, 0.0, -np.inf).astype(np.float32)
    mask[1] = -np.inf  # a fully masked sample: NaN rows before and after
    return {"x": rand(2, 5, 8), "mask": mask}


def test_key_bias_is_dropped_and_the_softmax_does_not_change():
    m = _scores_model()
    out = run_passes(m, "drop-key-bias")
    assert ops(out).count("Add") == ops(m).count("Add") - 1
    assert "bk" not in {v.name for n in out.graph for v in n.inputs if v is not None}
    assert "bq" in {v.name for n in out.graph for v in n.inputs if v is not None}  # the query bias matters
    feeds = _scores_feeds()
    ref, new = run_model(m, feeds)["p"], run_model(out, feeds)["p"]
    np.testing.assert_array_equal(np.isnan(ref), np.isnan(new))
    np.testing.assert_allclose(new[0], ref[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [{"k_perm": (0, 2, 1, 3)}, {"softmax_axis": 2}, {"key_side": 0}, {"extra_reader": True}])
def test_key_bias_left_alone(kw):
    # K not transposed to [.., d, tokens] (perm 0,2,1,3 with K first is a different product),
    # a softmax over the query axis, the biased tensor as the left operand, or the raw scores
    # read elsewhere: the bias is not a per-row constant of what the softmax sees.
    m = _scores_model(**kw)
    assert ops(run_passes(m, "drop-key-bias")) == ops(m)


def test_real_minilm_key_biases_dropped():
    original, out = _real_minilm_and_copy()
    for name in ("lift-constants", "fold-constants", "remove-unused"):  # the head Reshapes get constant targets
        get_pass(name).factory()(out)
    p = get_pass("drop-key-bias").factory()
    p(out)
    assert p.rewrites == 6
    feeds = rm.encode_sentences(rm.sentences("eval", 3), seq_len=24)
    feeds["attention_mask"][2] = 0
    assert_same(original, out, feeds, rtol=1e-4, atol=2e-5)
