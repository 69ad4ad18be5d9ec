"""A seeded fuzzer for the CLI: mutated real and hand-built models through optimize and inspect
(and, with ``--quantize`` / ``--prune``, those commands too).

Every case mutates one seed model (the PP-OCR direction classifier, the demo CNN, a
small MatMul/Add/Relu graph, an If-with-subgraphs graph, a small attention block) at the
byte level (bit flips, truncation, zeroed or inserted bytes) or at the protobuf level
(drop a node input, rename a value, change an attribute, change a dtype, remove an
initializer, add a cycle, delete/duplicate a node, change an op type, a shape dim, the
opset, an intermediate's declared shape, ...), writes it to a folder and runs
``onnxopt optimize`` and ``onnxopt inspect`` on it in-process. A case passes when:

- the command fails cleanly: exit 1 or 2, exactly one ``onnxopt: error:`` line on
  stderr, no output file, no ``.onnxopt-tmp-*`` leftovers, the input file unchanged; or
- it succeeds with a valid result: the output passes the ONNX checker, ONNX Runtime
  loads it, and (the mutant ran, since optimize verified it) the outputs of the output
  file match the mutant's on generated inputs.

Anything else is a failure: exit 3 (internal error), a traceback, several stderr lines,
a hang past the per-case alarm, a partial file. Run it with::

    python -m onnxopt.testing.fuzz --cases 2000 --seed 0 --json fuzz.json

The process limits its own address space (``--max-memory-gb``, default 6) so a mutant
that asks for a terabyte fails inside ONNX Runtime instead of taking the machine down.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CASE_TIMEOUT_S = 30


class CaseTimeout(BaseException):
    """Raised by the alarm; a BaseException so the CLI's catch-all cannot swallow it."""


# ----------------------------------------------------------------------------- seeds


def _attention_block() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    d, h = 16, 2

    def t(name, *shape, scale=0.2):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [t("wq", d, d), t("wk", d, d), t("wv", d, d), t("wo", d, d), t("bo", d), t("g", d, scale=1.0), t("beta", d)]
    inits += [
        numpy_helper.from_array(np.array([0, 0, h, d // h], np.int64), "heads_shape"),
        numpy_helper.from_array(np.array([0, 0, d], np.int64), "merge_shape"),
        numpy_helper.from_array(np.array(np.sqrt(d // h), np.float32), "scale"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes_last"),
        numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
    ]
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "wq"], ["q"]), n("MatMul", ["x", "wk"], ["k"]), n("MatMul", ["x", "wv"], ["v"]),
        n("Reshape", ["q", "heads_shape"], ["qh"]), n("Transpose", ["qh"], ["qt"], perm=[0, 2, 1, 3]),
        n("Reshape", ["k", "heads_shape"], ["kh"]), n("Transpose", ["kh"], ["kt"], perm=[0, 2, 3, 1]),
        n("Reshape", ["v", "heads_shape"], ["vh"]), n("Transpose", ["vh"], ["vt"], perm=[0, 2, 1, 3]),
        n("MatMul", ["qt", "kt"], ["scores"]), n("Div", ["scores", "scale"], ["scaled"]),
        n("Softmax", ["scaled"], ["probs"], axis=-1), n("MatMul", ["probs", "vt"], ["ctx"]),
        n("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]), n("Reshape", ["ctx_t", "merge_shape"], ["merged"]),
        n("MatMul", ["merged", "wo"], ["proj"]), n("Add", ["proj", "bo"], ["proj_b"]), n("Add", ["proj_b", "x"], ["res"]),
        # LayerNorm, decomposed the way older exporters write it
        n("ReduceMean", ["res", "axes_last"], ["mu"]), n("Sub", ["res", "mu"], ["xc"]), n("Pow", ["xc", "two"], ["sq"]),
        n("ReduceMean", ["sq", "axes_last"], ["var"]), n("Add", ["var", "eps"], ["var_eps"]), n("Sqrt", ["var_eps"], ["std"]),
        n("Div", ["xc", "std"], ["xn"]), n("Mul", ["xn", "g"], ["xg"]), n("Add", ["xg", "beta"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def _if_model() -> onnx.ModelProto:
    """y = If(sum(x) > 0, x * 2 (+ Identity), x - 1) with a Constant inside each branch."""
    def branch(name, op, value):
        c = numpy_helper.from_array(np.array(value, np.float32), f"{name}_c")
        return helper.make_graph(
            [helper.make_node("Constant", [], [f"{name}_k"], value=c),
             helper.make_node(op, ["x", f"{name}_k"], [f"{name}_r"]),
             helper.make_node("Identity", [f"{name}_r"], [f"{name}_out"])],
            name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["n", 3])],
        )

    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", "Mul", 2.0), else_branch=branch("else", "Sub", 1.0)),
    ]
    graph = helper.make_graph(
        nodes, "if_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def seed_models(include_real: bool = True) -> dict[str, bytes]:
    """Serialized seed models by name; the PP-OCR classifier only where it is installed."""
    from onnxopt.demo import build_demo_model
    from onnxopt.testing.bad_models import small_graph

    seeds = {
        "small": small_graph().SerializeToString(),
        "demo_cnn": build_demo_model().SerializeToString(),
        "attention": _attention_block().SerializeToString(),
        "if": _if_model().SerializeToString(),
    }
    if include_real:
        try:
            from onnxopt.testing.real_models import ppocr_model

            seeds["ppocr_cls"] = pathlib.Path(ppocr_model("cls")).read_bytes()
        except Exception:  # not installed: the hand-built seeds still run
            pass
    return seeds


# ------------------------------------------------------------------------- mutations


def _bytes_flip(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    b = bytearray(data)
    k = rng.randint(1, 8)
    for _ in range(k):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b), f"flip {k} bits"


def _bytes_truncate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    n = rng.randrange(len(data))
    return data[:n], f"truncate to {n} of {len(data)} bytes"


def _bytes_zero(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    b = bytearray(data)
    i = rng.randrange(len(b))
    n = rng.randint(1, 64)
    b[i : i + n] = bytes(len(b[i : i + n]))
    return bytes(b), f"zero {n} bytes at {i}"


def _bytes_insert(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    i = rng.randrange(len(data))
    junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return data[:i] + junk + data[i:], f"insert {len(junk)} bytes at {i}"


BYTE_MUTATIONS = [_bytes_flip, _bytes_truncate, _bytes_zero, _bytes_insert]


def _graphs(m: onnx.ModelProto) -> list[onnx.GraphProto]:
    out = [m.graph]
    for node in m.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out.append(a.g)
    return out


def _pick_node(m, rng, pred=lambda n: True):
    cands = [(g, i) for g in _graphs(m) for i, n in enumerate(g.node) if pred(n)]
    if not cands:
        return None, None
    g, i = rng.choice(cands)
    return g, g.node[i]


def _m_drop_input(m, rng):
    g, node = _pick_node(m, rng, lambda n: len(n.input) > 0)
    if node is None:
        return None
    i = rng.randrange(len(node.input))
    del node.input[i]
    return f"drop input {i} of {node.op_type}"


def _m_empty_input(m, rng):
    g, node = _pick_node(m, rng, lambda n: len(n.input) > 0)
    if node is None:
        return None
    i = rng.randrange(len(node.input))
    node.input[i] = ""
    return f"blank input {i} of {node.op_type}"


def _m_rename_value(m, rng):
    g, node = _pick_node(m, rng, lambda n: len(n.input) + len(n.output) > 0)
    if node is None:
        return None
    if node.output and rng.random() < 0.5:
        i = rng.randrange(len(node.output))
        node.output[i] = f"fuzz_renamed_{rng.randrange(1000)}"
        return f"rename output {i} of {node.op_type}"
    if not node.input:
        return None
    i = rng.randrange(len(node.input))
    node.input[i] = f"fuzz_renamed_{rng.randrange(1000)}"
    return f"rename input {i} of {node.op_type}"


def _m_rename_graph_input(m, rng):
    vi = rng.choice(list(m.graph.input)) if m.graph.input else None
    if vi is None:
        return None
    vi.name = vi.name + "_fuzz"
    return "rename a graph input"


_INT_VALUES = [-(1 << 31), -2, -1, 0, 1, 2, 3, 7, 1 << 20, 1 << 62]
_FLOAT_VALUES = [float("nan"), float("inf"), -1.0, 0.0, 1e-30, 1e30]


def _m_change_attribute(m, rng):
    g, node = _pick_node(m, rng, lambda n: len(n.attribute) > 0)
    if node is None:
        return None
    a = rng.choice(list(node.attribute))
    choice = rng.randrange(4)
    if choice == 0:
        node.attribute.remove(a)
        return f"remove attribute {a.name} of {node.op_type}"
    if choice == 1:
        node.attribute.append(helper.make_attribute(f"fuzz_{rng.randrange(100)}", rng.choice(_INT_VALUES)))
        return f"add unknown attribute to {node.op_type}"
    if a.type == onnx.AttributeProto.INT:
        a.i = rng.choice(_INT_VALUES)
    elif a.type == onnx.AttributeProto.FLOAT:
        a.f = rng.choice(_FLOAT_VALUES)
    elif a.type == onnx.AttributeProto.INTS:
        del a.ints[:]
        a.ints.extend(rng.choice(_INT_VALUES) for _ in range(rng.randint(0, 5)))
    elif a.type == onnx.AttributeProto.STRING:
        a.s = b"fuzz"
    elif a.type == onnx.AttributeProto.TENSOR:
        a.t.data_type = rng.choice([1, 6, 7, 11, 0, 99])
    else:
        a.type = onnx.AttributeProto.INT
        a.i = 3
    return f"change attribute {a.name} of {node.op_type}"


_DTYPES = [0, 1, 2, 3, 5, 6, 7, 9, 10, 11, 16, 8, 99]


def _m_change_dtype(m, rng):
    kind = rng.randrange(3)
    if kind == 0 and m.graph.initializer:
        t = rng.choice(list(m.graph.initializer))
        t.data_type = rng.choice(_DTYPES)
        return f"initializer {t.name} dtype -> {t.data_type}"
    vis = list(m.graph.input) + list(m.graph.output)
    vi = rng.choice(vis)
    if vi.type.WhichOneof("value") != "tensor_type":
        return None
    vi.type.tensor_type.elem_type = rng.choice(_DTYPES)
    return f"{vi.name} elem_type -> {vi.type.tensor_type.elem_type}"


def _m_remove_initializer(m, rng):
    if not m.graph.initializer:
        return None
    i = rng.randrange(len(m.graph.initializer))
    name = m.graph.initializer[i].name
    del m.graph.initializer[i]
    return f"remove initializer {name}"


def _m_add_cycle(m, rng):
    nodes = m.graph.node
    if len(nodes) < 2:
        return None
    i = rng.randrange(len(nodes) - 1)
    j = rng.randrange(i + 1, len(nodes))
    if not nodes[i].input or not nodes[j].output:
        return None
    nodes[i].input[rng.randrange(len(nodes[i].input))] = nodes[j].output[0]
    # keep it topologically "sortable" only if there is no path back: usually a real cycle
    return f"cycle: node {i} reads node {j}'s output"


def _m_delete_node(m, rng):
    g, node = _pick_node(m, rng)
    if node is None:
        return None
    g.node.remove(node)
    return f"delete {node.op_type}"


def _m_duplicate_node(m, rng):
    g, node = _pick_node(m, rng)
    if node is None:
        return None
    dup = copy.deepcopy(node)
    if rng.random() < 0.5:
        del dup.output[:]
        dup.output.extend(f"{o}_dup" for o in node.output)
    g.node.append(dup)
    return f"duplicate {node.op_type}"


_OPS = ["Relu", "Add", "MatMul", "Conv", "Reshape", "Concat", "Gemm", "Softmax", "Identity", "Transpose", "NoSuchOp"]


def _m_change_op(m, rng):
    g, node = _pick_node(m, rng)
    if node is None:
        return None
    old = node.op_type
    node.op_type = rng.choice(_OPS)
    return f"op {old} -> {node.op_type}"


def _m_change_dim(m, rng):
    vis = [vi for vi in list(m.graph.input) + list(m.graph.output) if vi.type.tensor_type.shape.dim]
    if not vis:
        return None
    vi = rng.choice(vis)
    dim = rng.choice(list(vi.type.tensor_type.shape.dim))
    val = rng.choice([0, 1, 7, -3, (1 << 20) + 1, 1 << 40, "sym"])
    if val == "sym":
        dim.dim_param = "fuzz_dim"
    else:
        dim.dim_value = val
    return f"{vi.name} dim -> {val}"


def _m_change_rank(m, rng):
    vis = [vi for vi in m.graph.input if vi.type.WhichOneof("value") == "tensor_type"]
    if not vis:
        return None
    vi = rng.choice(vis)
    shape = vi.type.tensor_type.shape
    if shape.dim and rng.random() < 0.5:
        del shape.dim[-1]
        return f"{vi.name} rank - 1"
    shape.dim.add().dim_value = 2
    return f"{vi.name} rank + 1"


def _m_change_opset(m, rng):
    v = rng.choice([1, 6, 9, 11, 13, 17, 21, 99])
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = v
    return f"opset -> {v}"


def _m_ir_version(m, rng):
    m.ir_version = rng.choice([0, 1, 3, 4, 7, 10, 99])
    return f"ir_version -> {m.ir_version}"


def _m_swap_nodes(m, rng):
    nodes = m.graph.node
    if len(nodes) < 2:
        return None
    i, j = rng.sample(range(len(nodes)), 2)
    a, b = copy.deepcopy(nodes[i]), copy.deepcopy(nodes[j])
    nodes[i].CopyFrom(b)
    nodes[j].CopyFrom(a)
    return f"swap nodes {i} and {j}"


def _m_initializer_data(m, rng):
    inits = [t for t in m.graph.initializer if t.raw_data]
    if not inits:
        return None
    t = rng.choice(inits)
    choice = rng.randrange(3)
    if choice == 0:
        t.raw_data = t.raw_data[: len(t.raw_data) // 2]
        return f"halve {t.name}'s data"
    if choice == 1:
        t.dims.append(rng.choice([0, 2, 1 << 40]))
        return f"append a dim to {t.name}"
    try:
        arr = numpy_helper.to_array(t).copy()
    except ValueError:  # an earlier mutation of this case already broke its data
        return None
    if arr.dtype.kind == "f" and arr.size:
        arr.flat[rng.randrange(arr.size)] = rng.choice([np.nan, np.inf, -np.inf, 1e38])
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
        return f"non-finite value in {t.name}"
    return None


def _m_wrong_value_info(m, rng):
    """Declare a wrong shape for an intermediate (exporters get these wrong)."""
    g, node = _pick_node(m, rng, lambda n: len(n.output) > 0 and n.op_type != "If")
    if node is None or g is not m.graph:
        return None
    out = node.output[0]
    for vi in list(m.graph.value_info):
        if vi.name == out:
            m.graph.value_info.remove(vi)
    dims = [rng.choice([1, 3, 5, "q"]) for _ in range(rng.randint(0, 4))]
    m.graph.value_info.append(helper.make_tensor_value_info(out, rng.choice([1, 7, 10]), dims))
    return f"wrong value_info for {out}"


def _m_graph_output(m, rng):
    if rng.random() < 0.5 and len(m.graph.output) > 0:
        del m.graph.output[rng.randrange(len(m.graph.output))]
        return "remove a graph output"
    g, node = _pick_node(m, rng, lambda n: len(n.output) > 0)
    if node is None or g is not m.graph:
        return None
    m.graph.output.append(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None))
    return f"intermediate {node.output[0]} as graph output"


def _float_values(m) -> list[str]:
    """Names of float tensors produced by main-graph nodes that are not graph outputs."""
    try:
        inferred = onnx.shape_inference.infer_shapes(m)
    except Exception:
        return []
    outs = {o.name for o in m.graph.output}
    return [
        vi.name for vi in inferred.graph.value_info
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT and vi.name not in outs
    ]


def _rewire(m, old: str, new: str, share: float = 1.0, rng=None) -> None:
    for node in m.graph.node:
        if new in node.output:  # the node that makes `new` keeps reading `old`
            continue
        for i, name in enumerate(node.input):
            if name == old and (share >= 1.0 or rng.random() < share):
                node.input[i] = new


def _m_insert_noop(m, rng):
    """Valid: x -> (Identity | Add 0 | Mul 1 | Dropout | Cast float | Sub 0 | Div 1) -> consumers."""
    names = _float_values(m)
    if not names:
        return None
    name = rng.choice(names)
    new = f"{name}_fuzz_noop{rng.randrange(10**6)}"
    kind = rng.choice(["Identity", "Add", "Mul", "Dropout", "Cast", "Sub", "Div"])
    idx = next((i for i, n in enumerate(m.graph.node) if name in n.output), None)
    if idx is None:
        return None
    if kind in ("Add", "Sub", "Mul", "Div"):
        c = f"{new}_c"
        value = 0.0 if kind in ("Add", "Sub") else 1.0
        m.graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), c))
        node = helper.make_node(kind, [name, c], [new])
    elif kind == "Cast":
        node = helper.make_node("Cast", [name], [new], to=TensorProto.FLOAT)
    else:
        node = helper.make_node(kind, [name], [new])
    m.graph.node.insert(idx + 1, node)
    _rewire(m, name, new)
    return f"insert no-op {kind} after {name}"


def _m_duplicate_subexpression(m, rng):
    """Valid: a copy of a node with new output names feeds some of the original's consumers."""
    cands = [i for i, n in enumerate(m.graph.node) if len(n.output) == 1 and n.op_type not in ("If", "Loop", "Scan")]
    if not cands:
        return None
    i = rng.choice(cands)
    node = m.graph.node[i]
    if node.output[0] in {o.name for o in m.graph.output}:
        return None
    dup = copy.deepcopy(node)
    dup.name = (node.name or node.op_type) + "_fuzz_dup"
    dup.output[0] = node.output[0] + "_fuzz_dup"
    m.graph.node.insert(i + 1, dup)
    _rewire(m, node.output[0], dup.output[0], share=0.5, rng=rng)
    return f"duplicate subexpression {node.op_type}"


def _m_make_dynamic(m, rng):
    """Valid: a fixed input dimension becomes symbolic."""
    # Only the batch dimension: generated inputs then keep the shape the weights need.
    dims = [(vi, vi.type.tensor_type.shape.dim[0]) for vi in m.graph.input
            if vi.type.tensor_type.shape.dim and vi.type.tensor_type.shape.dim[0].HasField("dim_value")
            and vi.type.tensor_type.shape.dim[0].dim_value == 1]
    if not dims:
        return None
    vi, d = rng.choice(dims)
    d.dim_param = f"fuzz_{vi.name}_{rng.randrange(100)}"
    return f"make a dim of {vi.name} dynamic"


def _m_initializer_to_constant(m, rng):
    """Valid: an initializer becomes a Constant node (as older exporters write weights)."""
    if not m.graph.initializer:
        return None
    inputs = {i.name for i in m.graph.input}
    cands = [t for t in m.graph.initializer if t.name not in inputs]
    if not cands:
        return None
    t = rng.choice(cands)
    m.graph.initializer.remove(t)
    m.graph.node.insert(0, helper.make_node("Constant", [], [t.name], value=t))
    return f"initializer {t.name} as Constant"


PROTO_MUTATIONS = [
    _m_drop_input, _m_empty_input, _m_rename_value, _m_rename_graph_input, _m_change_attribute, _m_change_dtype,
    _m_remove_initializer, _m_add_cycle, _m_delete_node, _m_duplicate_node, _m_change_op, _m_change_dim,
    _m_change_rank, _m_change_opset, _m_ir_version, _m_swap_nodes, _m_initializer_data, _m_wrong_value_info,
    _m_graph_output,
]
# Mutations that keep the model valid: they exercise the passes on unusual graphs.
VALID_MUTATIONS = [_m_insert_noop, _m_duplicate_subexpression, _m_make_dynamic, _m_initializer_to_constant]


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One mutated model: 25% byte-level, 35% valid-preserving, 40% one to three proto-level mutations."""
    roll = rng.random()
    if roll < 0.35:
        m = onnx.ModelProto()
        m.ParseFromString(data)
        done = [w for w in (rng.choice(VALID_MUTATIONS)(m, rng) for _ in range(rng.randint(1, 4))) if w]
        if rng.random() < 0.3:  # and sometimes one breaking change on top
            done.append(rng.choice(PROTO_MUTATIONS)(m, rng) or "")
        return m.SerializeToString(), "; ".join(d for d in done if d) or "no-op"
    if roll < 0.6:
        fn = rng.choice(BYTE_MUTATIONS)
        return fn(data, rng)
    m = onnx.ModelProto()
    m.ParseFromString(data)
    done = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        for _attempt in range(5):
            fn = rng.choice(PROTO_MUTATIONS)
            what = fn(m, rng)
            if what:
                done.append(what)
                break
    return m.SerializeToString(), "; ".join(done) or "no-op"


# --------------------------------------------------------------------------- running


@dataclasses.dataclass
class FuzzResult:
    index: int
    seed_model: str
    mutation: str
    command: str
    outcome: str  # "error" (clean refusal) | "valid" (a correct model) | "ok" (inspect) | "FAIL: ..."
    rc: int | None = None
    stderr: str = ""
    seconds: float = 0.0
    rolled_back: list[str] = dataclasses.field(default_factory=list)  # the safety net caught a pass

    @property
    def failed(self) -> bool:
        return self.outcome.startswith("FAIL")


def _alarm(signum, frame):
    raise CaseTimeout()


def _run_cli(argv: list[str], timeout: float) -> tuple[int | None, str, str, str]:
    """(rc, stdout, stderr, problem) of one in-process CLI run under an alarm."""
    from onnxopt.cli import main

    out, err = io.StringIO(), io.StringIO()
    problem = ""
    rc = None
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    except CaseTimeout:
        problem = f"hang: no result within {timeout:.0f} s"
    except BaseException as e:  # main() must never raise
        problem = f"main() raised {type(e).__name__}: {str(e)[:200]} at {_where(e)}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return rc, out.getvalue(), err.getvalue(), problem


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    return " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in tb[-3:][::-1]) if tb else "?"


def _judge_failure(rc, stderr, out_path: pathlib.Path | None, folder: pathlib.Path) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if rc == 3:
        return f"FAIL: internal error: {lines[-1] if lines else ''}"
    if rc not in (1, 2):
        return f"FAIL: exit status {rc}"
    if len(lines) != 1 or not lines[0].startswith("onnxopt: error: "):
        return f"FAIL: stderr is not one error line: {stderr[:300]!r}"
    if "Traceback" in stderr:
        return "FAIL: traceback on stderr"
    if out_path is not None and (out_path.exists() or pathlib.Path(str(out_path) + ".data").exists()):
        return "FAIL: output written although the command failed"
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".onnxopt-tmp-")]
    if leftovers:
        return f"FAIL: temporary files left: {leftovers}"
    return "error"


def _judge_output(model_path: pathlib.Path, out_path: pathlib.Path) -> str:
    """The optimized model must be valid and give the mutant's answers."""
    import onnxruntime as ort

    from onnxopt.inputs import make_sample_inputs
    from onnxopt.model_io import load_model
    from onnxopt.verify import compare_outputs

    if not out_path.exists():
        return "FAIL: exit 0 but no output file"
    try:
        onnx.checker.check_model(onnx.load(str(out_path)))
    except Exception as e:
        return f"FAIL: output fails the checker: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        new = ort.InferenceSession(str(out_path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        try:
            ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        except Exception:
            return "valid"  # (--no-verify) the input did not load either: nothing was lost
        return f"FAIL: ORT cannot load the output: {str(e)[:200]}"
    try:
        feeds = make_sample_inputs(load_model(model_path))
        ref_sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        ref = dict(zip([o.name for o in ref_sess.get_outputs()], ref_sess.run(None, feeds)))
    except Exception:
        return "valid"  # the mutant itself does not run on generated inputs: nothing to compare
    try:
        got = dict(zip([o.name for o in new.get_outputs()], new.run(None, feeds)))
    except Exception as e:
        return f"FAIL: the output does not run where the input did: {str(e)[:200]}"
    for d in compare_outputs(ref, got, rtol=1e-4, atol=1e-5):
        if not d.within:
            return f"FAIL: output {d.name} differs (max abs {d.max_abs:.3g}, shapes {d.shape_ref} vs {d.shape_new})"
    return "valid"


# What a successful run may print on stderr (the rest goes to stdout).
# The fuzzer quantizes with --calib random on purpose, so the CLI's warning about it is expected.
_EXPECTED_STDERR = ("wrote ", "rolled back ", "warning ", "onnxopt: warning: calibrated on random data")


def _judge_loadable(out_path: pathlib.Path) -> str:
    """A quantized or pruned model (its answers differ from the mutant's by design) must
    check and load."""
    import onnxruntime as ort

    if not out_path.exists():
        return "FAIL: exit 0 but no output file"
    try:
        onnx.checker.check_model(onnx.load(str(out_path)))
        so = ort.SessionOptions()
        so.log_severity_level = 4
        ort.InferenceSession(str(out_path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        return f"FAIL: output does not check/load: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}"
    return "valid"


def run_case(index: int, seed_name: str, data: bytes, mutation: str, workdir: pathlib.Path,
             timeout: float = CASE_TIMEOUT_S, optimize_flags: tuple[str, ...] = (),
             quantize: bool = False, prune: bool = False) -> list[FuzzResult]:
    folder = workdir / f"case{index}"
    folder.mkdir(parents=True, exist_ok=True)
    model_path = folder / "model.onnx"
    model_path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    results = []
    out_path = folder / "out.onnx"
    commands = [
        ("optimize", ["optimize", str(model_path), "-o", str(out_path), *optimize_flags]),
        ("inspect", ["inspect", str(model_path)]),
    ]
    if quantize:
        commands.append(("quantize", ["quantize", str(model_path), "-o", str(out_path), "--calib", "random",
                                      "--quiet", "--samples", "2"]))
    if prune:
        commands.append(("prune", ["prune", str(model_path), "-o", str(out_path), "--ratio", "0.3", "--multiple", "1",
                                   "--quiet"]))
    for command, argv in commands:
        if out_path.exists():
            out_path.unlink()
        start = time.perf_counter()
        rc, _, err, problem = _run_cli(argv, timeout)
        if problem:
            outcome = f"FAIL: {problem}"
        elif rc == 0:
            if command == "optimize":
                outcome = _judge_output(model_path, out_path)
            elif command in ("quantize", "prune"):
                outcome = _judge_loadable(out_path)
            else:
                outcome = "ok"
            noise = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(_EXPECTED_STDERR)]
            if noise and not outcome.startswith("FAIL"):
                outcome = f"FAIL: unexpected output on stderr of a successful run: {noise[0][:200]}"
        else:
            outcome = _judge_failure(rc, err, out_path if command != "inspect" else None, folder)
        if hashlib.sha256(model_path.read_bytes()).hexdigest() != digest:
            outcome = "FAIL: the input file was modified"
        # A pass the safety net rolled back produced a wrong or crashing model: not a failure
        # of the command (the output is right), but a finding for the pass's author.
        rolled = [ln.strip()[len("rolled back "):][:300] for ln in err.splitlines() if ln.startswith("rolled back ")]
        results.append(FuzzResult(index, seed_name, mutation, command, outcome, rc,
                                  err.strip().splitlines()[0][:300] if err.strip() else "",
                                  time.perf_counter() - start, rolled))
    shutil.rmtree(folder, ignore_errors=True)
    return results


def fuzz(cases: int, seed: int = 0, *, workdir: str | os.PathLike | None = None, real_share: float = 0.15,
         timeout: float = CASE_TIMEOUT_S, progress=None, include_real: bool = True,
         optimize_flags: tuple[str, ...] = (), quantize: bool = False, prune: bool = False) -> list[FuzzResult]:
    """Run ``cases`` mutated models (deterministic for a seed); returns every command's result."""
    import logging

    import onnxruntime

    logging.disable(logging.WARNING)
    onnxruntime.set_default_logger_severity(4)
    seeds = seed_models(include_real)
    small = [k for k in seeds if k != "ppocr_cls"]
    rng = random.Random(seed)
    results: list[FuzzResult] = []
    with tempfile.TemporaryDirectory(prefix="onnxopt-fuzz-", dir=workdir) as tmp:
        for i in range(cases):
            name = "ppocr_cls" if "ppocr_cls" in seeds and rng.random() < real_share else rng.choice(small)
            data, what = mutate(seeds[name], rng)
            if progress:
                progress(i, name, what)
            results.extend(run_case(i, name, data, what, pathlib.Path(tmp), timeout, optimize_flags, quantize, prune))
    return results


def _limit_memory(gb: float) -> None:
    try:
        import resource

        limit = int(gb * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Fuzz onnxopt optimize/inspect with mutated models.")
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real-share", type=float, default=0.15, help="share of cases mutating the PP-OCR classifier")
    ap.add_argument("--timeout", type=float, default=CASE_TIMEOUT_S, help="seconds per command")
    ap.add_argument("--max-memory-gb", type=float, default=6.0)
    ap.add_argument("--json", help="write every result here")
    ap.add_argument("--no-verify", action="store_true",
                    help="optimize with --no-verify: the passes alone must keep the answers (no safety net)")
    ap.add_argument("--verify-each", action="store_true", help="optimize with --verify (check after every pass)")
    ap.add_argument("--quantize", action="store_true", help="also run quantize (random calibration) on every mutant")
    ap.add_argument("--prune", action="store_true", help="also run prune --ratio 0.3 (no calibration) on every mutant")
    ap.add_argument("--progress", help="append 'index seed mutation' lines here before each case (finds a crash)")
    args = ap.parse_args(argv)
    _limit_memory(args.max_memory_gb)

    def progress(i, name, what):
        if args.progress:
            with open(args.progress, "a") as f:
                f.write(f"{i} {name} {what}\n")

    start = time.perf_counter()
    flags = ("--no-verify",) if args.no_verify else ("--verify",) if args.verify_each else ()
    results = fuzz(args.cases, args.seed, real_share=args.real_share, timeout=args.timeout, progress=progress,
                   optimize_flags=flags, quantize=args.quantize, prune=args.prune)
    failures = [r for r in results if r.failed]
    counts: dict[str, int] = {}
    for r in results:
        key = f"{r.command}:{r.outcome.split(':')[0]}"
        counts[key] = counts.get(key, 0) + 1
    print(f"{args.cases} cases (seed {args.seed}) in {time.perf_counter() - start:.1f} s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for r in failures:
        print(f"case {r.index} [{r.seed_model}: {r.mutation}] {r.command}: {r.outcome}")
    caught = [r for r in results if r.rolled_back]
    if caught:
        print(f"passes rolled back by the safety net in {len(caught)} cases (pass bugs; outputs were right):")
        for r in caught:
            for line in r.rolled_back:
                print(f"  case {r.index} [{r.seed_model}: {r.mutation}]: {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
