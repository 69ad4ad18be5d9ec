"""The Python API refuses wrong argument types and values with one clear OnnxoptError.

The CLI's option types never let these through; from Python they used to surface as a
TypeError deep inside, or (a string for a list) be taken apart letter by letter.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxopt
from onnxopt.bench import benchmark
from onnxopt.errors import OnnxoptError
from onnxopt.quantization import quantize


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(verify="all"), "verify='all': choose from"),
        (dict(verify=True), "verify=True: choose from"),
        (dict(rtol="1e-3"), "rtol='1e-3': expected a number"),
        (dict(atol=-1.0), "tolerances must be >= 0"),
        (dict(shapes=["x:2x4x"]), None),  # CLI-style specs are accepted
        (dict(shapes={"x": "2x4"}), "shapes['x']='2x4': expected a tuple of dimensions"),
        (dict(inputs=[np.zeros((2, 4), np.float32)]), "inputs: expected an .npz path, a feed dict"),
        (dict(target_opset=17.5), "target_opset=17.5: expected an integer"),
    ],
)
def test_optimize_arguments(tiny_model_path, kwargs, message):
    if message is None:
        assert onnxopt.optimize(tiny_model_path, **kwargs).nodes_after < 5
        return
    with pytest.raises(OnnxoptError, match=message.replace("[", r"\[").replace("(", r"\(")):
        onnxopt.optimize(tiny_model_path, **kwargs)


def test_one_name_is_one_name_not_its_letters(tiny_model_path):
    result = onnxopt.optimize(tiny_model_path, passes="identity-elimination", verify="off")
    assert [s.name for s in result.stats] == ["identity-elimination"]
    assert [n.op_type for n in result.model.graph] == ["Neg", "Neg", "MatMul", "Add"]
    with pytest.raises(OnnxoptError, match="--exclude 'nothing_here'"):
        quantize(tiny_model_path, "random", shapes={"x": (2, 4)}, exclude="nothing_here", progress=False)


def test_a_model_proto_is_accepted_and_left_alone(tiny_model_path, tmp_path):
    proto = onnx.load(tiny_model_path)
    before = proto.SerializeToString()
    result = onnxopt.optimize(proto)
    assert proto.SerializeToString() == before
    onnxopt.save_model(ir.serde.serialize_model(result.model), tmp_path / "o.onnx")  # a proto saves too
    assert len(onnx.load(tmp_path / "o.onnx").graph.node) == result.nodes_after < 5
    with pytest.raises(OnnxoptError, match="model: expected a path or an onnx_ir.Model, got int"):
        onnxopt.optimize(3)
    with pytest.raises(OnnxoptError, match="save_model: expected an onnx_ir.Model"):
        onnxopt.save_model({"graph": 1}, tmp_path / "x.onnx")


def test_optimize_leaves_the_callers_ir_model_unchanged():
    from tests.conftest import real_model

    path = real_model("cls")  # Paddle export: its weights sit in Constant nodes
    model = onnxopt.load_model(path)
    before = ir.serde.serialize_model(model).SerializeToString()
    result = onnxopt.optimize(model, shapes={"x": (1, 3, 48, 192)})
    ir.serde.serialize_model(result.model)  # serializing the result renamed the shared tensors
    assert ir.serde.serialize_model(model).SerializeToString() == before


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_drop="0.01"), "max_drop='0.01': expected a number"),
        (dict(holdout=-2), "holdout=-2: must be >= 0"),
        (dict(samples=0), "samples=0: must be >= 1"),
        (dict(smoothquant_alpha=1.5), "smoothquant_alpha=1.5: must be > 0 and < 1"),
        (dict(equalize="yes"), "equalize='yes': choose from"),
        (dict(per_channel="no"), "per_channel='no': expected True or False"),
    ],
)
def test_quantize_arguments(tiny_model_path, kwargs, message):
    with pytest.raises(OnnxoptError, match=message):
        quantize(tiny_model_path, "random", shapes={"x": (2, 4)}, progress=False, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(runs="5"), "runs='5': expected an integer"),
        (dict(warmup=-1), "--warmup must be 0 or more"),
        (dict(threads=2.0), "threads=2.0: expected an integer"),
        (dict(inputs=[{"x": np.zeros((2, 4), np.float32)}]), "inputs: expected an .npz path or one feed dict"),
        (dict(ep_options=["device_id"]), "expected KEY=VALUE"),
        (dict(spinning="off"), "spinning='off': expected True or False"),
        (dict(rtol=-1.0), "tolerances must be >= 0"),
    ],
)
def test_benchmark_arguments(tiny_model_path, kwargs, message):
    with pytest.raises(OnnxoptError, match=message):
        benchmark([tiny_model_path], warmup=kwargs.pop("warmup", 0), runs=kwargs.pop("runs", 2), **kwargs)


def test_benchmark_takes_cli_style_specs_from_python(tiny_model_path):
    report = benchmark([tiny_model_path], runs=2, warmup=0, shapes=["x:3x4"], batch_sizes="1,2")
    assert [r["batch"] for r in report.results] == [1, 2]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ratio="0.25"), "ratio='0.25': expected a number"),
        (dict(ratio=0.25, multiple=2.5), "multiple=2.5: expected an integer"),
        (dict(ratio=0.25, max_positions=0), "max_positions=0: must be >= 1"),
        (dict(ratio=0.25, samples=4), "samples/image_spec need calib"),
        (dict(ratio=0.25, reconstruct="no"), "reconstruct='no': expected True or False"),
    ],
)
def test_prune_arguments(tiny_model_path, kwargs, message):
    from onnxopt.pruning import prune

    with pytest.raises(OnnxoptError, match=message):
        prune(tiny_model_path, progress=False, **kwargs)
