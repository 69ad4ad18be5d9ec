"""Cleanup passes: fold-constants, remove-noops, fold-if.

Each pass gets a small hand-built graph where it must fire (the node kinds go away and
ONNX Runtime gives the same outputs as on the original) and one where it must not, a
subgraph case, dynamic dims that must stay dynamic (checked by running at two sizes),
and the real models through the whole default preset.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.graph import count_nodes, op_histogram
from onnxopt.optimize import optimize
from onnxopt.passes.constant_folding import fold_constants
from onnxopt.passes.manager import PassManager
from onnxopt.passes.noop_elimination import remove_noops
from onnxopt.verify import compare_outputs, run_model
from tests.conftest import real_model

F = TensorProto.FLOAT
I64 = TensorProto.INT64


def _model(nodes, inputs, outputs, inits=(), opset=17, functions=()) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], functions=list(functions))
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return ir.serde.deserialize_model(proto)


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(op_histogram(model))


def _feeds(model: ir.Model, **shapes) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for v in model.graph.inputs:
        shape = shapes[v.name]
        if v.dtype == ir.DataType.FLOAT:
            feeds[v.name] = rng.standard_normal(shape).astype(np.float32)
        elif v.dtype == ir.DataType.BOOL:
            feeds[v.name] = np.ones(shape, dtype=bool)
        else:
            feeds[v.name] = rng.integers(0, 5, shape).astype(np.int64)
    return feeds


def _same_outputs(before: ir.Model, after: ir.Model, *feeds_list) -> None:
    onnx.checker.check_model(ir.serde.serialize_model(after), full_check=True)
    for feeds in feeds_list:
        ref, new = run_model(before, feeds), run_model(after, feeds)
        assert list(ref) == list(new), "graph output names changed"
        for d in compare_outputs(ref, new, rtol=1e-5, atol=1e-6):
            assert d.within, d


def _run(fn, model: ir.Model) -> tuple[ir.Model, int]:
    """Run a pass function on a copy, then drop what it left unused (as the pipeline does)."""
    after = _copy(model)
    n = fn(after)
    ir.passes.common.RemoveUnusedNodesPass()(after)
    return after, n


# ------------------------------------------------------------------ fold-constants


def test_fold_constant_chain_into_initializer():
    # w = ConstantOfShape([4], 2.0) * 3 + 1  ->  one initializer; y = x * w
    nodes = [
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([4], np.int64))),
        helper.make_node("ConstantOfShape", ["shape"], ["c"], value=numpy_helper.from_array(np.array([2.0], np.float32))),
        helper.make_node("Mul", ["c", "three"], ["c3"]),
        helper.make_node("Add", ["c3", "one"], ["w"]),
        helper.make_node("Mul", ["x", "w"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(3.0, np.float32), "three"), numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 4])], [helper.make_tensor_value_info("y", F, ["N", 4])], inits)
    after, n = _run(fold_constants, model)
    assert n == 3
    assert _ops(after) == {"Constant": 1, "Mul": 1} or _ops(after) == {"Mul": 1}
    (mul,) = [node for node in after.graph if node.op_type == "Mul"]
    np.testing.assert_array_equal(mul.inputs[1].const_value.numpy(), np.full(4, 7.0, np.float32))
    _same_outputs(model, after, _feeds(model, x=(2, 4)))


def _reshape_by_static_dim_model():
    # y = Reshape(x, Concat([-1], Unsqueeze(Gather(Shape(x), 2)))): x is [N, 3, 8], N dynamic.
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "two"], ["d"], axis=0),
        helper.make_node("Unsqueeze", ["d", "zero"], ["d1"]),
        helper.make_node("Concat", ["minus_one", "d1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(2, np.int64), "two"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 3, 8])], [helper.make_tensor_value_info("y", F, ["M", 8])], inits)


def test_fold_shape_of_static_dim_while_batch_stays_dynamic():
    model = _reshape_by_static_dim_model()
    after, _ = _run(fold_constants, model)
    assert _ops(after) == {"Reshape": 1}
    (reshape,) = list(after.graph)
    assert reshape.inputs[1].const_value.numpy().tolist() == [-1, 8]
    assert [str(d) for d in after.graph.inputs[0].shape] == ["N", "3", "8"]
    _same_outputs(model, after, _feeds(model, x=(1, 3, 8)), _feeds(model, x=(5, 3, 8)))


def test_fold_does_not_cross_dynamic_dim():
    # y = x * float(Shape(x)[1]): dim 1 is dynamic, so the Shape must stay.
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["d"], axis=0),
        helper.make_node("Cast", ["d"], ["df"], to=F),
        helper.make_node("Mul", ["x", "df"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(1, np.int64), "one")]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [2, "S"])], [helper.make_tensor_value_info("y", F, [2, "S"])], inits)
    after, n = _run(fold_constants, model)
    assert n == 0
    assert _ops(after) == {"Shape": 1, "Gather": 1, "Cast": 1, "Mul": 1}
    _same_outputs(model, after, _feeds(model, x=(2, 3)), _feeds(model, x=(2, 7)))


def test_reshape_target_copies_dynamic_dim_of_its_own_input():
    # Reshape(x, Concat(Shape(x)[0:1], [200])) with x [N, 200, 1, 1] -> Reshape(x, [0, 200])
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Cast", ["s"], ["s32"], to=TensorProto.INT32),
        helper.make_node("Slice", ["s32", "zero", "one"], ["n32"]),
        helper.make_node("Cast", ["n32"], ["n"], to=I64),
        helper.make_node("Concat", ["n", "c200"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([200], np.int64), "c200"),
    ]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 200, 1, 1])], [helper.make_tensor_value_info("y", F, ["N", 200])], inits)
    after, _ = _run(fold_constants, model)
    assert _ops(after) == {"Reshape": 1}
    assert list(after.graph)[0].inputs[1].const_value.numpy().tolist() == [0, 200]
    _same_outputs(model, after, _feeds(model, x=(1, 200, 1, 1)), _feeds(model, x=(3, 200, 1, 1)))


def _target_of(model: ir.Model) -> list[int] | None:
    (reshape,) = [n for n in model.graph if n.op_type == "Reshape"]
    t = reshape.inputs[1].const_value
    return None if t is None else t.numpy().tolist()


def _dims_of_x():
    return [helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
            helper.make_node("Gather", ["s", "i1"], ["t"], axis=0),
            helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
            helper.make_node("Unsqueeze", ["t", "ax0"], ["t1"])]


_DIM_INITS = [numpy_helper.from_array(np.array(0, np.int64), "i0"), numpy_helper.from_array(np.array(1, np.int64), "i1"),
              numpy_helper.from_array(np.array([0], np.int64), "ax0"), numpy_helper.from_array(np.array(0, np.int64), "zero"),
              numpy_helper.from_array(np.array(1, np.int64), "one"), numpy_helper.from_array(np.array([-1], np.int64), "m1")]


def test_range_of_a_dim_has_that_length_so_reshape_targets_fold():
    # y = x + Range(0, S, 1): shape inference says [N, ?]; the hint [N, S] lets
    # Reshape(y, [N, S, -1]) become Reshape(y, [0, 0, -1]) and the Shape arithmetic go.
    nodes = [*_dims_of_x(),
             helper.make_node("Range", ["zero", "t", "one"], ["r"]),
             helper.make_node("Cast", ["r"], ["rf"], to=F),
             helper.make_node("Add", ["x", "rf"], ["y"]),
             helper.make_node("Concat", ["n1", "t1", "m1"], ["target"], axis=0),
             helper.make_node("Reshape", ["y", "target"], ["z"])]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, ["N", "S"])], [helper.make_tensor_value_info("z", F, [None, None, None])],
                   _DIM_INITS)
    after, _ = _run(fold_constants, model)
    assert _target_of(after) == [0, 0, -1]
    assert "Concat" not in _ops(after) and _ops(after)["Gather"] == 1  # only the Range's limit is left
    _same_outputs(model, after, _feeds(model, x=(2, 5)), _feeds(model, x=(1, 1)))


def _position_embedding_model(table_rows: int, start: int) -> ir.Model:
    """x[N, S, 4] + table[positions[:, start:S]], then Reshape(., [N, S, -1]) from Shape(x)."""
    nodes = [*_dims_of_x(),
             helper.make_node("Slice", ["positions", "start", "t1", "i1d"], ["ids"]),
             helper.make_node("Gather", ["table", "ids"], ["pe"], axis=0),
             helper.make_node("Add", ["x", "pe"], ["y"]),
             helper.make_node("Concat", ["n1", "t1", "m1"], ["target"], axis=0),
             helper.make_node("Reshape", ["y", "target"], ["z"])]
    rng = np.random.default_rng(0)
    inits = [*_DIM_INITS, numpy_helper.from_array(np.arange(table_rows, dtype=np.int64)[None], "positions"),
             numpy_helper.from_array(rng.standard_normal((table_rows, 4)).astype(np.float32), "table"),
             numpy_helper.from_array(np.array([1], np.int64), "i1d"),
             numpy_helper.from_array(np.array([start], np.int64), "start")]
    return _model(nodes, [helper.make_tensor_value_info("x", F, ["N", "S", 4])],
                  [helper.make_tensor_value_info("z", F, [None, None, None])], inits)


@pytest.mark.parametrize("table_rows", [16, 1])
def test_position_slice_broadcast_keeps_the_sequence_dim(table_rows):
    # The transformer position-embedding pattern: ids = positions[:, :S] is [1, min(S, rows)];
    # x + table[ids] is then [N, S, 4] on every run that succeeds (also when rows == 1).
    model = _position_embedding_model(table_rows, start=0)
    after, _ = _run(fold_constants, model)
    assert _target_of(after) == [0, 0, -1]
    sizes = [(2, min(5, table_rows), 4), (1, 1, 4), (3, table_rows, 4)]
    _same_outputs(model, after, *[_feeds(model, x=s) for s in sizes])


def test_slice_that_does_not_start_at_zero_gives_no_hint():
    # positions[:, 1:S] is [1, min(S, 16) - 1]: not S, so x + table[ids] must stay unknown.
    after, _ = _run(fold_constants, _position_embedding_model(16, start=1))
    assert _target_of(after) is None


def test_real_minilm_head_reshapes_become_static():
    # The hidden states' [batch, sequence] were lost at the position-embedding Add and the
    # boolean mask's Expand; with the hints every per-layer head Reshape gets a constant
    # target and the Shape/Gather/Unsqueeze/Concat arithmetic feeding it goes.
    from onnxopt.model_io import load_model
    from onnxopt.testing import real_models as rm

    try:
        original = load_model(rm.minilm_model())
    except rm.RealModelUnavailable as e:
        pytest.skip(str(e))
    before = _ops(original)
    # Folding and cleanup only (no arithmetic rewrites): the outputs stay bitwise equal.
    cleanup = ["lift-constants", "fold-constants", "remove-noops", "cse", "remove-unused"]
    folded = optimize(original, passes=cleanup, verify="off").model
    after = _ops(folded)
    assert before["Shape"] >= 20 and after["Shape"] <= 4 and after.get("Concat", 0) == 0 and "Expand" not in after
    feeds = rm.encode_sentences(rm.sentences("eval", 3), seq_len=24)
    feeds["attention_mask"][1] = 0
    one = {k: v[:1, :7] for k, v in feeds.items()}
    for f in (feeds, one):
        ref, new = run_model(original, f), run_model(folded, f)
        for k in ref:
            np.testing.assert_array_equal(new[k], ref[k])
    result = optimize(original, inputs=rm.encode_sentences(rm.sentences("eval", 2), seq_len=16))
    assert result.rolled_back == {} and _ops(result.model)["Shape"] <= 4


def test_fold_refuses_large_outputs_but_folds_weight_transforms():
    big = (2048, 1024)  # 2 Mi elements
    w = numpy_helper.from_array(np.arange(np.prod(big), dtype=np.float32).reshape(big) % 7, "w")
    nodes = [
        # A small shape expanding into 2 Mi elements must stay a ConstantOfShape.
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"], value=numpy_helper.from_array(np.array([1.0], np.float32))),
        helper.make_node("Add", ["x", "zeros"], ["y"]),
        # A transpose of a weight only it reads replaces that weight: folded whatever its size.
        helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        helper.make_node("MatMul", ["z", "wt"], ["u"]),
    ]
    inits = [numpy_helper.from_array(np.array(big, np.int64), "shape"), w]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F, big), helper.make_tensor_value_info("z", F, [1, 1024])],
        [helper.make_tensor_value_info("y", F, big), helper.make_tensor_value_info("u", F, [1, 2048])],
        inits,
    )
    after, n = _run(fold_constants, model)
    assert n == 1
    assert _ops(after) == {"ConstantOfShape": 1, "Add": 1, "MatMul": 1}
    _same_outputs(model, after, _feeds(model, x=big, z=(1, 1024)))


def test_fold_keeps_constant_graph_output_by_name_and_skips_random_custom_and_dq():
    nodes = [
        helper.make_node("Add", ["a", "b"], ["const_out"]),
        helper.make_node("RandomNormal", [], ["r"], shape=[2], seed=1.0),
        helper.make_node("Mul", ["r", "zero"], ["r0"]),
        helper.make_node("Add", ["x", "r0"], ["y"]),
        helper.make_node("DequantizeLinear", ["q", "scale"], ["dq"]),
        helper.make_node("Add", ["y", "dq"], ["y2"]),
        helper.make_node("Custom", ["a"], ["c"], domain="my.domain"),
    ]
    inits = [
        numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "a"),
        numpy_helper.from_array(np.array([3.0, 4.0], np.float32), "b"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array([3, 4], np.int8), "q"),
        numpy_helper.from_array(np.array(0.5, np.float32), "scale"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", F, [2])],
        [helper.make_tensor_value_info("const_out", F, [2]), helper.make_tensor_value_info("y2", F, [2]), helper.make_tensor_value_info("c", F, None)],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)])
    model = ir.serde.deserialize_model(proto)
    after, n = _run(fold_constants, model)
    assert n == 1
    assert [o.name for o in after.graph.outputs] == ["const_out", "y2", "c"]
    ops = _ops(after)
    assert ops["RandomNormal"] == 1 and ops["DequantizeLinear"] == 1 and ops["my.domain::Custom"] == 1
    (const,) = [node for node in after.graph if node.outputs[0].name == "const_out"]
    assert const.op_type == "Constant"
    np.testing.assert_array_equal(const.attributes["value"].value.numpy(), [4.0, 6.0])


def _if_model(then_nodes, then_out, else_nodes, else_out, cond_input=True, extra_inits=()):
    then_g = helper.make_graph(then_nodes, "then", [], [helper.make_tensor_value_info(then_out, F, ["N", 2])])
    else_g = helper.make_graph(else_nodes, "else", [], [helper.make_tensor_value_info(else_out, F, ["N", 2])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    inputs = [helper.make_tensor_value_info("x", F, ["N", 2])]
    inits = list(extra_inits)
    if cond_input:
        inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    return _model(nodes, inputs, [helper.make_tensor_value_info("y", F, ["N", 2])], inits)


def test_fold_inside_if_branches_with_outer_scope_constants():
    inits = [numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "a")]
    model = _if_model(
        [helper.make_node("Mul", ["a", "a"], ["a2"]), helper.make_node("Add", ["x", "a2"], ["t"])],
        "t",
        [helper.make_node("Neg", ["a"], ["na"]), helper.make_node("Sub", ["x", "na"], ["e"])],
        "e",
        extra_inits=inits,
    )
    after, n = _run(fold_constants, model)
    assert n == 2
    assert _ops(after) == {"If": 1, "Add": 1, "Sub": 1}
    feeds = _feeds(model, x=(3, 2), cond=())
    _same_outputs(model, after, {**feeds, "cond": np.array(True)}, {**feeds, "cond": np.array(False)})


# ------------------------------------------------------------------ remove-noops


def test_remove_noops_fires_on_each_kind():
    x_shape = ["N", 4, 6]
    nodes = [
        helper.make_node("Dropout", ["x", "ratio"], ["a"]),
        helper.make_node("Cast", ["a"], ["b"], to=F),
        helper.make_node("Reshape", ["b", "same_shape"], ["c"]),
        helper.make_node("Transpose", ["c"], ["d"], perm=[0, 1, 2]),
        helper.make_node("Pad", ["d", "zero_pads"], ["e"]),
        helper.make_node("Expand", ["e", "ones3"], ["f"]),
        helper.make_node("Slice", ["f", "s_start", "s_end", "s_axes"], ["g"]),
        helper.make_node("Concat", ["g"], ["h"], axis=1),
        helper.make_node("Mul", ["h", "one"], ["i"]),
        helper.make_node("Add", ["zero_f", "i"], ["j"]),
        helper.make_node("Sub", ["j", "zero_f"], ["k"]),
        helper.make_node("Div", ["k", "ones_row"], ["l"]),
        helper.make_node("Max", ["l"], ["m"]),
        helper.make_node("Split", ["m"], ["n"], axis=2),
        helper.make_node("Relu", ["n"], ["y"]),
        helper.make_node("And", ["true", "mask"], ["m1"]),
        helper.make_node("Or", ["m1", "false_row"], ["mask_out"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0.3, np.float32), "ratio"),
        numpy_helper.from_array(np.array([0, 4, -1], np.int64), "same_shape"),
        numpy_helper.from_array(np.zeros(6, np.int64), "zero_pads"),
        numpy_helper.from_array(np.array([1, 1, 6], np.int64), "ones3"),
        numpy_helper.from_array(np.array([0, 0], np.int64), "s_start"),
        numpy_helper.from_array(np.array([2**62, 6], np.int64), "s_end"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "s_axes"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.zeros((1, 1), np.float32), "zero_f"),
        numpy_helper.from_array(np.ones(6, np.float32), "ones_row"),
        numpy_helper.from_array(np.array(True), "true"),
        numpy_helper.from_array(np.zeros((1, 6), bool), "false_row"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F, x_shape), helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", 6])],
        [helper.make_tensor_value_info("y", F, x_shape), helper.make_tensor_value_info("mask_out", TensorProto.BOOL, ["N", 6])],
        inits,
    )
    after, n = _run(remove_noops, model)
    assert n == 15  # the Or stays: its output is a graph output and its data a graph input
    assert _ops(after) == {"Relu": 1, "Or": 1}
    assert [o.name for o in after.graph.outputs] == ["y", "mask_out"]
    _same_outputs(model, after, _feeds(model, x=(1, 4, 6), mask=(1, 6)), _feeds(model, x=(3, 4, 6), mask=(3, 6)))


def test_remove_noops_leaves_what_it_cannot_prove():
    nodes = [
        helper.make_node("Cast", ["x"], ["a"], to=TensorProto.DOUBLE),  # another type
        helper.make_node("Cast", ["a"], ["b"], to=F),
        helper.make_node("Shape", ["z"], ["zs"]),
        helper.make_node("Reshape", ["b", "zs"], ["c"]),  # target depends on a dynamic input
        helper.make_node("Reshape", ["c", "flat"], ["d"]),  # [N, 8] -> [-1, 4] changes the shape
        helper.make_node("Mul", ["d", "ones_2x4"], ["e"]),  # ones, but broadcasting adds a dim
        helper.make_node("Slice", ["e", "zero", "two", "one"], ["f"]),  # end 2 of a 4-wide dim
        helper.make_node("Dropout", ["f", "ratio", "training"], ["y"]),  # training mode is on
    ]
    inits = [
        numpy_helper.from_array(np.array([-1, 4], np.int64), "flat"),
        numpy_helper.from_array(np.ones((2, 1, 4), np.float32), "ones_2x4"),
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([2], np.int64), "two"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array(0.0, np.float32), "ratio"),
        numpy_helper.from_array(np.array(True), "training"),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F, ["N", 8]), helper.make_tensor_value_info("z", F, ["A", "B"])],
        [helper.make_tensor_value_info("y", F, ["P", "Q"])],
        inits,
    )
    after, n = _run(remove_noops, model)
    assert n == 0
    assert count_nodes(after) == count_nodes(model)


def test_remove_noop_producing_graph_output_keeps_the_name():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Cast", ["r"], ["y"], to=F)]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, ["N"])], [helper.make_tensor_value_info("y", F, ["N"])])
    after, n = _run(remove_noops, model)
    assert n == 1 and _ops(after) == {"Relu": 1}
    assert after.graph.outputs[0].name == "y"
    _same_outputs(model, after, _feeds(model, x=(5,)))
    # Input straight to output: the node must stay (a graph input cannot be renamed).
    passthrough = _model([helper.make_node("Cast", ["x"], ["y"], to=F)], [helper.make_tensor_value_info("x", F, ["N"])], [helper.make_tensor_value_info("y", F, ["N"])])
    after, n = _run(remove_noops, passthrough)
    assert n == 0 and _ops(after) == {"Cast": 1}


def test_remove_noops_inside_loop_body():
    # Loop body: v_out = Transpose(v_in + x, perm=identity) * 1
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "x"], ["s"]),
            helper.make_node("Transpose", ["s"], ["t"], perm=[0, 1]),
            helper.make_node("Mul", ["t", "one"], ["v_out"]),
        ],
        "body",
        [helper.make_tensor_value_info("i", I64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), helper.make_tensor_value_info("v_in", F, ["N", 2])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("v_out", F, ["N", 2])],
    )
    nodes = [helper.make_node("Loop", ["trip", "", "x"], ["y"], body=body)]
    inits = [numpy_helper.from_array(np.array(3, np.int64), "trip"), numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 2])], [helper.make_tensor_value_info("y", F, ["N", 2])], inits)
    after, n = _run(remove_noops, model)
    assert n == 2
    assert _ops(after) == {"Loop": 1, "Identity": 1, "Add": 1}
    _same_outputs(model, after, _feeds(model, x=(2, 2)))


# ------------------------------------------------------------------ real models


TARGETS = {"det": 326, "rec": 393, "cls": 179, "minilm": 365}  # the lowest peer's node count
SHAPES = {
    "det": [{"x": (1, 3, 96, 128)}, {"x": (2, 3, 64, 64)}],
    "rec": [{"x": (1, 3, 48, 96)}, {"x": (2, 3, 48, 160)}],
    "cls": [{"x": (1, 3, 48, 192)}, {"x": (3, 3, 48, 192)}],
    "minilm": [{"input_ids": (1, 12), "attention_mask": (1, 12), "token_type_ids": (1, 12)}, {"input_ids": (2, 20), "attention_mask": (2, 20), "token_type_ids": (2, 20)}],
}


@pytest.mark.parametrize("name", ["det", "rec", "cls", "minilm"])
def test_default_preset_on_real_model(name):
    from onnxopt.inputs import make_sample_inputs
    from onnxopt.model_io import load_model

    model = load_model(real_model(name))
    first = SHAPES[name][0]
    result = optimize(model, shapes={k: v for k, v in first.items() if k in ("x", "input_ids")})
    mine = {"fold-constants", "remove-noops", "fold-if"}
    assert not (set(result.rolled_back) & mine), result.rolled_back
    print(f"\n{name}: {result.nodes_before} -> {result.nodes_after} nodes (lowest peer {TARGETS[name]})")
    assert result.nodes_after <= TARGETS[name]
    # Dynamic input dims stay dynamic: same declared inputs, and right answers at two sizes.
    assert [(v.name, str(v.shape)) for v in result.model.graph.inputs] == [(v.name, str(v.shape)) for v in model.graph.inputs]
    for i, shapes in enumerate(SHAPES[name]):
        feeds = make_sample_inputs(model, shapes, seed=i)
        ref, new = run_model(model, feeds), run_model(result.model, feeds)
        for d in compare_outputs(ref, new, rtol=1e-4, atol=1e-5):
            assert d.within, (shapes, d)


def test_pass_manager_counts_cleanup_rewrites():
    model = _reshape_by_static_dim_model()
    result = PassManager(["fold-constants", "remove-noops", "remove-unused"], verify="off").run(model)
    stats = {s.name: s for s in result.stats}
    assert stats["fold-constants"].rewrites >= 1
    assert result.nodes_after == 1


# ------------------------------------------------------------------ fold-if


def test_fold_if_inlines_the_taken_branch_and_keeps_the_output_name():
    from onnxopt.passes.fold_if import fold_ifs

    inits = [numpy_helper.from_array(np.array(False), "cond"), numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "a")]
    model = _if_model(
        [helper.make_node("Add", ["x", "a"], ["t"])],
        "t",
        [helper.make_node("Mul", ["x", "a"], ["e1"]), helper.make_node("Relu", ["e1"], ["e"])],
        "e",
        cond_input=False,
        extra_inits=inits,
    )
    after, n = _run(fold_ifs, model)
    assert n == 1
    assert _ops(after) == {"Mul": 1, "Relu": 1}
    assert after.graph.outputs[0].name == "y"
    _same_outputs(model, after, _feeds(model, x=(3, 2)))


def test_fold_if_leaves_a_runtime_condition_alone():
    from onnxopt.passes.fold_if import fold_ifs

    model = _if_model(
        [helper.make_node("Neg", ["x"], ["t"])], "t", [helper.make_node("Relu", ["x"], ["e"])], "e"
    )
    after, n = _run(fold_ifs, model)
    assert n == 0 and _ops(after) == {"If": 1, "Neg": 1, "Relu": 1}


def test_fold_if_nested_ifs_from_the_outside_in():
    from onnxopt.passes.fold_if import fold_ifs

    # Outer If(true) whose then-branch holds If(false) returning Identity(x) of the outer x.
    inner_then = helper.make_graph([helper.make_node("Neg", ["x"], ["it"])], "it", [], [helper.make_tensor_value_info("it", F, ["N", 2])])
    inner_else = helper.make_graph([helper.make_node("Identity", ["x"], ["ie"])], "ie", [], [helper.make_tensor_value_info("ie", F, ["N", 2])])
    outer_then = helper.make_graph(
        [helper.make_node("If", ["c_false"], ["inner"], then_branch=inner_then, else_branch=inner_else)],
        "ot",
        [],
        [helper.make_tensor_value_info("inner", F, ["N", 2])],
    )
    outer_else = helper.make_graph([helper.make_node("Relu", ["x"], ["oe"])], "oe", [], [helper.make_tensor_value_info("oe", F, ["N", 2])])
    nodes = [helper.make_node("If", ["c_true"], ["y"], then_branch=outer_then, else_branch=outer_else)]
    inits = [numpy_helper.from_array(np.array(True), "c_true"), numpy_helper.from_array(np.array(False), "c_false")]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, ["N", 2])], [helper.make_tensor_value_info("y", F, ["N", 2])], inits)
    after, n = _run(fold_ifs, model)
    assert n == 2
    assert _ops(after) == {"Identity": 1}
    assert after.graph.outputs[0].name == "y"
    _same_outputs(model, after, _feeds(model, x=(3, 2)))


def test_fold_inside_a_model_local_function():
    # f(x) = Cast(x, float) * (Constant(2) + Constant(3)); the function keeps Constant nodes.
    fn = helper.make_function(
        "local",
        "Scale",
        ["x"],
        ["y"],
        [
            helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
            helper.make_node("Constant", [], ["three"], value=numpy_helper.from_array(np.array(3.0, np.float32))),
            helper.make_node("Add", ["two", "three"], ["five"]),
            helper.make_node("Mul", ["x", "five"], ["y"]),
        ],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [helper.make_node("Scale", ["x"], ["y"], domain="local")],
        "g",
        [helper.make_tensor_value_info("x", F, ["N"])],
        [helper.make_tensor_value_info("y", F, ["N"])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)], functions=[fn])
    proto.ir_version = 8
    model = ir.serde.deserialize_model(proto)
    after, n = _run(fold_constants, model)
    assert n == 1
    func = next(iter(after.functions.values()))
    assert [node.op_type for node in func] == ["Constant", "Mul"]
    assert list(func)[0].attributes["value"].value.numpy() == 5.0
    _same_outputs(model, after, _feeds(model, x=(4,)))


def test_no_fold_of_loop_carried_shape_even_when_the_body_declares_it_static():
    # The body declares v_in as [2, 3], but the loop-carried value grows every iteration
    # (Shape(v_in)[0] is really 2, 4, 6): the declared 2 must not be folded in. (ONNX
    # Runtime itself trusts the declaration here, so the outputs are compared with it.)
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Concat", ["v_in", "x"], ["v_out"], axis=0),
            helper.make_node("Shape", ["v_in"], ["s"]),
            helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
            helper.make_node("Cast", ["n"], ["scan_out"], to=F),
        ],
        "body",
        [helper.make_tensor_value_info("i", I64, []), helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), helper.make_tensor_value_info("v_in", F, [2, 3])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("v_out", F, ["M", 3]), helper.make_tensor_value_info("scan_out", F, [])],
    )
    nodes = [helper.make_node("Loop", ["trip", "", "x"], ["v", "ns"], body=body)]
    inits = [numpy_helper.from_array(np.array(3, np.int64), "trip"), numpy_helper.from_array(np.array(0, np.int64), "zero")]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [2, 3])], [helper.make_tensor_value_info("v", F, ["M", 3]), helper.make_tensor_value_info("ns", F, [3])], inits)
    after, n = _run(fold_constants, model)
    assert n == 0
    assert _ops(after) == _ops(model)
    _same_outputs(model, after, {"x": np.ones((2, 3), np.float32)})


def test_remove_noops_squeeze_without_axes_only_when_no_dim_can_be_one():
    nodes = [
        helper.make_node("Squeeze", ["x"], ["a"]),  # [2, 3]: nothing to squeeze
        helper.make_node("Squeeze", ["z"], ["b"]),  # [N, 3]: N may be 1 at run time
        helper.make_node("CastLike", ["a", "x"], ["y"]),
        helper.make_node("ReduceSum", ["b"], ["total"], keepdims=0),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", F, [2, 3]), helper.make_tensor_value_info("z", F, ["N", 3])],
        [helper.make_tensor_value_info("y", F, [2, 3]), helper.make_tensor_value_info("total", F, [])],
    )
    after, n = _run(remove_noops, model)
    assert n == 1  # the first Squeeze; CastLike keeps y (its data would be the graph input x)
    assert _ops(after) == {"Squeeze": 1, "CastLike": 1, "ReduceSum": 1}
    _same_outputs(model, after, _feeds(model, x=(2, 3), z=(1, 3)), _feeds(model, x=(2, 3), z=(4, 3)))


def test_fold_never_allocates_a_huge_generated_constant():
    # 10^12 elements: evaluating it first and checking the size afterwards would run out of memory.
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["zeros"]),
        helper.make_node("Tile", ["row", "reps"], ["tiled"]),
        helper.make_node("ReduceSum", ["zeros"], ["s1"], keepdims=0),
        helper.make_node("ReduceSum", ["tiled"], ["s2"], keepdims=0),
        helper.make_node("Add", ["s1", "s2"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([1_000_000, 1_000_000], np.int64), "shape"),
        numpy_helper.from_array(np.ones((1, 4), np.float32), "row"),
        numpy_helper.from_array(np.array([1_000_000, 250_000], np.int64), "reps"),
    ]
    model = _model(nodes, [], [helper.make_tensor_value_info("y", F, [])], inits)
    after, n = _run(fold_constants, model)
    assert n == 0
    assert _ops(after) == {"ConstantOfShape": 1, "Tile": 1, "ReduceSum": 2, "Add": 1}


def test_a_tensor_returned_twice_keeps_both_output_names(tmp_path):
    """torch's `return y, y, x` exports b = Identity(a) with a and b both outputs: onnx-ir's
    identity elimination renamed a to b, leaving outputs ['b', 'b', ...] (written as is
    under --no-verify)."""
    import onnxopt
    from onnxopt.errors import VerificationError
    from onnxopt.verify import check_model

    w = numpy_helper.from_array(np.eye(8, dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Relu", ["m"], ["a"]),
         helper.make_node("Identity", ["a"], ["b"]), helper.make_node("Identity", ["x"], ["passthru"])],
        "dup", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 8]) for n in ("a", "b", "passthru")], [w],
    )
    path = tmp_path / "dup.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    for verify in ("final", "off"):
        result = onnxopt.optimize(path, verify=verify)
        assert [v.name for v in result.model.graph.outputs] == ["a", "b", "passthru"], verify
        assert not result.rolled_back
    broken = onnxopt.load_model(path)
    broken.graph.outputs[0] = broken.graph.outputs[1]
    with pytest.raises(VerificationError, match="graph output 'b' is listed twice"):
        check_model(broken)
