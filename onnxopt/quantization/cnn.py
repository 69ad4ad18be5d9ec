"""Defaults for convolutional networks: what ``quantize`` does to a CNN before calibrating.

Measured on the PP-OCRv4 text detector (``docs/quantization.md``, PP-OCRv4 det section):

* **Hard-swish as one op.** Exporters write ``x * Clip(x + 3, 0, 6) / 6`` (HardSwish only
  exists from opset 14). Between two QLinearConvs ORT then runs Add, Clip, Mul (and the
  ``/ 6``) in float on full-resolution tensors; that float glue, not the convolutions, is
  where most of the int8 model's time went. :func:`prepare_opset` raises such a model to
  opset 14 before the float pipeline, whose ``fuse-hardswish`` pass then writes one
  ``HardSwish`` per activation (the float model alone gets 1.2x faster).
* **ConvTranspose pairs** (a DB head's two upsamplers) as two 1x1 Convs + one DepthToSpace
  (:func:`fuse_convtranspose_pair`, exact): ORT has no int8 ConvTranspose on CPU.
* **Float front** (:func:`float_front_layers`: a dense-prediction network's encoder, else
  the stem and the stride <= 8 convs after it) and **range rules**
  (:func:`clamp_to_consumers`, :func:`tailed_activation_tensors`), see their docstrings.
* **Cross-layer equalization** (:mod:`.equalization`) is available as ``equalize=True``
  but not a default: measured neutral to slightly negative with onnxopt's quantizer (see
  :func:`default_float_transforms`), though it was the big gain for ORT's quantize_static
  in ``benchmarks/det_quant_study.py``.

The scalar affine after each hard-swish (PP-LCNetV3's "learnable affine blocks") is folded
into the activation quantizer by :func:`onnxopt.quantization.qdq.build_qdq`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.graph import all_nodes, opset_version
from onnxopt.passes._fusion_util import const_array, scalar_value
from onnxopt.quantization import glue
from onnxopt.quantization.analysis import ORIGIN_KEY, ORIGIN_OP_KEY

__all__ = [
    "fuse_convtranspose_pair",
    "clamp_to_consumers",
    "convtranspose_to_conv",
    "count_decomposed_hardswish",
    "default_float_transforms",
    "float_front_layers",
    "front_strides",
    "prepare_opset",
    "tailed_activation_tensors",
]


def count_decomposed_hardswish(model: ir.Model) -> int:
    """How many ``Mul(x, Clip(Add(x, 3), 0, 6))`` (hard-swish before its ``/ 6``) the model has."""
    count = 0
    for node in all_nodes(model):
        if node.op_type != "Clip" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
            continue
        add = node.inputs[0].producer()
        if add is None or add.op_type != "Add" or len(add.inputs) != 2:
            continue
        k = [scalar_value(v) for v in add.inputs]
        if 3.0 not in k:
            continue
        x = add.inputs[1 - k.index(3.0)]
        if any(u.op_type == "Mul" and x in u.inputs for u, _ in node.outputs[0].uses()):
            count += 1
    return count


def prepare_opset(model: ir.Model, feed: dict | None, report: dict) -> ir.Model:
    """Raise a model with decomposed hard-swish from opset < 14 to 14, so the float pipeline's
    ``fuse-hardswish`` can fire; anything else is returned unchanged. Records what it did
    under ``report["cnn"]``."""
    from onnxopt.quantization.opset import ensure_opset

    found = count_decomposed_hardswish(model)
    before = opset_version(model)
    if not found or before is None or before >= 14:
        return model
    try:
        model, how = ensure_opset(model, 14, feeds=feed)
    except Exception as e:  # noqa: BLE001 - a failed upgrade only costs speed
        report.setdefault("cnn", {})["hardswish_opset"] = f"not raised ({str(e).splitlines()[0][:120]})"
        return model
    report.setdefault("cnn", {})["hardswish_opset"] = {
        "decomposed_hardswish": found, "opset_from": before, "opset_to": 14, "how": how}
    return model


def default_float_transforms(model: ir.Model, hooks: Sequence, equalize) -> list:
    """``hooks`` preceded by :func:`fuse_convtranspose_pair` (when the model has a
    ConvTranspose) and by cross-layer equalization when ``equalize`` is True/"on" (each
    unless the caller passed it already); "auto" (the default) is currently off for CLE,
    see the comment."""
    from onnxopt.quantization.equalization import cross_layer_equalization

    hooks = list(hooks)
    first = []
    # ConvTranspose pairs (a DB detector head) as two 1x1 Convs + one DepthToSpace: exact, and
    # measured faster (see fuse_convtranspose_pair). A single ConvTranspose as Conv +
    # DepthToSpace (convtranspose_to_conv) measured slower in ORT 1.32: opt-in.
    if any(n.op_type == "ConvTranspose" for n in model.graph) and fuse_convtranspose_pair not in hooks:
        first.append(fuse_convtranspose_pair)
    # "auto" is off: measured on PP-OCRv4 det with every other default on, CLE moved the text
    # set from 0.966 / 0.925 (pooled / min IoU) to 0.966 / 0.905, and with per-tensor weights
    # from 0.892 / 0.452 to 0.892 / 0.371: onnxopt's quantizer gains nothing from it (the
    # affine ops it folds are folded by the float pipeline anyway).
    if equalize in (True, "on") and cross_layer_equalization not in hooks:
        first.append(cross_layer_equalization)
    return [*first, *hooks]


# Smooth, unbounded-above activations: their outputs have long sparse tails (PP-OCRv4 det:
# hard-swish outputs reach 29 where the 99.99th percentile is 21), so a min-max range
# spends the uint8 grid on a few pixels.
_TAILED_ACTIVATIONS = ("HardSwish",)


def _through_scalar_affine(value: ir.Value) -> ir.Node | None:
    """The producer of ``value``, looking through up to two scalar Mul/Add ops."""
    node = value.producer()
    for _ in range(2):
        if node is None or node.op_type not in ("Mul", "Add") or len(node.inputs) != 2:
            break
        k = [scalar_value(v) for v in node.inputs]
        if (k[0] is None) == (k[1] is None):
            break
        nxt = node.inputs[1] if k[0] is not None else node.inputs[0]
        node = nxt.producer()
    return node


def tailed_activation_tensors(model: ir.Model, tensors: Sequence[str], layers: Sequence = ()) -> list[str]:
    """The ``tensors`` that are (a scalar affine of) a HardSwish output, in a model whose
    layers are all Conv or MatMul (no Gemm head): calibrated with ``mse`` instead of min-max
    when the method is the default (see :data:`_TAILED_ACTIVATIONS`).

    Measured: on PP-OCRv4 det (dense text maps) it lifts the text-set min IoU from 0.84 to
    0.90; on PP-OCRv4 rec (convs + a MatMul neck, 100 held-out rendered lines) the CER
    against fp32 falls from 10.5% to 7.6% (against the truth 15.3% -> 12.6%, fp32 9.1%);
    on the PP-OCR direction classifier (a Gemm head) it made the class probabilities worse
    (max difference 0.13 -> 0.21 on 6 images), so classifiers keep min-max.
    """
    if not layers or any(l.op_type not in ("Conv", "MatMul") for l in layers):
        return []
    values = {v.name: v for n in model.graph for v in n.outputs}
    out = []
    for name in tensors:
        value = values.get(name)
        node = _through_scalar_affine(value) if value is not None else None
        if node is not None and node.op_type in _TAILED_ACTIVATIONS and node.domain in ("", "ai.onnx"):
            out.append(name)
    return out


# float32 sigmoid(17) rounds to 1.0 and sigmoid(-17) = 4e-8: beyond +-17 a logit's value
# no longer shows in a float32 probability (to 4e-8 absolute).
SIGMOID_SATURATION = 17.0


def _saturation_interval(node: ir.Node) -> tuple[float, float] | None:
    """Inputs outside [lo, hi] give the same output as lo / hi: HardSwish(x) = 0 for x <= -3;
    HardSigmoid(x) is constant below -beta/alpha and above (1 - beta)/alpha; Sigmoid, in
    float32, outside +-:data:`SIGMOID_SATURATION`."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "HardSwish":
        return -3.0, float("inf")
    if node.op_type == "Sigmoid":
        return -SIGMOID_SATURATION, SIGMOID_SATURATION
    if node.op_type == "HardSigmoid":
        alpha = node.attributes.get_float("alpha", 0.2)
        beta = node.attributes.get_float("beta", 0.5)
        if alpha > 0:
            return -beta / alpha, (1.0 - beta) / alpha
    return None


def clamp_to_consumers(model: ir.Model, tensor: str, lo: float, hi: float) -> tuple[float, float]:
    """Narrow a quantized Conv output's range [lo, hi] to where its readers are not saturated.

    Exact: when every reader of the tensor is a HardSwish (or HardSigmoid), values below -3
    (its flat part) all give the same output, so the output quantizer's grid starts there
    instead of at the calibrated minimum. On PP-OCRv4 det a pointwise conv's output spans
    [-75, 74] before a hard-swish: [-3, 74] halves its quantization step. Logits read only
    by a Sigmoid are clipped to +-17, where a float32 sigmoid is 1.0 or under 4e-8: det's
    head logits span [-160, 69], a grid step of 0.9 (a probability step of ~0.2 at the
    detector's 0.3 threshold), 0.13 after.
    """
    value = next((v for n in model.graph for v in n.outputs if v.name == tensor), None)
    if value is None or value.is_graph_output():
        return lo, hi
    users = [u for u, _ in value.uses()]
    bounds = [_saturation_interval(u) for u in users]
    if not users or any(b is None for b in bounds):
        return lo, hi
    b_lo = min(b[0] for b in bounds)
    b_hi = max(b[1] for b in bounds)
    new_lo, new_hi = max(lo, b_lo), min(hi, b_hi)
    return (new_lo, new_hi) if new_lo < new_hi else (lo, hi)


# Elementwise ops that commute with DepthToSpace (a pure permutation of elements).
_POINTWISE = ("Relu", "Sigmoid", "LeakyRelu", "HardSigmoid", "HardSwish", "Clip", "Tanh")


def _ints(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return list(attr.value) if attr is not None else default


def convtranspose_to_conv(model: ir.Model, ctx=None) -> str:
    """``float_transforms`` hook: a ConvTranspose whose kernel equals its stride (k x k,
    stride k, no padding, dilation 1, group 1) is a 1x1 Conv to ``C_out * k * k`` channels
    followed by ``DepthToSpace(k, mode="CRD")``, exactly::

        y[o, k*i + a, k*j + b] = sum_c x[c, i, j] W[c, o, a, b] + bias[o]
        -> Conv weight Wc[o*k*k + a*k + b, c] = W[c, o, a, b], bias repeated k*k times

    ONNX Runtime 1.32 has no int8 ConvTranspose on CPU (a QDQ ConvTranspose stays float), so
    a detector's upsampling head runs in float; as a Conv it becomes a QLinearConv. A
    following pointwise activation (Relu, Sigmoid, ...) is moved in front of the
    DepthToSpace, so a Relu is absorbed into the conv's output quantizer.

    Opt-in (``float_transforms=[convtranspose_to_conv]``), not a default: on PP-OCRv4 det the
    int8 model got slower (40.1 -> 45.4 ms, 1.61x -> 1.42x over fp32, interleaved): ORT runs the uint8 DepthToSpace in
    NCHW between NHWC QLinearConvs (two layout transposes of a 320x320x24 tensor), and a
    QLinearConv with 4 output channels (the 24 -> 1 ConvTranspose) is slower than the float
    ConvTranspose. Same accuracy.
    """
    from onnxopt.passes._fusion_util import Names, take_over

    graph = model.graph
    names = Names(model)
    done = 0
    for node in list(graph):
        found = _convt_k(node)
        if found is None:
            continue
        w, bias, k = found
        c_in, c_out = (int(d) for d in w.shape[:2])
        wc = np.ascontiguousarray(w.transpose(1, 2, 3, 0).reshape(c_out * k * k, c_in, 1, 1))
        bc = np.repeat(bias, k * k).astype(w.dtype)
        base = node.name or "convtranspose"
        w_name, b_name = names.new(f"{base}_as_conv_W"), names.new(f"{base}_as_conv_B")
        w_val = ir.Value(name=w_name, const_value=ir.tensor(wc, name=w_name), shape=ir.Shape(wc.shape))
        w_val.dtype = ir.tensor(wc).dtype
        b_val = ir.Value(name=b_name, const_value=ir.tensor(bc, name=b_name), shape=ir.Shape(bc.shape))
        b_val.dtype = w_val.dtype
        graph.register_initializer(w_val)
        graph.register_initializer(b_val)
        conv = ir.node("Conv", [node.inputs[0], w_val, b_val], attributes={"kernel_shape": [1, 1]},
                       name=names.new(f"{base}_as_conv"))
        conv.outputs[0].name = names.new(f"{base}_as_conv_out")
        conv.outputs[0].dtype = w_val.dtype
        graph.insert_before(node, conv)
        y = node.outputs[0]
        pre, last, old_act = conv.outputs[0], y, None
        act = _sole_pointwise(y)
        if act is not None:
            # act(D2S(z)) = D2S(act(z)): a copy of the activation runs on the conv output
            new_act = ir.Node(act.domain, act.op_type, [conv.outputs[0], *act.inputs[1:]],
                              attributes=list(act.attributes.values()), name=names.new(f"{act.name}_before_d2s"))
            new_act.outputs[0].name = names.new(f"{act.outputs[0].name}_before_d2s")
            new_act.outputs[0].dtype = w_val.dtype
            graph.insert_after(conv, new_act)
            pre, last, old_act = new_act.outputs[0], act.outputs[0], act
        d2s = ir.node("DepthToSpace", [pre], attributes={"blocksize": k, "mode": "CRD"},
                      name=names.new(f"{base}_depth_to_space"))
        d2s.outputs[0].name = names.new(f"{base}_d2s_out")
        d2s.outputs[0].dtype = w_val.dtype
        graph.insert_after(pre.producer(), d2s)
        take_over(names, last, d2s.outputs[0])
        if old_act is not None:
            graph.remove(old_act, safe=True)
        graph.remove(node, safe=True)
        done += 1
    if ctx is not None and hasattr(ctx, "report") and done:
        ctx.report.setdefault("cnn", {})["convtranspose_to_conv"] = done
    return f"{done} ConvTranspose rewritten as Conv + DepthToSpace"


STEM_MIN_PIXELS = 64 * 64
FRONT_MAX_STRIDE = 8

# Ops a feature map passes through on the way from the image to a front conv: the stride
# is carried over (elementwise, normalisation); Conv and pooling multiply it by theirs.
_FRONT_STRIDED = ("Conv", "MaxPool", "AveragePool")
_FRONT_PASSTHROUGH = _POINTWISE + ("Add", "Mul", "Sub", "Div", "BatchNormalization", "Identity", "PRelu")


def _image_inputs(model: ir.Model, feed: dict | None) -> list[str]:
    """Graph inputs that are images in the calibration ``feed``: 4-D, <= 3 channels, at least
    :data:`STEM_MIN_PIXELS` pixels."""
    out = []
    for value in model.graph.inputs:
        x = (feed or {}).get(value.name)
        if x is None or np.ndim(x) != 4:
            continue
        if int(np.shape(x)[1]) <= 3 and int(np.shape(x)[2]) * int(np.shape(x)[3]) >= STEM_MIN_PIXELS:
            out.append(value.name)
    return out


def front_strides(model: ir.Model, feed: dict | None = None) -> dict[str, int]:
    """{tensor name: its stride from the image input} for the network's high-resolution front:
    the tensors computed from an image input (:func:`_image_inputs`) by Convs, pooling and
    elementwise ops alone, at a total stride of at most :data:`FRONT_MAX_STRIDE`. Anything
    else on the way (a resize, a global pool, a squeeze-excite gate, a reshape) ends the
    front, so a neck conv that mixes in upsampled deep features is never in it."""
    return _front(model, _image_inputs(model, feed))


def encoder_strides(model: ir.Model, feed: dict | None = None) -> dict[str, int]:
    """Like :func:`front_strides` up to stride :data:`ENCODER_MAX_STRIDE`, and through
    squeeze-excite gates (a global pool's per-channel summary of a feature map): the encoder
    of a dense-prediction network, everything before its neck's first upsampling."""
    return _front(model, _image_inputs(model, feed), max_stride=ENCODER_MAX_STRIDE, gates=True)


def _front(model: ir.Model, images: Sequence[str], *, max_stride: int | None = None,
           gates: bool = False) -> dict[str, int]:
    max_stride = FRONT_MAX_STRIDE if max_stride is None else max_stride
    stride = {name: 1 for name in images}
    if not stride:
        return {}
    for node in model.graph:  # topological order
        if node.domain not in ("", "ai.onnx"):
            continue
        ins = [v for v in node.inputs if v is not None and not glue.is_constant(v)]
        if not ins or any(v.name not in stride for v in ins):
            continue
        s = max(stride[v.name] for v in ins)
        if node.op_type in _FRONT_STRIDED:
            strides = node.attributes.get_ints("strides", None) or [1]
            s *= max(int(k) for k in strides)
        elif node.op_type not in _FRONT_PASSTHROUGH and not (gates and node.op_type in _GATE_POOLS):
            continue
        if s > max_stride:
            continue
        for out in node.outputs:
            stride[out.name] = s
    return stride


FRONT_MAX_MAC_SHARE = 0.25

# The encoder rule (float_front_layers): an encoder to this stride, through these gates, that
# holds at most this share of the Convs' multiply-adds stays float as a whole.
ENCODER_MAX_STRIDE = 32
_GATE_POOLS = ("GlobalAveragePool", "GlobalMaxPool")
ENCODER_MAX_MAC_SHARE = 0.5
# ... and only an encoder of depthwise-separable blocks: this share of its multiply-adds in
# depthwise and 1x1 convs, and at least one depthwise conv (float_front_layers says why).
ENCODER_MIN_SEPARABLE_SHARE = 0.8


def _depthwise_separable(convs: Sequence[ir.Node], macs: dict[str, float]) -> bool:
    """Whether ``convs`` are a MobileNet-style encoder: depthwise (one input channel per
    group) and pointwise (1x1) convs hold :data:`ENCODER_MIN_SEPARABLE_SHARE` of their
    multiply-adds, with at least one depthwise conv."""
    total = separable = 0.0
    depthwise = False
    for node in convs:
        w = ir.convenience.get_const_tensor(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else None
        if w is None or len(w.shape) != 4:
            return False
        dw = node.attributes.get_int("group", 1) > 1 and int(w.shape[1]) == 1
        depthwise = depthwise or dw
        total += macs.get(node.name, 0.0)
        if dw or (int(w.shape[2]) == 1 and int(w.shape[3]) == 1):
            separable += macs.get(node.name, 0.0)
    return depthwise and total > 0 and separable >= ENCODER_MIN_SEPARABLE_SHARE * total


def _spatial_strides(model: ir.Model, image_inputs: Sequence[str]) -> dict[str, tuple[float, float]]:
    """{tensor name: (stride along H, along W) relative to the image input} for every tensor
    whose spatial scale follows from the graph alone (convs, pools, resizes with constant
    scales, DepthToSpace, elementwise ops; a broadcast takes its finest input)."""
    inf = float("inf")
    scale = {name: (1.0, 1.0) for name in image_inputs}
    for node in model.graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        ins = [v for v in node.inputs if v is not None and v.name in scale]
        if not ins:
            continue
        sy, sx = min(scale[v.name][0] for v in ins), min(scale[v.name][1] for v in ins)
        op = node.op_type
        if op in _FRONT_STRIDED or op == "ConvTranspose":
            st = list(node.attributes.get_ints("strides", None) or [1, 1])
            if len(st) != 2:
                continue
            sy, sx = (sy * st[0], sx * st[1]) if op != "ConvTranspose" else (sy / st[0], sx / st[1])
        elif op in ("GlobalAveragePool", "GlobalMaxPool"):
            sy = sx = inf
        elif op in ("DepthToSpace", "SpaceToDepth"):
            b = node.attributes.get_int("blocksize", 1)
            sy, sx = (sy / b, sx / b) if op == "DepthToSpace" else (sy * b, sx * b)
        elif op in ("Resize", "Upsample"):
            factors = const_array(node.inputs[2] if op == "Resize" and len(node.inputs) > 2 else
                                  node.inputs[1] if op == "Upsample" and len(node.inputs) > 1 else None)
            if factors is None or factors.size != 4 or not np.all(factors > 0):
                continue
            sy, sx = sy / float(factors[2]), sx / float(factors[3])
        elif op not in _FRONT_PASSTHROUGH + ("Concat",):
            continue
        for out in node.outputs:
            scale[out.name] = (sy, sx)
    return scale


def _conv_macs(model: ir.Model, convs: Sequence[ir.Node], feed: dict, image: str) -> dict[str, float] | None:
    """Multiply-accumulates of each conv on the calibration feed's image size, or None when
    some conv's output resolution does not follow from the graph."""
    h, w = (int(d) for d in np.shape(feed[image])[2:4])
    scale = _spatial_strides(model, [image])
    out = {}
    for node in convs:
        weight = ir.convenience.get_const_tensor(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else None
        sy, sx = scale.get(node.outputs[0].name, (None, None))
        if weight is None or sy is None:
            return None
        positions = max(h / sy, 1.0) * max(w / sx, 1.0)  # after a global pool: one position
        out[node.name] = positions * float(np.prod(weight.shape))
    return out


def float_front_layers(model: ir.Model, layers: Sequence, feed: dict | None = None) -> dict[str, str]:
    """{layer name: reason} for the Convs that stay float by default, the first rule that applies:

    1. **The encoder** of a dense-prediction network (:func:`encoder_strides`: every Conv
       reached from the image through convs, pooling, elementwise ops and squeeze-excite
       gates, to stride 32, i.e. everything before the neck's first upsampling), when some
       conv is outside it, it holds at most :data:`ENCODER_MAX_MAC_SHARE` of the Convs'
       multiply-adds and it is depthwise-separable (:func:`_depthwise_separable`: MobileNet
       and PP-LCNet style, the known hard case for post-training quantization, Nagel et al.
       2019). PP-OCRv4 det: 52 of 64 convs, 43% of the compute, 95% of that in depthwise
       and 1x1 convs. Its decoder (the FPN neck and the head at 160x160) stays int8 and is
       where the int8 time is saved: float encoder, same 10 calibration photos, text-set min
       IoU 0.951 -> 0.980, plain photos pooled / min 0.953 / 0.549 -> 0.983 / 0.945
       (0.933-0.947 over six calibration subsets), for 1.4-6% of the speed (1.65x against
       1.68x over fp32 in one run). The light encoder (depthwise-separable,
       hard-swish glue between every pair of convs) gains little from int8 in ORT and its
       noise is what the decoder amplifies. A classifier's convs are all encoder, so this
       never applies to one (a ResNet, the PP-OCR direction classifier). An encoder of
       dense 3x3 convs is a different case: on a UNet (random weights, ReLU, 256x256,
       encoder 29% of the compute) floating it measured 1.21x over fp32 against 1.69x with
       it in int8, at the same output error; those keep the rules below.
    2. **The high-resolution front** of a CNN on an image input (:func:`front_strides`:
       every Conv whose output is at stride <= 8 of the image and reached from it through
       such layers only; the stem conv first), as below.
    3. The stem alone.

    The high-resolution front (the rule for det before the encoder rule):

    Accuracy: quantization noise added to the first, low-level feature maps is amplified by
    everything after them. On PP-OCRv4 det (15 front convs of 64, the stem included) the
    plain-photo pooled mask IoU rises from 0.84-0.90 to 0.94-0.96 over six calibration
    subsets, the text set's min IoU from 0.86-0.93 to 0.95-0.96.
    Speed: these convs have few channels (16-96) on large maps, where ONNX Runtime's int8 conv
    gains little over its float one and the Quantize/Dequantize of the big tensors costs more:
    the stem reads a 3-channel image (a tiny reduction per output, plus an NHWC transpose of
    the full image) whose [-1, 1] values a uint8 grid cannot hold (half a grey level of error);
    on det the float front measured 1.76x over fp32 against 1.63x with it in int8 (warm, same
    run).
    Where the front holds more than :data:`FRONT_MAX_MAC_SHARE` of the Convs' multiply-adds
    (det: 17.5%; a ResNet-50's stages to stride 8 hold 47%, a network that never leaves high
    resolution all of it), only the stem stays float; when the resolutions cannot be
    followed through the graph, the test is "more than half of the Convs".
    See docs/quantization.md."""
    images = _image_inputs(model, feed)
    strides = _front(model, images)
    if not strides:
        return {}
    nodes = {n.name: n for n in model.graph}
    convs = [l for l in layers if l.op_type == "Conv" and l.name in nodes]
    inputs = {v.name for v in model.graph.inputs}
    macs = _conv_macs(model, [nodes[l.name] for l in convs], feed, images[0]) if len(images) == 1 else None

    def produced(layer, within):
        return nodes[layer.name].outputs and nodes[layer.name].outputs[0].name in within

    if macs is not None:
        enc = _front(model, images, max_stride=ENCODER_MAX_STRIDE, gates=True)
        encoder = [l for l in convs if produced(l, enc)]
        share = sum(macs[l.name] for l in encoder) / max(sum(macs.values()), 1)
        if len(encoder) < len(convs) and share <= ENCODER_MAX_MAC_SHARE and _depthwise_separable(
                [nodes[l.name] for l in encoder], macs):
            # A dense-prediction network whose decoder holds most of the compute: every
            # encoder conv stays float (see the docstring).
            return {l.name: (f"encoder conv (stride {enc[nodes[l.name].outputs[0].name]} from the image input; "
                             f"the encoder holds {share:.0%} of the conv compute; more accurate in float and "
                             f"about as fast; see quantization/cnn.py)") for l in encoder}
    front = [l for l in convs if produced(l, strides)]
    if macs is not None:
        too_much = sum(macs[l.name] for l in front) > FRONT_MAX_MAC_SHARE * sum(macs.values())
    else:
        too_much = 2 * len(front) > len(convs)
    if too_much:
        # Where the front is much of the compute (a ResNet's wide early stages, a network
        # that stays at high resolution), int8 is what the user asked for and pays off:
        # only the stem stays float, where float is also the faster kernel.
        front = [l for l in front if l.act_input in inputs]
    out = {}
    for layer in front:
        stride = strides[nodes[layer.name].outputs[0].name]
        out[layer.name] = (f"high-resolution front conv (stride {stride} from the image input; "
                           f"more accurate in float and about as fast; see quantization/cnn.py)")
    return out


def _convt_k(node: ir.Node) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(W [C_in, C_out, k, k], bias [C_out], k) of a ConvTranspose with kernel = stride, no
    padding/dilation/groups/output_shape, constant weight and bias; else None."""
    if node.op_type != "ConvTranspose" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    w_t = ir.convenience.get_const_tensor(node.inputs[1]) if node.inputs[1] is not None else None
    b_in = node.inputs[2] if len(node.inputs) > 2 else None
    b_t = ir.convenience.get_const_tensor(b_in) if b_in is not None else None
    if w_t is None or len(w_t.shape) != 4 or (b_in is not None and b_t is None):
        return None
    _, c_out, kh, kw = (int(d) for d in w_t.shape)
    if kh != kw or node.attributes.get_int("group", 1) != 1 or _ints(node, "strides", [1, 1]) != [kh, kw] \
            or any(_ints(node, "pads", [0, 0, 0, 0])) or any(_ints(node, "output_padding", [0, 0])) \
            or _ints(node, "dilations", [1, 1]) != [1, 1] or node.attributes.get("output_shape") is not None \
            or node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return None
    w = np.asarray(w_t.numpy())
    bias = np.asarray(b_t.numpy()) if b_t is not None else np.zeros(c_out, w.dtype)
    return w, bias, kh


def _sole_pointwise(value: ir.Value) -> ir.Node | None:
    users = list(value.uses())
    if len(users) != 1 or value.is_graph_output():
        return None
    act = users[0][0]
    if act.op_type in _POINTWISE and act.domain in ("", "ai.onnx") and act.inputs[0] is value \
            and all(v is None or v.const_value is not None for v in act.inputs[1:]):
        return act
    return None


def fuse_convtranspose_pair(model: ir.Model, ctx=None) -> str:
    """``float_transforms`` hook: ``ConvTranspose(k1) -> act1 -> ConvTranspose(k2) -> act2``
    (kernel = stride each, act = a pointwise op or nothing; a DB-style detector head) becomes
    ``Conv1x1 -> act1 -> Conv1x1 -> act2 -> DepthToSpace(k1*k2)``, exactly.

    Every output pixel of the pair depends on one input pixel only: with ``K = k1*k2``,
    ``y[o2, K*i + k2*a1 + a2, K*j + k2*b1 + b2] = act2(b2[o2] + sum_o1 W2[o1, o2, a2, b2] *
    act1(b1[o1] + sum_c x[c, i, j] W1[c, o1, a1, b1]))``: the first Conv makes the
    ``C1*k1*k1`` sub-pixel channels, the second a ``C2*K*K`` conv whose weight is W2 placed
    per sub-pixel (zeros elsewhere), and one DepthToSpace (CRD) on the small low-resolution
    result puts the pixels in place. Both convs then quantize to QLinearConv (the
    ConvTransposes stay float in ORT 1.32), and no uint8 DepthToSpace runs between
    NHWC kernels (what made :func:`convtranspose_to_conv` slower). Measured on PP-OCRv4 det
    (interleaved, 80 rounds, two copies each): 1.67x / 1.72x over fp32 against 1.59x / 1.55x
    without it; text-set IoU 0.967 / 0.925 (0.966 / 0.925 without). A default."""
    from onnxopt.passes._fusion_util import Names, take_over

    graph = model.graph
    names = Names(model)
    done = 0
    for node in list(graph):
        first = _convt_k(node)
        if first is None or node.graph is not graph:
            continue
        act1 = _sole_pointwise(node.outputs[0])
        mid = act1.outputs[0] if act1 is not None else node.outputs[0]
        users = list(mid.uses())
        if len(users) != 1 or mid.is_graph_output():
            continue
        second_node = users[0][0]
        second = _convt_k(second_node)
        if second is None or second_node.inputs[0] is not mid:
            continue
        w1, bias1, k1 = first
        w2, bias2, k2 = second
        c_in, c1 = w1.shape[:2]
        c2 = w2.shape[1]
        big = k1 * k2
        wa = np.ascontiguousarray(w1.transpose(1, 2, 3, 0).reshape(c1 * k1 * k1, c_in, 1, 1))
        ba = np.repeat(bias1, k1 * k1).astype(w1.dtype)
        wb = np.zeros((c2 * big * big, c1 * k1 * k1, 1, 1), w2.dtype)
        bb = np.repeat(bias2, big * big).astype(w2.dtype)
        for a1 in range(k1):
            for b1 in range(k1):
                cols = np.arange(c1) * k1 * k1 + a1 * k1 + b1
                for a2 in range(k2):
                    for b2 in range(k2):
                        r, c = k2 * a1 + a2, k2 * b1 + b2
                        rows = np.arange(c2) * big * big + r * big + c
                        wb[np.ix_(rows, cols)] = w2[:, :, a2, b2].T[:, :, None, None]
        base = node.name or "convtranspose"

        def const(tag: str, array: np.ndarray) -> ir.Value:
            name = names.new(f"{base}_{tag}")
            value = ir.Value(name=name, const_value=ir.tensor(array, name=name), shape=ir.Shape(array.shape))
            value.dtype = ir.tensor(array).dtype
            graph.register_initializer(value)
            return value

        def fresh(op: str, inputs, tag: str, attributes=None, like: ir.Node | None = None) -> ir.Node:
            if like is not None:
                n = ir.Node(like.domain, like.op_type, inputs, attributes=list(like.attributes.values()),
                            name=names.new(f"{like.name or base}_{tag}"))
            else:
                n = ir.node(op, inputs, attributes=attributes or {}, name=names.new(f"{base}_{tag}"))
            n.outputs[0].name = names.new(f"{base}_{tag}_out")
            n.outputs[0].dtype = ir.DataType.FLOAT
            return n

        new = [fresh("Conv", [node.inputs[0], const("pair_W1", wa), const("pair_B1", ba)], "pair_conv1",
                     {"kernel_shape": [1, 1]})]
        # --exclude of the ConvTranspose (by name or op type) reaches the conv made from it.
        new[0].meta[ORIGIN_KEY], new[0].meta[ORIGIN_OP_KEY] = node.name, node.op_type
        if act1 is not None:
            new.append(fresh("", [new[-1].outputs[0], *act1.inputs[1:]], "pair_act1", like=act1))
        new.append(fresh("Conv", [new[-1].outputs[0], const("pair_W2", wb), const("pair_B2", bb)], "pair_conv2",
                         {"kernel_shape": [1, 1]}))
        new[-1].meta[ORIGIN_KEY], new[-1].meta[ORIGIN_OP_KEY] = second_node.name, second_node.op_type
        act2 = _sole_pointwise(second_node.outputs[0])
        last = second_node.outputs[0]
        if act2 is not None:
            new.append(fresh("", [new[-1].outputs[0], *act2.inputs[1:]], "pair_act2", like=act2))
            last = act2.outputs[0]
        new.append(fresh("DepthToSpace", [new[-1].outputs[0]], "pair_depth_to_space",
                         {"blocksize": big, "mode": "CRD"}))
        graph.insert_before(node, new)
        take_over(names, last, new[-1].outputs[0])
        for old in (act2, second_node, act1, node):
            if old is not None:
                graph.remove(old, safe=True)
        done += 1
    if ctx is not None and hasattr(ctx, "report") and done:
        ctx.report.setdefault("cnn", {})["convtranspose_pairs_fused"] = done
    return f"{done} ConvTranspose pair(s) fused into Conv + Conv + DepthToSpace"
