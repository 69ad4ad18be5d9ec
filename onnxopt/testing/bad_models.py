"""Broken and hostile model files, built in code, for hardening tests and the fuzzer.

Each builder writes into a folder and returns the model's path. They cover what real
users hand to optimizers and what peers' trackers report as crashes: garbage bytes,
truncated or bit-flipped files, graphs with cycles, dangling or duplicate value names,
unknown ops and custom domains, missing opset imports, absurd dimensions, initializers
whose dims lie about their data, and external data that is missing or escapes the
model's folder.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def small_graph(opset: int = 17, *, ir_version: int = 8, dynamic: bool = True) -> onnx.ModelProto:
    """x[N,4] -> MatMul(W) -> Add(b) -> Relu -> y[N,3]: a valid model to break."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")
    batch = "N" if dynamic else 2
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm"),
            helper.make_node("Add", ["mm", "b"], ["add"], name="add"),
            helper.make_node("Relu", ["add"], ["y"], name="relu"),
        ],
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def _save(model: onnx.ModelProto, folder: pathlib.Path, name: str) -> pathlib.Path:
    path = pathlib.Path(folder) / name
    path.write_bytes(model.SerializeToString())
    return path


def random_bytes(folder, seed: int = 0, size: int = 4096) -> pathlib.Path:
    path = pathlib.Path(folder) / "random.onnx"
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def empty_file(folder) -> pathlib.Path:
    path = pathlib.Path(folder) / "empty.onnx"
    path.write_bytes(b"")
    return path


def truncated(folder, source: pathlib.Path | None = None, fraction: float = 0.5) -> pathlib.Path:
    data = source.read_bytes() if source else small_graph().SerializeToString()
    path = pathlib.Path(folder) / "truncated.onnx"
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def text_file(folder) -> pathlib.Path:
    path = pathlib.Path(folder) / "notes.onnx"
    path.write_text("this is not a model\n")
    return path


def cycle(folder) -> pathlib.Path:
    """a = Add(x, c); c = Relu(a): a loop in the data flow."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["a"]), helper.make_node("Relu", ["a"], ["c"])],
        "cycle",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3])],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder, "cycle.onnx")


def dangling_input(folder) -> pathlib.Path:
    model = small_graph()
    model.graph.node[1].input[1] = "nobody_makes_this"
    return _save(model, folder, "dangling.onnx")


def duplicate_output(folder) -> pathlib.Path:
    """Two nodes write the same value name (SSA violated)."""
    model = small_graph()
    model.graph.node[1].output[0] = "mm"
    model.graph.node[2].input[0] = "mm"
    return _save(model, folder, "duplicate.onnx")


def duplicate_initializer(folder) -> pathlib.Path:
    model = small_graph()
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(3, np.float32), "b"))
    return _save(model, folder, "dup_init.onnx")


def unknown_op(folder) -> pathlib.Path:
    model = small_graph()
    model.graph.node[2].op_type = "FrobnicateRelu"
    return _save(model, folder, "unknown_op.onnx")


def custom_domain(folder) -> pathlib.Path:
    """A custom-domain op no runtime here implements."""
    model = small_graph()
    model.graph.node[2].op_type = "MyRelu"
    model.graph.node[2].domain = "com.example"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    return _save(model, folder, "custom_domain.onnx")


def no_opset(folder) -> pathlib.Path:
    model = small_graph()
    del model.opset_import[:]
    return _save(model, folder, "no_opset.onnx")


def no_outputs(folder) -> pathlib.Path:
    model = small_graph()
    del model.graph.output[:]
    return _save(model, folder, "no_outputs.onnx")


def _if_graph() -> onnx.ModelProto:
    from onnxopt.testing.fuzz import _if_model  # If with a Constant, an op and an Identity per branch

    return _if_model()


def subgraph_dangling(folder) -> pathlib.Path:
    model = _if_graph()
    model.graph.node[2].attribute[0].g.node[1].input[0] = "nowhere"
    return _save(model, folder, "sub_dangling.onnx")


def subgraph_cycle(folder) -> pathlib.Path:
    model = _if_graph()
    branch = model.graph.node[2].attribute[0].g
    branch.node[1].input[1] = branch.node[2].output[0]
    return _save(model, folder, "sub_cycle.onnx")


def subgraph_unknown_op(folder) -> pathlib.Path:
    model = _if_graph()
    model.graph.node[2].attribute[0].g.node[1].op_type = "NoSuchOpInBranch"
    return _save(model, folder, "sub_unknown.onnx")


def future_opset(folder) -> pathlib.Path:
    model = small_graph(opset=999)
    return _save(model, folder, "future_opset.onnx")


def huge_input_dims(folder) -> pathlib.Path:
    """An input declared as [2^40, 4]: generating sample inputs must refuse, not allocate."""
    model = small_graph()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1 << 40
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1 << 40
    return _save(model, folder, "huge_dims.onnx")


def lying_initializer(folder) -> pathlib.Path:
    """W claims dims [4, 3] but carries 5 floats of raw data."""
    model = small_graph()
    w = model.graph.initializer[0]
    w.raw_data = np.arange(5, dtype=np.float32).tobytes()
    return _save(model, folder, "lying_init.onnx")


def huge_initializer_dims(folder) -> pathlib.Path:
    """W claims dims [2^40, 3] with 12 floats of data."""
    model = small_graph()
    w = model.graph.initializer[0]
    w.dims[0] = 1 << 40
    return _save(model, folder, "huge_init.onnx")


def negative_dims(folder) -> pathlib.Path:
    model = small_graph()
    model.graph.initializer[0].dims[0] = -4
    return _save(model, folder, "negative_dims.onnx")


def wrong_elem_type(folder) -> pathlib.Path:
    """Initializer with an element type number that does not exist."""
    model = small_graph()
    model.graph.initializer[1].data_type = 77
    return _save(model, folder, "bad_dtype.onnx")


def _external(folder, location: str, name: str) -> pathlib.Path:
    model = small_graph()
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value=location)
    w.external_data.add(key="offset", value="0")
    w.external_data.add(key="length", value="48")
    return _save(model, folder, name)


def external_missing(folder) -> pathlib.Path:
    return _external(folder, "weights.bin", "ext_missing.onnx")


def external_absolute(folder) -> pathlib.Path:
    return _external(folder, "/etc/passwd", "ext_absolute.onnx")


def external_dotdot(folder) -> pathlib.Path:
    return _external(folder, "../outside.bin", "ext_dotdot.onnx")


def external_symlink(folder) -> pathlib.Path:
    """weights.bin is a symlink to a file outside the model's folder."""
    folder = pathlib.Path(folder)
    outside = folder.parent / f"{folder.name}-outside.bin"
    outside.write_bytes(np.zeros(12, np.float32).tobytes())
    link = folder / "link.bin"
    if link.exists() or link.is_symlink():
        link.unlink()
    os.symlink(outside, link)
    return _external(folder, "link.bin", "ext_symlink.onnx")


def external_short(folder) -> pathlib.Path:
    """The data file holds fewer bytes than the tensor needs."""
    (pathlib.Path(folder) / "short.bin").write_bytes(b"\0" * 8)
    return _external(folder, "short.bin", "ext_short.onnx")


def fails_at_runtime(folder) -> pathlib.Path:
    """Valid and loadable, but Reshape([N,4] -> [5]) fails when it runs (N = 1)."""
    model = small_graph()
    model.graph.initializer.append(numpy_helper.from_array(np.array([5], np.int64), "five"))
    model.graph.node.insert(0, helper.make_node("Reshape", ["x", "five"], ["x5"]))
    model.graph.node.insert(1, helper.make_node("ReduceSum", ["x5"], ["x5sum"], keepdims=0))
    model.graph.node[-1].input[0] = "add2"
    model.graph.node.insert(len(model.graph.node) - 1, helper.make_node("Add", ["add", "x5sum"], ["add2"]))
    return _save(model, folder, "fails_at_runtime.onnx")


def constant_without_value(folder) -> pathlib.Path:
    """The bias comes from a Constant node that carries no value attribute, and feeds a Clip
    (the shape quantize's hard-swish scan reads constants from before anything loads)."""
    model = small_graph()
    bias = next(i for i in model.graph.initializer if i.name == "b")
    model.graph.initializer.remove(bias)
    model.graph.initializer.extend([numpy_helper.from_array(np.array(0, np.float32), "lo"),
                                    numpy_helper.from_array(np.array(6, np.float32), "hi")])
    model.graph.node.insert(0, helper.make_node("Constant", [], ["b"]))
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    model.graph.node.remove(relu)
    model.graph.node.append(helper.make_node("Clip", ["add", "lo", "hi"], ["y"], name="clip"))
    return _save(model, folder, "constant_without_value.onnx")


def external_wrong_length(folder) -> pathlib.Path:
    """W is [4, 3] float (48 bytes) but its external data claims 20 bytes of a 100-byte file."""
    (pathlib.Path(folder) / "w100.bin").write_bytes(b"\0" * 100)
    path = _external(folder, "w100.bin", "ext_wrong_length.onnx")
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "length":
            entry.value = "20"
    return _save(model, folder, "ext_wrong_length.onnx")


# name -> (builder, what the error must mention (lower-case substring, any of))
BAD_MODELS = {
    "random_bytes": (random_bytes, ("not a valid onnx model",)),
    "empty_file": (empty_file, ("not a valid onnx model",)),
    "truncated": (truncated, ("not a valid onnx model",)),
    "text_file": (text_file, ("not a valid onnx model",)),
    "cycle": (cycle, ("cycle", "topolog", "checker", "not in topological order")),
    "dangling_input": (dangling_input, ("nobody_makes_this",)),
    "duplicate_output": (duplicate_output, ("mm",)),
    "duplicate_initializer": (duplicate_initializer, ("'b'", "b")),
    "unknown_op": (unknown_op, ("frobnicaterelu",)),
    "custom_domain": (custom_domain, ("myrelu", "com.example")),
    "no_opset": (no_opset, ("opset",)),
    "no_outputs": (no_outputs, ("no graph outputs",)),
    "subgraph_dangling": (subgraph_dangling, ("nowhere",)),
    "subgraph_cycle": (subgraph_cycle, ("topologically",)),
    "subgraph_unknown_op": (subgraph_unknown_op, ("nosuchopinbranch",)),
    "future_opset": (future_opset, ("opset", "999")),
    "huge_input_dims": (huge_input_dims, ("too large", "1099511627776")),
    "lying_initializer": (lying_initializer, ("'w'", "w")),
    "huge_initializer_dims": (huge_initializer_dims, ("'w'", "w")),
    "negative_dims": (negative_dims, ("'w'", "negative", "w")),
    "wrong_elem_type": (wrong_elem_type, ("'b'", "type", "b")),
    "external_missing": (external_missing, ("missing",)),
    "external_absolute": (external_absolute, ("absolute",)),
    "external_dotdot": (external_dotdot, ("outside",)),
    "external_symlink": (external_symlink, ("outside",)),
    "external_short": (external_short, ("past the end",)),
    "external_wrong_length": (external_wrong_length, ("does not match its shape",)),
    "fails_at_runtime": (fails_at_runtime, ("does not run",)),
    "constant_without_value": (constant_without_value, ("constant",)),
}
