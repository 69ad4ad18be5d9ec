"""Write QDQ: int8 weights as initializers behind DequantizeLinear, shared Q/DQ on activations.

Layout, chosen so ONNX Runtime's QDQ fusions fire (checked in the tests against ORT's
optimized graph):

- weight ``W`` -> initializer ``W_quantized`` (int8) + ``W_scale`` (float32, per channel) +
  ``W_zero_point`` (int8 zeros) -> ``DequantizeLinear(axis=...)`` -> the layer. The weight is
  quantized here, once; nothing is left for the runtime to quantize.
- activation ``X`` -> one ``QuantizeLinear`` -> one ``DequantizeLinear`` per tensor, shared by
  every quantized consumer (Q, K and V projections read the same LayerNorm output through one
  pair). Float consumers of ``X`` (a residual Add) keep reading ``X``.
- a quantized Conv's output gets its own Q/DQ (QLinearConv needs DQ -> Conv -> Q), and all
  its consumers read the DQ; an absorbed Relu/Clip is removed, its range (starting at 0) is
  the Q's range.
- a scalar affine ``a*x + b`` (``a > 0``: a ``Mul`` and/or ``Add`` by scalar constants, e.g.
  PP-LCNetV3's "learnable affine blocks" after hard-swish) whose output only quantized Convs
  read is done by the quantizer instead of two float ops (:func:`_scalar_affine`): the Q
  reads ``x`` with scale ``s/a`` and zero point ``z + round(b/s)``, the DQ keeps ``(s, z)``,
  and the rounding left of ``b`` (at most ``s/2``) goes into each Conv's bias (exact except
  on zero-padded border pixels).
- Conv/Gemm bias -> int32 initializer with scale = input scale * weight scale (per channel),
  zero point 0, behind a DequantizeLinear; quantized in a separate step
  (:func:`quantize_biases`) so bias correction can edit the float bias in between.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxopt.quantization.analysis import Layer
from onnxopt.quantization.opset import raise_ir_version
from onnxopt.quantization.scheme import Scheme, activation_qparams, dequantize_weight, quantize_weight
from onnxopt.verify import release_mappings


@dataclasses.dataclass
class QuantLayer:
    """A layer as quantized in the QDQ model (what hooks and the report see)."""

    name: str
    op_type: str
    node: ir.Node
    weight_name: str
    axis: int | None
    weight_scale: np.ndarray
    input_scale: float
    input_zero_point: int
    float_tensor: ir.TensorProtocol  # the float model's weight (shared, not copied)
    quantized_weight: ir.Value  # the int8 initializer feeding the weight's DequantizeLinear
    bias_name: str | None
    _dequantized: np.ndarray | None = dataclasses.field(default=None, repr=False)

    # Both weights are computed on access, not stored: holding a float copy and a dequantized
    # copy of every weight tripled the quantizer's peak memory on large models (0.8 GB model:
    # 2.8 GB peak). An external float weight is a view on its memory-mapped file.
    @property
    def float_weight(self) -> np.ndarray:
        return np.asarray(self.float_tensor.numpy(), dtype=np.float32)

    @property
    def dequantized_weight(self) -> np.ndarray:
        """The weight as the int8 model computes it (a hook that re-rounds may set it)."""
        if self._dequantized is not None:
            return self._dequantized
        return dequantize_weight(self.quantized_weight.const_value.numpy(), self.weight_scale, self.axis)

    @dequantized_weight.setter
    def dequantized_weight(self, value: np.ndarray) -> None:
        self._dequantized = value


def clone_model(model: ir.Model) -> ir.Model:
    return model.clone()


def with_outputs(model: ir.Model, names: Iterable[str]) -> ir.Model:
    """A clone of ``model`` (sharing its tensors) with the float tensors ``names`` added as outputs.

    A clone, not an ``ir.to_proto``/``ir.from_proto`` round trip: that copies every in-memory
    weight into the proto and loses the folder external weights are resolved against.
    """
    clone = clone_model(model)
    graph = clone.graph
    values = {v.name: v for v in graph.inputs}
    for node in graph:
        for v in node.outputs:
            values[v.name] = v
    existing = {v.name for v in graph.outputs}
    for name in dict.fromkeys(names):
        if name in existing:
            continue
        value = values[name]
        if value.type is None:
            value.dtype = ir.DataType.FLOAT
        graph.outputs.append(value)
    return clone


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape))
    value.dtype = ir.tensor(array).dtype
    graph.register_initializer(value)
    return value


def _unique(base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    taken.add(name)
    return name


# Fold a scalar affine read only by quantized Convs into their activation quantizer (see the
# module docstring); a switch for benchmarks/det_cnn_defaults.py's step-by-step measurement.
FOLD_SCALAR_AFFINE = True


def _scalar_of(value: ir.Value | None) -> float | None:
    if value is None or value.const_value is None or not value.is_initializer():
        return None
    arr = value.const_value.numpy()
    if arr.size != 1 or arr.dtype.kind != "f":
        return None
    v = float(arr.reshape(-1)[0])
    return v if np.isfinite(v) else None


def _scalar_affine(tensor: ir.Value) -> tuple[ir.Value, float, float, list[ir.Node]] | None:
    """``tensor = a*x + b`` by at most one ``Mul`` and one ``Add`` with scalar constants (either
    order), every intermediate read only by the next op: ``(x, a, b, nodes)``, or None."""
    a, b, nodes, cur = 1.0, 0.0, [], tensor
    seen: set[str] = set()
    while len(nodes) < 2:
        node = cur.producer()
        if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in ("Mul", "Add") \
                or node.op_type in seen or len(node.inputs) != 2:
            break
        if nodes and (len(list(cur.uses())) != 1 or cur.is_graph_output()):
            break
        k0, k1 = _scalar_of(node.inputs[0]), _scalar_of(node.inputs[1])
        if (k0 is None) == (k1 is None):
            break
        k, other = (k0, node.inputs[1]) if k0 is not None else (k1, node.inputs[0])
        # tensor = a*cur + b, walking back: cur = k*other or cur = other + k
        if node.op_type == "Mul":
            a = a * k
        else:
            b = b + a * k
        seen.add(node.op_type)
        nodes.append(node)
        cur = other
    if not nodes or not a > 0 or cur.dtype not in (None, ir.DataType.FLOAT):
        return None
    return cur, a, b, nodes


def build_qdq(
    float_model: ir.Model,
    layers: list[Layer],
    ranges: dict[str, tuple[float, float]],
    scheme: Scheme,
    glue: Sequence = (),
) -> tuple[ir.Model, list[QuantLayer]]:
    """A new model with ``layers`` in QDQ form (``float_model`` is not modified).

    ``ranges``: {tensor: (lo, hi)} for every layer's input and quantized output range tensor.
    ``glue``: :class:`onnxopt.quantization.glue.GlueNode` s whose activation inputs and output
    get Q/DQ too (ranges in ``ranges``; a Resize output reuses its input's parameters).
    """
    model = clone_model(float_model)
    raise_ir_version(model)  # IR 3 (opset <= 8 exports) would demand every new initializer as an input
    graph = model.graph
    nodes = {n.name: n for n in graph}
    values = {v.name: v for v in graph.inputs}
    for n in graph:
        for v in n.outputs:
            values[v.name] = v
    taken = set(values) | set(graph.initializers)
    new_nodes: list[ir.Node] = []
    dq_of: dict[str, tuple[ir.Value, float, int]] = {}  # activation -> (DQ output, scale, zp)
    made: dict[str, tuple[ir.Value, float, int]] = {}  # DQ output name -> the same
    residual: dict[str, float] = {}  # activation -> b - s*round(b/s) of a folded scalar affine

    # Scalar affines the quantizer can absorb: only quantized Convs read the result.
    act_readers: dict[str, set[str]] = {}
    for layer in layers:
        act_readers.setdefault(layer.act_input, set()).add(layer.op_type)
    foldable: dict[str, tuple[ir.Value, float, float]] = {}
    if FOLD_SCALAR_AFFINE and not scheme.symmetric_activations:
        conv_inputs = {l.name: l.act_input for l in layers if l.op_type == "Conv"}
        for name, ops in act_readers.items():
            value = values.get(name)
            if ops != {"Conv"} or value is None or value.is_graph_output():
                continue
            users = list(value.uses())
            if not users or any(conv_inputs.get(u.name) != name or idx != 0 for u, idx in users):
                continue
            found = _scalar_affine(value)
            if found is not None:
                foldable[name] = found[:3]

    def qdq(tensor: ir.Value, range_name: str | None, params=None) -> tuple[ir.Value, float, int]:
        if tensor.name in dq_of:
            return dq_of[tensor.name]
        if tensor.name in made:  # already the DQ of a quantized Conv output (absorbed Relu)
            return made[tensor.name]
        if params is not None:
            scale, zp = np.float32(params[0]), int(params[1])
        else:
            lo, hi = ranges[range_name]
            scale, zp = activation_qparams(lo, hi, scheme)
        base = tensor.name
        s = _initializer(graph, _unique(f"{base}_scale", taken), np.array(scale, dtype=np.float32))
        z = _initializer(graph, _unique(f"{base}_zero_point", taken), np.array(zp, dtype=scheme.act_numpy))
        q_in, q_s, q_z = tensor, s, z
        if tensor.name in foldable:
            x, a, b = foldable[tensor.name]
            shift = int(round(b / float(scale)))
            if 0 <= zp + shift <= 255:
                # q = round(x / (s/a)) + z + shift  ~  round((a x + b) / s) + z
                q_in = x
                q_s = _initializer(graph, _unique(f"{base}_folded_scale", taken),
                                   np.array(np.float32(scale) / np.float32(a), dtype=np.float32))
                q_z = _initializer(graph, _unique(f"{base}_folded_zero_point", taken),
                                   np.array(zp + shift, dtype=scheme.act_numpy))
                residual[tensor.name] = b - float(scale) * shift
        q = ir.node("QuantizeLinear", [q_in, q_s, q_z], name=_unique(f"{base}_QuantizeLinear", taken))
        q.outputs[0].name = _unique(f"{base}_quantized", taken)
        dq = ir.node("DequantizeLinear", [q.outputs[0], s, z], name=_unique(f"{base}_DequantizeLinear", taken))
        dq.outputs[0].name = _unique(f"{base}_dequantized", taken)
        if tensor.dtype is not None:  # annotate only what the float graph annotated
            dq.outputs[0].dtype = tensor.dtype
            dq.outputs[0].shape = tensor.shape
        new_nodes.extend([q, dq])
        dq_of[tensor.name] = made[dq.outputs[0].name] = (dq.outputs[0], float(scale), int(zp))
        return dq_of[tensor.name]

    weight_dq: dict[str, tuple[ir.Value, np.ndarray, np.ndarray, np.ndarray]] = {}
    qlayers: list[QuantLayer] = []
    for layer in layers:
        node = nodes[layer.name]
        axis = layer.axis if scheme.per_channel else None
        if layer.weight not in weight_dq:
            w_tensor = graph.initializers[layer.weight].const_value
            q, scale = quantize_weight(w_tensor.numpy(), axis)  # (no float copy kept)
            if isinstance(w_tensor, ir.ExternalTensor):
                # Unmap its file pages now (they remap on the next read): otherwise every float
                # weight stays resident next to its int8 copy until the end.
                try:
                    w_tensor.release()
                except BufferError:  # someone still holds a view
                    pass
            wq = _initializer(graph, _unique(f"{layer.weight}_quantized", taken), q)
            ws = _initializer(graph, _unique(f"{layer.weight}_scale", taken), scale)
            wz = _initializer(graph, _unique(f"{layer.weight}_zero_point", taken), np.zeros(scale.shape, np.int8))
            attrs = {"axis": axis} if axis is not None else {}
            dq = ir.node("DequantizeLinear", [wq, ws, wz], attributes=attrs,
                         name=_unique(f"{layer.weight}_DequantizeLinear", taken))
            dq.outputs[0].name = _unique(f"{layer.weight}_dequantized", taken)
            dq.outputs[0].dtype = ir.DataType.FLOAT
            dq.outputs[0].shape = ir.Shape(q.shape)
            new_nodes.append(dq)
            del q
            weight_dq[layer.weight] = (dq.outputs[0], scale, w_tensor, wq)
        w_dq, w_scale, w_tensor, wq = weight_dq[layer.weight]
        x = node.inputs[0]
        x_dq, x_scale, x_zp = qdq(x, layer.act_input)
        node.replace_input_with(0, x_dq)
        node.replace_input_with(1, w_dq)
        if layer.quantizes_output:
            out = node.outputs[0]
            if layer.absorbed_activation:
                act = nodes[layer.absorbed_activation]
                act_out = act.outputs[0]
                # The Q reads the Conv output with the activation's range; the Relu goes.
                y_dq, _, _ = qdq(out, layer.out_range_tensor)
                act_out.replace_all_uses_with(y_dq)
                graph.remove(act, safe=True)
            else:
                y_dq, _, _ = qdq(out, layer.out_range_tensor)
                _read_through(out, y_dq)
        bias_name = layer.bias
        if residual.get(layer.act_input):
            bias_name = _add_residual_to_bias(graph, node, layer, residual[layer.act_input], wq, w_scale, axis, taken)
        qlayers.append(QuantLayer(layer.name, layer.op_type, node, layer.weight, axis, w_scale, x_scale, x_zp,
                                  w_tensor, wq, bias_name))
    for g in glue:
        node = nodes.get(g.name)
        if node is None:
            continue
        in_params = None
        for idx, tname in g.inputs:
            v_dq, v_scale, v_zp = qdq(node.inputs[idx], tname)
            node.replace_input_with(idx, v_dq)
            in_params = (v_scale, v_zp)
        out = node.outputs[0]
        y_dq, _, _ = qdq(out, g.output, params=in_params if g.op_type == "Resize" else None)
        _read_through(out, y_dq)
    for n in new_nodes:
        graph.append(n)
    common.TopologicalSortPass()(model)
    common.RemoveUnusedNodesPass()(model)
    release_mappings(float_model)  # the float weights' file pages: read once, not needed now
    return model, qlayers


def _read_through(out: ir.Value, y_dq: ir.Value) -> None:
    """Every reader of ``out`` but its own QuantizeLinear reads the DequantizeLinear ``y_dq``."""
    q_node = y_dq.producer().inputs[0].producer()
    for user, idx in list(out.uses()):
        if user is not q_node:
            user.replace_input_with(idx, y_dq)


def _add_residual_to_bias(graph: ir.Graph, node: ir.Node, layer: Layer, e: float, wq: ir.Value,
                          w_scale: np.ndarray, axis: int | None, taken: set[str]) -> str:
    """The Conv's DQ input reads ``y - e`` (a folded affine's rounding): ``bias += e * sum W[o]``
    with the int8 weights the model computes with, in a new initializer (the float model's
    bias tensor is shared with the clone and must not change)."""
    w = dequantize_weight(wq.const_value.numpy(), w_scale, axis).astype(np.float64)
    add = e * w.reshape(w.shape[0], -1).sum(axis=1)
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    old = bias.const_value.numpy().astype(np.float64) if bias is not None and bias.const_value is not None else 0.0
    name = _unique(f"{layer.name}_folded_bias", taken)
    value = _initializer(graph, name, (old + add).astype(np.float32))
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, value)
    return name


def shield_matmul_biases(model: ir.Model, qlayers: list[QuantLayer]) -> int:
    """Give a quantized N-D MatMul's bias the output's rank (``[N]`` -> ``[1, 1, N]``); returns how many.

    ONNX Runtime's MatMulAddFusion turns ``MatMul(A, W) + b`` with a statically shaped N-D
    ``A`` and a 1-D ``b`` into Reshape -> Gemm -> Reshape *before* its QDQ fusions run. The
    Reshape then sits between the activation's DequantizeLinear and the Gemm, so nothing
    fuses: both DequantizeLinear nodes and a float Gemm run, and a static-shape transformer
    came out 2x slower than fp32 (MiniLM at [1, 128]: 22 ms against 10 ms). That fusion
    only accepts a 1-D bias for N-D inputs, so a bias of shape ``[1, ..., 1, N]`` keeps
    ``MatMul + Add`` as is and the MatMul becomes MatMulIntegerToFloat. Exact: adding
    ``[N]`` or ``[1, ..., 1, N]`` to a rank-r output (r >= the new rank) broadcasts alike.
    Only where ``A``'s shape is static (the only case that fusion takes): elsewhere the 1-D
    bias stays, since ORT's BiasGelu fusion wants one (MiniLM: 6 fewer Adds).
    """
    if not any(ql.op_type == "MatMul" for ql in qlayers):
        return 0
    from onnxopt.graph import annotated_intermediates, drop_new_annotations
    from onnxopt.passes._shapes import infer_shapes, shape_of

    annotated = annotated_intermediates(model)
    inferred = infer_shapes(model)
    # Inference writes shapes onto the values; saved, they would let ONNX Runtime fuse
    # SkipLayerNormalization (slower, see drop_new_annotations): keep only what was there.
    drop_new_annotations(model, annotated)
    graph = model.graph
    taken = set(graph.initializers) | {v.name for n in graph for v in n.outputs}
    count = 0
    for ql in qlayers:
        if ql.op_type != "MatMul":
            continue
        out = ql.node.outputs[0]
        a_shape = shape_of(ql.node.inputs[0], inferred)
        rank = len(a_shape) if a_shape is not None else None
        users = list(out.uses())
        if rank is None or rank < 3 or len(users) != 1 or out.is_graph_output():
            continue
        if not all(isinstance(d, int) for d in a_shape):
            continue  # the fusion needs a static shape; a 1-D bias keeps ORT's BiasGelu fusion
        add, idx = users[0]
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
            continue
        bias = add.inputs[1 - idx]
        if bias is None or bias.const_value is None or bias.is_graph_input() or len(bias.shape or ()) != 1:
            continue
        b = bias.const_value.numpy()
        new = _initializer(graph, _unique(f"{bias.name}_rank{rank}", taken), b.reshape((1,) * (rank - 1) + b.shape))
        add.replace_input_with(1 - idx, new)
        count += 1
    common.RemoveUnusedNodesPass()(model)
    return count


def quantize_biases(model: ir.Model, qlayers: list[QuantLayer]) -> int:
    """Conv/Gemm float biases -> int32 behind DequantizeLinear; returns how many."""
    graph = model.graph
    taken = set(graph.initializers) | {v.name for n in graph for v in n.outputs}
    count = 0
    for ql in qlayers:
        if ql.bias_name is None or ql.op_type not in ("Conv", "Gemm"):
            continue
        node = ql.node
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        if bias_value is None or bias_value.const_value is None:
            continue
        b = bias_value.const_value.numpy().astype(np.float64)
        scale = (np.float64(ql.input_scale) * np.asarray(ql.weight_scale, np.float64)).astype(np.float32)
        scale = np.broadcast_to(scale, b.shape).astype(np.float32) if ql.axis is not None else scale
        q = np.rint(b / scale.astype(np.float64))
        if np.any(np.abs(q) > 2**31 - 1):
            continue  # would overflow int32: keep the float bias
        bq = _initializer(graph, _unique(f"{bias_value.name}_quantized", taken), q.astype(np.int32))
        bs = _initializer(graph, _unique(f"{bias_value.name}_scale", taken), scale)
        bz = _initializer(graph, _unique(f"{bias_value.name}_zero_point", taken), np.zeros(scale.shape, np.int32))
        attrs = {"axis": 0} if scale.ndim == 1 else {}
        dq = ir.node("DequantizeLinear", [bq, bs, bz], attributes=attrs,
                     name=_unique(f"{bias_value.name}_DequantizeLinear", taken))
        dq.outputs[0].name = _unique(f"{bias_value.name}_dequantized", taken)
        dq.outputs[0].dtype = ir.DataType.FLOAT
        graph.insert_before(node, dq)
        node.replace_input_with(2, dq.outputs[0])
        count += 1
    common.RemoveUnusedNodesPass()(model)
    return count
