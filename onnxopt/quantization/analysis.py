"""What to quantize: the layers ORT has int8 kernels for, and the tensors that must stay float.

Layers (each with a constant weight, an initializer after the float pipeline):

- ``Conv`` (weight [O, I/g, k...], per-channel axis 0): input and output get Q/DQ so ONNX
  Runtime fuses DQ -> Conv -> Q into ``QLinearConv``. A ``Relu`` that is the Conv's only
  consumer is absorbed by an asymmetric (uint8) output quantizer whose range starts at 0,
  as ORT's own quantizer does; the Q after it saturates negatives to the zero point.
- ``MatMul`` with a constant 2-D right operand (per-channel axis 1): Q/DQ on the activation
  and DQ on the weight only; ORT fuses this into ``MatMulIntegerToFloat`` (float output, so
  the following bias Add, GELU and LayerNorm stay float and exact).
- ``Gemm`` with a constant B (axis 0 if transB else 1), alpha = 1, transA = 0.

Tensors kept float, whatever the user asks (the reason goes into the report):

- additive attention-mask paths: everything computed only from an integer/bool graph input
  that is not used as Gather indices (``attention_mask`` -> Cast -> Sub -> Mul by -10000, or
  Where(mask, 0, -inf)), plus the Add that applies such a mask and the Softmax after it;
- Softmax inputs (exponentials of quantized scores lose the top of the distribution);
- tensors whose calibrated range is not finite (NaN/Inf seen) or saturated (|x| >= 1e4: an
  8-bit grid with a step of 40 or more carries no information), checked in the API once
  ranges are known (see :func:`unusable_range`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

import onnx_ir as ir

from onnxopt.errors import OnnxoptError

HUGE_RANGE = 1e4
_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


@dataclasses.dataclass
class Layer:
    """One quantizable node of the float model."""

    name: str
    op_type: str
    act_input: str  # the activation tensor quantized on the way in
    weight: str  # the constant weight (initializer) name
    axis: int  # per-channel axis of the weight
    bias: str | None = None  # Conv/Gemm bias initializer (quantized to int32)
    out_range_tensor: str | None = None  # Conv: tensor whose range quantizes the output
    absorbed_activation: str | None = None  # name of a Relu/Clip node folded into the output Q

    @property
    def quantizes_output(self) -> bool:
        return self.out_range_tensor is not None


def _const(value: ir.Value | None):
    if value is None:
        return None
    if value.const_value is not None and value.is_initializer():
        return value.const_value
    return None


def _is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in _FLOAT_TYPES


def find_layers(model: ir.Model, *, absorb_activations: bool = True) -> tuple[list[Layer], dict[str, str]]:
    """Quantizable layers of the main graph, and {node name: why not} for near misses.

    ``absorb_activations``: fold a Conv's Relu/Clip(0, .) into its output quantizer; only
    right for asymmetric (uint8) activations, whose zero point can sit at the range's 0.
    """
    layers: list[Layer] = []
    skipped: dict[str, str] = {}
    graph_outputs = {v.name for v in model.graph.outputs}
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        x = node.inputs[0]
        w = node.inputs[1] if len(node.inputs) > 1 else None
        wt = _const(w)
        # Conv/MatMul/Gemm take both operands of one type T, so the weight's dtype says what
        # the activation is even where the graph carries no annotation for it.
        if wt is None or wt.dtype not in _FLOAT_TYPES or (x is not None and x.dtype is not None and not _is_float(x)):
            skipped[node.name] = "no constant weight" if wt is None else "not a float layer"
            continue
        if x.is_initializer() or x.const_value is not None:
            skipped[node.name] = "both operands constant"
            continue
        if not np.all(np.isfinite(wt.numpy())):
            # int8 has no NaN/Inf: quantizing would silently change what the layer computes
            skipped[node.name] = "weight holds NaN/Inf"
            continue
        if node.op_type == "MatMul":
            if len(wt.shape) != 2:
                skipped[node.name] = f"weight has rank {len(wt.shape)} (needs 2)"
                continue
            layers.append(Layer(node.name, "MatMul", x.name, w.name, axis=1))
        elif node.op_type == "Gemm":
            attrs = node.attributes
            if attrs.get_int("transA", 0) or attrs.get_float("alpha", 1.0) != 1.0:
                skipped[node.name] = "Gemm with transA or alpha != 1"
                continue
            axis = 0 if attrs.get_int("transB", 0) else 1
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            b = _const(bias)
            use_bias = (
                b is not None and len(b.shape) == 1 and attrs.get_float("beta", 1.0) == 1.0
                and b.shape[0] == wt.shape[axis]
            )
            layers.append(Layer(node.name, "Gemm", x.name, w.name, axis=axis, bias=bias.name if use_bias else None))
        else:  # Conv
            if len(wt.shape) < 3:
                skipped[node.name] = "Conv weight rank < 3"
                continue
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            layer = Layer(node.name, "Conv", x.name, w.name, axis=0, bias=bias.name if _const(bias) is not None else None)
            out = node.outputs[0]
            consumers = list(out.consumers())
            act = consumers[0] if len(consumers) == 1 else None
            if (absorb_activations and act is not None and _absorbable_activation(act)
                    and out.name not in graph_outputs and act.outputs[0].name not in graph_outputs):
                layer.absorbed_activation = act.name
                layer.out_range_tensor = act.outputs[0].name
            elif out.name not in graph_outputs:
                layer.out_range_tensor = out.name
            layers.append(layer)
    return layers, skipped


def _absorbable_activation(node: ir.Node) -> bool:
    """Relu, or Clip(min=0) given as constants: the output quantizer can do their job."""
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "Relu":
        return True
    if node.op_type == "Clip":
        lo = _const(node.inputs[1]) if len(node.inputs) > 1 else None
        return lo is not None and float(lo.numpy().reshape(-1)[0]) == 0.0
    return False


def clip_max(model: ir.Model, node_name: str) -> float | None:
    """Upper bound of an absorbed Clip (None for Relu)."""
    for node in model.graph:
        if node.name == node_name and node.op_type == "Clip" and len(node.inputs) > 2:
            hi = _const(node.inputs[2])
            return float(hi.numpy().reshape(-1)[0]) if hi is not None else None
    return None


def mask_tensors(model: ir.Model) -> dict[str, str]:
    """{tensor name: reason} for additive-mask paths and Softmax inputs (kept float).

    Seeds: integer/bool graph inputs not used as Gather indices (token ids are; masks are
    not). A node's outputs are mask-derived when all its inputs that are neither constant
    nor shape arithmetic (Shape/Size and what is computed only from them) are. The Add
    that combines a mask-derived tensor with scores, and every Softmax input, are marked too.
    """
    derived: set[str] = set()
    for v in model.graph.inputs:
        if v.dtype in _FLOAT_TYPES or v.dtype is None:
            continue
        if any(n.op_type == "Gather" and i == 1 for n, i in v.uses()):
            continue
        derived.add(v.name)
    # Shape arithmetic (Shape/Size and what is computed only from them and constants) is
    # metadata, not data: a mask Expand-ed to the scores' shape is still only the mask.
    shape_like: set[str] = set()
    result: dict[str, str] = {}
    for node in model.graph:  # topological order
        live = [v for v in node.inputs if v is not None and v.const_value is None and not v.is_initializer()
                and v.name not in shape_like]
        if node.op_type in ("Shape", "Size") or not live:  # Constant nodes too
            shape_like.update(o.name for o in node.outputs)
            continue
        if live and all(v.name in derived for v in live):
            for out in node.outputs:
                derived.add(out.name)
                result[out.name] = "attention-mask path"
        elif node.op_type in ("Add", "Sub", "Where") and any(v.name in derived for v in live):
            for out in node.outputs:
                if any(c.op_type == "Softmax" for c in out.consumers()):
                    result[out.name] = "masked attention scores"
        if node.op_type == "Softmax":
            result.setdefault(node.inputs[0].name, "Softmax input")
    # Only float tensors matter for quantization.
    values = {v.name: v for n in model.graph for v in n.outputs}
    return {k: r for k, r in result.items() if k in values and (values[k].dtype is None or _is_float(values[k]))}


_GELU_OPS = {"Gelu", "FastGelu", "BiasGelu", "QuickGelu"}


def gelu_outputs(model: ir.Model) -> set[str]:
    """Outputs of GELU activations in the main graph: fused (``Gelu``, ORT's ``FastGelu`` /
    ``BiasGelu``) or as exported, ``x * 0.5 * (1 + erf(x / sqrt 2))`` or the tanh form
    (the final product, matched as the ``fuse-gelu`` pass matches it).

    Their distribution is one-sided (>= -0.17) with a long, sparse upper tail, so min-max
    spends most of an 8-bit grid on a few values (measured on MiniLM: an MSE-chosen range
    on them raises the embedding cosine; see docs/quantization.md).
    """
    from onnxopt.passes.fuse_transformer import is_gelu_product

    return {node.outputs[0].name for node in model.graph
            if node.op_type in _GELU_OPS or is_gelu_product(node)}


def unusable_range(stats) -> str | None:
    """Why a calibrated range cannot be quantized, or None."""
    if not stats.finite:
        return "range not finite (NaN/Inf seen in calibration)"
    if getattr(stats, "saturated", False):
        return "range saturated (mask-like values beyond 1e6 seen in calibration)"
    lo, hi = float(stats.min), float(stats.max)
    if not (abs(lo) < HUGE_RANGE and abs(hi) < HUGE_RANGE):
        return f"range saturated ([{lo:.3g}, {hi:.3g}])"
    return None


ORIGIN_KEY = "onnxopt.origin"  # node.meta: the user's node a quantizer rewrite made this one from
ORIGIN_OP_KEY = "onnxopt.origin_op"  # node.meta: that node's op type


def _origin(node: ir.Node | None, key: str = ORIGIN_KEY) -> str | None:
    return node.meta.get(key) if node is not None else None


# The float pipeline fuses MatMul + Add into Gemm (and the report then lists a Gemm): an op
# type given to --exclude names its whole family, so "MatMul" still finds the fused layer.
_OP_FAMILY = {"MatMul": "MatMul", "Gemm": "MatMul"}


def _family(op_type: str | None) -> str | None:
    return _OP_FAMILY.get(op_type, op_type) if op_type is not None else None


def check_exclusions(model: ir.Model, exclude) -> None:
    """Fail fast on ``--exclude`` entries that cannot name anything: not a node name or op
    type (family: MatMul/Gemm) of the user's model, nor a name the quantizer derives from one (``<name>_...``,
    as the report lists the convs it makes from a ConvTranspose pair). The exact check
    runs again on the transformed model (:func:`apply_exclusions`)."""
    if not exclude:
        return
    names = {n.name for n in model.graph if n.name}
    ops = {_family(n.op_type) for n in model.graph}
    for item in exclude:
        if item in names or _family(item) in ops or any(item.startswith(f"{n}_") for n in names):
            continue
        raise OnnxoptError(f"--exclude {item!r}: no node or op type of that name in the model")


def apply_exclusions(model: ir.Model, layers: list[Layer], exclude, nodes: dict[str, ir.Node] | None = None
                     ) -> tuple[list[Layer], dict[str, str]]:
    """Drop layers whose node name, op type or origin (the user's node a rewrite made it
    from) is in ``exclude``; every entry must match something in ``model``."""
    if not exclude:
        return layers, {}
    by_name = nodes if nodes is not None else {n.name: n for n in model.graph}
    names = set(by_name) | {o for o in (_origin(n) for n in model.graph) if o}
    ops = {_family(n.op_type) for n in model.graph} | {_family(_origin(n, ORIGIN_OP_KEY)) for n in model.graph}
    for item in exclude:
        if item not in names and _family(item) not in ops:
            raise OnnxoptError(f"--exclude {item!r}: no node or op type of that name in the model")
    keep, dropped = [], {}
    wanted = set(exclude)
    families = {_family(w) for w in wanted}
    for layer in layers:
        node = by_name.get(layer.name)
        if layer.name in wanted or _origin(node) in wanted or _family(layer.op_type) in families \
                or (_origin(node, ORIGIN_OP_KEY) is not None and _family(_origin(node, ORIGIN_OP_KEY)) in families):
            dropped[layer.name] = "excluded by the user"
        else:
            keep.append(layer)
    return keep, dropped


def is_quantized(model: ir.Model) -> str | None:
    """The first op that shows the model is already quantized, or None."""
    quant_ops = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"}
    for node in model.graph.all_nodes():
        if node.op_type in quant_ops or node.op_type.startswith("QLinear") or node.op_type == "MatMulIntegerToFloat":
            return node.op_type
    return None


def load_float_model(model_or_path, exclude, verb: str) -> ir.Model:
    """The user's model (loaded from a path or as given), refused when it is already quantized,
    with ``--exclude`` checked against it before any slow work; ``verb`` names the command."""
    from onnxopt.model_io import load_model

    src = model_or_path if isinstance(model_or_path, ir.Model) else load_model(model_or_path)
    already = is_quantized(src)
    if already:
        raise OnnxoptError(f"the model is already quantized (it contains {already}); {verb} the float model")
    check_exclusions(src, exclude)
    if verb == "quantize":
        half = _half_precision(src)
        if half:
            # Calibration, SmoothQuant and the QDQ scales all assume float32 activations; ORT
            # then refused the written model. Say so before any work.
            raise OnnxoptError(f"the model computes in {half}; int8 quantization here starts from float32: "
                               "quantize the model's float32 export")
    return src


_HALF = {ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}


def _half_precision(model: ir.Model) -> str | None:
    """'float16 (input x)' when the model's inputs or layer weights are half precision."""
    for value in model.graph.inputs:
        if value.dtype in _HALF:
            return f"{_HALF[value.dtype]} (input {value.name!r})"
    for node in model.graph:
        if node.op_type in ("Conv", "MatMul", "Gemm") and len(node.inputs) > 1 and node.inputs[1] is not None:
            if node.inputs[1].dtype in _HALF:
                return f"{_HALF[node.inputs[1].dtype]} (weights of {node.name or node.op_type})"
    return None
