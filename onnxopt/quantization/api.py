"""``quantize``: static int8 QDQ quantization with streaming calibration, as one function.

Pipeline (each step's outcome goes into the report):

1. refuse an already quantized model; run the float ``default`` optimize pipeline (with its
   safety net) so BatchNorm is folded and constants are initializers;
2. load the calibration data (``onnxopt.calibration``), raise the opset to 13 where
   per-channel weights need it, else to 10 (QDQ's first opset) (:mod:`.opset`), run the ``float_transforms`` hooks;
3. find the layers (:mod:`.analysis`), drop ``--exclude`` matches and anything on a mask path;
4. SmoothQuant for MatMul groups (transformers), then one streaming calibration pass for all
   activation ranges; layers whose input range is not finite or saturated stay float;
5. QDQ insertion (:mod:`.qdq`), ``weight_transforms`` hooks (bias correction), int32 biases;
6. with ``max_drop`` or ``report``: per-layer sensitivity and the accuracy-aware fallback,
   measured on held-out calibration samples (the last ones of the calibration set);
7. checker + ONNX Runtime load, and the fused int8 kernels ORT builds, listed in the report.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.atomic import write_json_atomic
from onnxopt.errors import OnnxoptError
from onnxopt.graph import op_histogram, opset_version
from onnxopt.model_io import check_output_path, check_side_output, save_model
from onnxopt.quantization import analysis, cnn, glue
from onnxopt.quantization.context import QuantContext
from onnxopt.quantization.opset import ensure_opset
from onnxopt.quantization.qdq import build_qdq, quantize_biases, shield_matmul_biases
from onnxopt.quantization.scheme import scheme_for
from onnxopt.quantization.sensitivity import layer_sqnr, run_all
from onnxopt.quantization.smoothquant import apply_smoothquant, smoothing_groups

METHODS = ("minmax", "percentile", "entropy", "mse")
Hook = Callable[[ir.Model, QuantContext], "str | None"]


@dataclasses.dataclass
class QuantizeResult:
    model: ir.Model
    report: dict


class _Slice:
    """A re-iterable view of the first ``stop`` feeds of calibration data (no copies kept)."""

    def __init__(self, data, start: int, stop: int):
        self._data, self._start, self._stop = data, start, stop
        self.description = f"samples {start}..{stop - 1} of {getattr(data, 'description', 'calibration data')}"
        self.is_random = getattr(data, "is_random", False)

    def __iter__(self):
        for i, feed in enumerate(self._data):
            if i >= self._stop:
                return
            if i >= self._start:
                yield feed

    def __len__(self) -> int:
        return self._stop - self._start

    def length_hint(self) -> int:
        return len(self)

    def first(self) -> dict:
        return next(iter(self))


_T0 = [time.perf_counter()]


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"onnxopt quantize: [{time.perf_counter() - _T0[0]:6.1f}s] {msg}", file=sys.stderr, flush=True)


def _run_hooks(hooks: Sequence, model: ir.Model, ctx: QuantContext, key: str) -> None:
    entries = []
    for hook in hooks:
        name = getattr(hook, "__name__", type(hook).__name__)
        if not callable(hook):
            raise OnnxoptError(f"{key}: {name!r} is not callable")
        out = hook(model) if isinstance(hook, ir.passes.PassBase) else hook(model, ctx)
        entries.append({"name": name, "summary": out if isinstance(out, str) else None})
    if entries:
        ctx.report.setdefault("hooks", {})[key] = entries


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a = np.nan_to_num(a.astype(np.float64).ravel())
    b = np.nan_to_num(b.astype(np.float64).ravel())
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float(na == nb)


def _cosine_drop(refs: list[dict], outs: list[dict]) -> tuple[float, float]:
    """(pooled drop, worst per-sample drop), drop = 1 - cosine similarity of a float output.

    Pooled: all samples of an output concatenated (like a pooled IoU: a sample whose output
    is nearly all zeros, e.g. a detector map of a photo without text, cannot dominate), the
    worst output counts. Per sample: the worst output of the worst sample.
    """
    names = [k for k, r in refs[0].items() if r.dtype.kind == "f"]
    pooled = max((1.0 - _cos(np.concatenate([r[k].ravel() for r in refs]), np.concatenate([o[k].ravel() for o in outs]))
                  for k in names), default=0.0)
    worst = max((1.0 - _cos(r[k], o[k]) for r, o in zip(refs, outs) for k in names), default=0.0)
    return pooled, worst


def fused_kernels(model: ir.Model) -> dict[str, int]:
    """Op histogram of ONNX Runtime's optimized graph, restricted to quantized kernels."""
    import onnx

    from onnxopt.verify import make_session, session_options

    with tempfile.TemporaryDirectory(prefix="onnxopt-fused-") as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        so = session_options(1)
        so.optimized_model_filepath = path
        # Weights of the optimized copy go to a side file: a > 2 GB graph cannot be one proto
        # (and only the node list is read back).
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        # make_session, not bytes: a model with external weights is written to a folder ORT
        # can resolve them from (bytes resolve them against the current directory).
        make_session(model, options=so).close()
        proto = onnx.load(path, load_external_data=False)
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        op = node.op_type
        if "Integer" in op or op.startswith("QLinear") or op in ("QGemm", "QuantizeLinear", "DequantizeLinear",
                                                                     "DynamicQuantizeLinear"):
            counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items()))


def quantize(
    model_or_path,
    calib,
    *,
    method: str = "minmax",
    target: str = "cpu",
    per_channel: bool = True,
    exclude: Sequence[str] = (),
    samples: int | None = None,
    max_drop: float | None = None,
    report: str | os.PathLike | None = None,
    smoothquant: str | bool = "auto",
    smoothquant_alpha: float | None = None,
    image_spec=None,
    shapes=None,
    progress: bool = True,
    float_transforms: Sequence[Hook] = (),
    weight_transforms: Sequence[Hook] = (),
    sensitivity: bool | None = None,
    holdout: int | None = None,
    range_search: bool = False,
    equalize: str | bool = "auto",
    float_front: bool = True,
) -> QuantizeResult:
    """Quantize a float model to int8 QDQ for ``target``; see the module docstring.

    ``calib``: anything ``onnxopt.calibration.load_calibration_data`` accepts (folder of .npz
    or images, one .npz, iterable of feed dicts, a CalibrationDataReader). ``max_drop``: the
    largest allowed ``1 - cosine`` between fp32 and int8 outputs (each output pooled over the
    held-out calibration samples; with fewer than 4 samples none is held out and the drop is
    measured on the calibration samples themselves); the layers that hurt most go back to float until it holds. ``report``: a JSON
    path for the report (also returned as ``QuantizeResult.report``). ``smoothquant``: "auto"
    (smooth a MatMul input where that lowers its layers' output error by 25% and 1e-3,
    measured on calibration rows), True/"on" (wherever it lowers it at all), False/"off";
    ``smoothquant_alpha``: fix the migration strength instead of searching it per group. ``sensitivity``: compute per-layer SQNR (default: when ``report`` or
    ``max_drop`` is given). ``holdout``: how many of the last calibration samples are kept
    out of calibration to measure the drop (default: with ``max_drop``, a fifth, at most 16;
    otherwise none, so asking for a report never changes the model).
    ``float_transforms`` / ``weight_transforms``: hooks, see :class:`QuantContext` and
    docs/quantization.md. ``range_search``: choose MatMul input ranges by layer-output error
    (:mod:`.range_search`; off: measured worse on MiniLM). ``equalize``: cross-layer
    equalization as the first float transform: True/"on", False/"off", "auto" (currently
    off, measured in :mod:`.cnn`, which also holds the other CNN defaults: hard-swish fusion
    via opset 14, the float front, the range rules). ``float_front``: keep a CNN's front
    float (:func:`.cnn.float_front_layers`: a dense-prediction network's encoder, or the
    high-resolution convs, or the stem; more accurate, and on ONNX Runtime's CPU provider
    about as fast); False quantizes them too.
    """
    from onnxopt.calibration import collect_stats, load_calibration_data
    from onnxopt.optimize import optimize
    from onnxopt.verify import check_model

    from onnxopt import arguments as arg

    t_start = _T0[0] = time.perf_counter()
    exclude = arg.names("exclude", exclude)
    samples = arg.number("samples", samples, low=1, integer=True, optional=True)
    holdout = arg.number("holdout", holdout, low=0, integer=True, optional=True)
    max_drop = arg.number("max_drop", max_drop, optional=True)
    smoothquant_alpha = arg.number("smoothquant_alpha", smoothquant_alpha, low=0, high=1, low_open=True,
                                   high_open=True, optional=True)
    for name, value in (("per_channel", per_channel), ("float_front", float_front), ("progress", progress),
                        ("range_search", range_search)):
        arg.flag(name, value)
    if sensitivity is not None:
        arg.flag("sensitivity", sensitivity)
    arg.choice("equalize", equalize, ("auto", "on", "off", True, False))
    if method not in METHODS:
        raise OnnxoptError(f"unknown calibration method {method!r} (choose from {', '.join(METHODS)})")
    if max_drop is not None and not (0 < max_drop < 1):
        raise OnnxoptError(f"--max-drop {max_drop}: must be between 0 and 1 (a drop in cosine similarity)")
    if smoothquant not in ("auto", "on", "off", True, False):
        raise OnnxoptError(f"smoothquant={smoothquant!r}: use 'auto', 'on' or 'off'")
    scheme = scheme_for(target, per_channel=per_channel)
    if report is not None:
        check_side_output(report, "--report", inputs=[model_or_path] if isinstance(model_or_path, (str, os.PathLike)) else [])
    src = analysis.load_float_model(model_or_path, exclude, "quantize")
    rep: dict = {"scheme": scheme.describe(), "method": method, "target": target}

    # Open (and validate the first feed of) the calibration data before any slow work.
    data = load_calibration_data(calib, src, samples=samples, image_spec=image_spec, shapes=shapes, reject_nan=True)
    from onnxopt.verify import check_runs_on

    check_runs_on(src, data.first(), "the first calibration sample")

    # CNN defaults (.cnn): decomposed hard-swish -> opset 14, so the pipeline fuses it.
    before = opset_version(src)
    src = cnn.prepare_opset(src, next(iter(data)), rep)
    _say(progress, "float optimize pipeline")
    opt = optimize(src, verify="final", shapes=shapes)
    model = opt.model
    ir.passes.common.NameFixPass()(model)
    rep["float_pipeline"] = {"nodes_before": opt.nodes_before, "nodes_after": opt.nodes_after,
                             "rolled_back": list(getattr(opt, "rolled_back", []) or [])}

    n = len(data)
    if n == 0:
        raise OnnxoptError("the calibration data holds no samples")
    want_sens = sensitivity if sensitivity is not None else (report is not None or max_drop is not None)
    h = 0
    if holdout is not None:
        h = holdout
    elif max_drop is not None and n >= 4:
        # Only the fallback needs unseen samples to judge the drop; --report alone must not
        # change the model, so without max_drop every sample calibrates (the per-layer SQNR
        # is then measured on the first calibration samples).
        h = min(16, max(1, n // 5))
    calib_data = _Slice(data, 0, n - h) if h else data
    held_feeds = [f for i, f in enumerate(data) if i >= n - h] if h else []
    if not held_feeds:
        # Always some samples to check the result on: without a hold-out, the first
        # calibration samples (entropy ranges and per-tensor weights on PP-OCR rec gave
        # unusable models, drop 0.5-0.6, and nothing said so).
        held_feeds = [f for i, f in enumerate(data) if i < CHECK_SAMPLES]
    rep["calibration"] = {"description": getattr(data, "description", ""), "samples": n - h,
                          "held_out": h, "is_random": bool(getattr(data, "is_random", False))}
    first_feed = next(iter(data))

    # QuantizeLinear/DequantizeLinear exist from opset 10; a per-channel axis needs 13.
    model, how = ensure_opset(model, 13 if scheme.per_channel else 10, feeds=first_feed)
    if isinstance(rep.get("cnn", {}).get("hardswish_opset"), dict):
        how = f"{rep['cnn']['hardswish_opset']['how']} to 14 for hard-swish fusion"
    ir.passes.common.NameFixPass()(model)
    rep["opset"] = {"from": before, "to": opset_version(model), "how": how}

    ctx = QuantContext(float_model=model, calib=calib_data, scheme=scheme, report=rep)
    _run_hooks(cnn.default_float_transforms(model, float_transforms, equalize), model, ctx, "float_transforms")

    layers, skipped = analysis.find_layers(model, absorb_activations=not scheme.symmetric_activations)
    layers, excluded = analysis.apply_exclusions(model, layers, exclude)
    masks = analysis.mask_tensors(model)
    front = cnn.float_front_layers(model, layers, first_feed) if float_front else {}
    float_reasons: dict[str, str] = {**excluded, **front}
    kept = []
    for layer in layers:
        if layer.name in float_reasons:
            continue
        if layer.act_input in masks:
            float_reasons[layer.name] = f"input on {masks[layer.act_input]}"
        else:
            kept.append(layer)
    layers = kept
    rep["kept_float_tensors"] = masks
    if not layers:
        near = [f"{k}: {v}" for k, v in skipped.items() if v != "no constant weight"][:3]
        inside = sum(1 for g in model.graph.subgraphs() for n in g if n.op_type in ("Conv", "MatMul", "Gemm"))
        raise OnnxoptError("nothing to quantize: the model has no Conv, MatMul or Gemm with a constant weight"
                           + (" left after --exclude" if exclude else "")
                           + (f" in its main graph ({inside} sit inside If/Loop/Scan subgraphs, which are not "
                              "quantized)" if inside else "")
                           + (f" (skipped {'; '.join(near)})" if near else ""))

    t_cal = time.perf_counter()
    sq_entries: list[dict] = []
    # SmoothQuant: per MatMul group, whether and how strongly to smooth is decided by the
    # group's output error on sampled calibration rows (_smoothing_plan). Measured on MiniLM-L6
    # (docs/quantization.md): one alpha for all groups either helps the LayerNorm outputs and
    # ruins the GELU outputs (0.5) or the reverse; per-group choice beats both.
    use_sq = smoothquant in ("on", True, "auto")
    groups: dict = {}
    alphas: dict = {}
    if use_sq:
        groups, alphas, choice = _smoothing_plan(model, layers, scheme, calib_data, smoothquant, smoothquant_alpha,
                                                 progress)
        rep["smoothquant_search"] = choice
    # GELU outputs: one-sided with a long sparse tail, where min-max wastes the 8-bit grid;
    # an MSE-chosen range measured better on MiniLM (docs/quantization.md). Only with the
    # default min-max method: an explicit --method applies to every tensor.
    gelu = sorted(analysis.gelu_outputs(model) & {l.act_input for l in layers} - set(groups)) \
        if method == "minmax" else []
    glue_nodes = glue.find_glue(model, layers)  # CNN Add/Mul/Concat/Resize between activations

    def wanted() -> list[str]:
        return sorted({l.act_input for l in layers} | {l.out_range_tensor for l in layers if l.out_range_tensor}
                      | glue.glue_tensors(glue_nodes))

    tensors = wanted()
    one_pass = method == "minmax"
    if groups and not one_pass:
        # Smoothing changes the tensors the main pass observes: its statistics come first.
        _say(progress, f"SmoothQuant statistics for {len(groups)} MatMul input(s)")
        gstats = collect_stats(model, calib_data, list(groups), method="minmax",
                               channel_absmax_for=list(groups), progress=progress)
        absmax = {k: s.channel_absmax for k, s in gstats.items() if s.finite and s.channel_absmax is not None}
        sq_entries = apply_smoothquant(model, layers, absmax, alpha=alphas, tensors=set(groups))
        tensors = wanted()
    # Hard-swish outputs in fully convolutional models (.cnn) get MSE ranges too.
    tailed = sorted(set(cnn.tailed_activation_tensors(model, tensors, layers)) - set(groups)) \
        if method == "minmax" else []
    mse_for = {t: "mse" for t in [*gelu, *tailed]}
    _say(progress, f"calibrating {len(tensors)} activation tensors with {method} on {len(calib_data)} samples"
         + (f" ({len(mse_for)} tailed activations with mse)" if mse_for else ""))
    stats = collect_stats(model, calib_data, tensors, method=method, progress=progress,
                          symmetric=scheme.symmetric_activations, method_for=mse_for,
                          channel_absmax_for=list(groups) if one_pass else ())
    if groups and one_pass:
        # One pass for everything: the smoothed tensor X / s has min-max range
        # [min_j lo_j / s_j, max_j hi_j / s_j] from X's per-channel extremes (s > 0).
        absmax = {k: stats[k].channel_absmax for k in groups
                  if stats[k].finite and stats[k].channel_absmax is not None}
        scales: dict = {}
        sq_entries = apply_smoothquant(model, layers, absmax, alpha=alphas, tensors=set(groups), scales_out=scales)
        for x_name, (s_vec, smoothed) in scales.items():
            st = stats[x_name]
            lo, hi = float(np.min(st.channel_min / s_vec)), float(np.max(st.channel_max / s_vec))
            stats[smoothed] = dataclasses.replace(st, name=smoothed, min=lo, max=hi, observed_min=lo, observed_max=hi,
                                                  channel_absmax=None, channel_min=None, channel_max=None,
                                                  observer=None)
    rep["smoothquant"] = {"mode": str(smoothquant), "alpha": smoothquant_alpha if smoothquant_alpha is not None
                          else "searched per group", "groups": sq_entries} if use_sq else "off"
    if gelu:
        rep["calibration"]["mse_for_gelu_outputs"] = gelu
    if tailed:
        rep["calibration"]["mse_tensors"] = tailed
    rep["calibration"]["seconds"] = round(time.perf_counter() - t_cal, 3)
    ctx.stats = stats
    ranges: dict[str, tuple[float, float]] = {}
    usable = []
    for layer in layers:
        why = analysis.unusable_range(stats[layer.act_input])
        if why:
            float_reasons[layer.name] = f"input {why}"
            continue
        ranges[layer.act_input] = (stats[layer.act_input].min, stats[layer.act_input].max)
        if layer.out_range_tensor:
            out_why = analysis.unusable_range(stats[layer.out_range_tensor])
            if out_why:
                layer.out_range_tensor = None
                layer.absorbed_activation = None
            else:
                lo, hi = stats[layer.out_range_tensor].min, stats[layer.out_range_tensor].max
                if layer.absorbed_activation:  # Relu / Clip(0, c): the Q's range starts at 0
                    cmax = analysis.clip_max(model, layer.absorbed_activation)
                    lo, hi = 0.0, (min(hi, cmax) if cmax is not None else hi)
                else:  # read only by HardSwish / HardSigmoid: not below their flat part (.cnn)
                    lo, hi = cnn.clamp_to_consumers(model, layer.out_range_tensor, lo, hi)
                ranges[layer.out_range_tensor] = (lo, hi)
        usable.append(layer)
    layers = usable
    for name in sorted(glue.glue_tensors(glue_nodes)):
        if name not in ranges and not analysis.unusable_range(stats[name]):
            ranges[name] = (stats[name].min, stats[name].max)
    glue_nodes = glue.usable_glue(glue_nodes, ranges)
    if glue_nodes:
        rep["glue"] = {g.op_type: sum(1 for x in glue_nodes if x.op_type == g.op_type) for g in glue_nodes}
    if not layers:
        hint = "".join(f"; {label}: input {name!r} holds inf values (fix or drop that sample)"
                       for name, label in data.infinite_inputs.items())
        raise OnnxoptError("nothing to quantize: every candidate layer's input range is unusable "
                           f"(see the reasons with --report){hint}")
    if range_search:
        _search_ranges(model, layers, ranges, scheme, calib_data, rep, progress)

    def build(selected: list, ctx_: QuantContext | None = None):
        # The fallback's float layers take the glue between them along (glue_near_quantized).
        near = glue_nodes if len(selected) == len(layers) else glue.glue_near_quantized(model, glue_nodes, selected)
        qmodel, qlayers = build_qdq(model, selected, ranges, scheme, glue=near)
        if ctx_ is not None:
            ctx_.layers = qlayers
            _run_hooks(weight_transforms, qmodel, ctx_, "weight_transforms")
        quantize_biases(qmodel, qlayers)
        shield_matmul_biases(qmodel, qlayers)
        return qmodel, qlayers

    layer_rep = {l.name: {"op_type": l.op_type, "quantized": True} for l in layers}
    for name, why in float_reasons.items():
        layer_rep[name] = {"quantized": False, "reason": why}
    for name, why in skipped.items():
        layer_rep.setdefault(name, {"quantized": False, "reason": why})

    _say(progress, f"writing QDQ for {len(layers)} layers")
    qmodel, qlayers = build(layers, ctx)

    if held_feeds:
        sens_feeds = held_feeds[:4]
        # Without a hold-out (only --report, or under 4 samples) these samples also calibrated.
        seen = "held-out samples" if h else "calibration samples (none held out)"
        if want_sens:
            _say(progress, f"per-layer sensitivity (SQNR) on {len(sens_feeds)} {seen}")
            sqnr = layer_sqnr(model, layers, ranges, scheme, sens_feeds)
            for name, db in sqnr.items():
                layer_rep[name]["sqnr_db"] = round(db, 2)
        _say(progress, f"output check: fp32 against int8 on {len(held_feeds)} {seen}")
        refs = run_all(model, held_feeds)
        drop, worst = _cosine_drop(refs, run_all(qmodel, held_feeds))
        fb = {"metric": "1 - cosine similarity between fp32 and int8 outputs, each float output pooled over "
                        f"{len(held_feeds)} {seen} (the worst output counts)",
              "held_out": bool(h), "before": drop, "worst_sample_before": worst, "max_drop": max_drop, "to_float": []}
        if max_drop is not None and drop > max_drop:
            # Rank by what each layer does to the model output when it is the only int8 layer
            # (local SQNR ranks badly on CNNs: on PP-OCR det the first and the head convs are
            # locally clean but dominate the output error). Then grow the float set 1, 1, 1, 1,
            # 2, 4, 8, 8, ... layers at a time until the drop is within budget, and bisect back
            # to the smallest such set.
            _say(progress, f"fallback: output drop of each of {len(layers)} layers quantized alone")
            alone = {}
            for l in layers:
                single, _ = build([l])
                alone[l.name] = _cosine_drop(refs[: len(sens_feeds)], run_all(single, sens_feeds))[0]
                layer_rep[l.name]["output_drop_alone"] = alone[l.name]
            order = sorted(layers, key=lambda l: -alone[l.name])

            def trial(k: int):
                chosen = {l.name for l in order[:k]}
                ctx_fb = QuantContext(float_model=model, calib=calib_data, scheme=scheme, stats=stats, report=rep)
                qm, _ = build([l for l in layers if l.name not in chosen], ctx_fb)
                d, w = _cosine_drop(refs, run_all(qm, held_feeds))
                _say(progress, f"fallback: {k} layer(s) in float -> drop {d:.4f}")
                return qm, d, w

            step, good_k, bad_k, best = 1, None, 0, None
            while good_k is None:
                k = min(len(order), bad_k + step)
                if k == len(order):
                    raise OnnxoptError(f"--max-drop {max_drop}: not reachable with any layer left in int8 (the drop "
                                       f"was {drop:.4g} with {bad_k} in float); allow a larger drop")
                step = min(step * 2, 8) if k >= 4 else 1
                result_k = trial(k)
                if result_k[1] <= max_drop:
                    good_k, best = k, result_k
                else:
                    bad_k, drop = k, result_k[1]
            while good_k - bad_k > 1:
                mid = (good_k + bad_k) // 2
                result_k = trial(mid)
                if result_k[1] <= max_drop:
                    good_k, best = mid, result_k
                else:
                    bad_k = mid
            qmodel, drop, worst = best
            moved = good_k
            for l in order[:moved]:
                layer_rep[l.name].update({"quantized": False, "reason": "accuracy fallback (--max-drop)"})
            fb["to_float"] = [l.name for l in order[:moved]]
        fb["after"] = drop
        fb["worst_sample_after"] = worst
        rep["fallback"] = fb
        if max_drop is None and drop > WARN_DROP:
            rep.setdefault("warnings", []).append(
                f"the int8 outputs are far from fp32 (1 - cosine {drop:.3g} on {len(held_feeds)} {seen}); "
                "--max-drop 0.01 puts the layers that hurt most back in float"
                + ("; min-max ranges (--method minmax) are the safest" if method != "minmax" else "")
                + ("; per-channel weights (--per-channel) usually help" if not scheme.per_channel else "")
            )

    _say(progress, "checking the model (ONNX checker, ONNX Runtime)")
    check_model(qmodel)
    try:
        kernels = fused_kernels(qmodel)  # builds an ORT session: proves the model loads
    except Exception as e:  # noqa: BLE001
        raise OnnxoptError(f"internal error: ONNX Runtime cannot load the quantized model: {e}") from None
    rep["layers"] = layer_rep
    rep["quantized_layers"] = sum(1 for v in layer_rep.values() if v.get("quantized"))
    rep["float_layers"] = sum(1 for v in layer_rep.values() if not v.get("quantized"))
    rep["ops"] = op_histogram(qmodel)
    rep["ort_fused_kernels"] = kernels
    rep["seconds"] = round(time.perf_counter() - t_start, 3)
    _say(progress, "done")
    if report is not None:
        write_json_atomic(report, rep)
    return QuantizeResult(qmodel, rep)


RANGE_SEARCH_FEEDS = 8
CHECK_SAMPLES = 4  # the output check's samples when none are held out
# Above this output drop (1 - cosine vs fp32) the result is said to be far off: MiniLM's
# and PP-OCR det's defaults measure 0.002-0.005, rec's 0.06 (CER 9% -> 15%), entropy or
# per-tensor ranges on rec 0.5-0.6 (every line misread).
WARN_DROP = 0.05
SEARCH_ROW_BYTES = 256 * 1024 * 1024  # sampled activation rows kept for the searches, in all


def _first_feeds(calib_data) -> list[dict]:
    """The first RANGE_SEARCH_FEEDS calibration samples (what the searches measure on)."""
    return [f for _, f in zip(range(RANGE_SEARCH_FEEDS), calib_data)]


def _smoothing_plan(model, layers, scheme, calib_data, mode, alpha, progress):
    """Which MatMul groups to smooth and with which alpha: ({x: layers}, {x: alpha}, report).

    Every group's output error is measured on rows sampled from the first calibration
    samples, unsmoothed and with each candidate alpha (the given one, or the grid
    ``smoothquant.ALPHAS``). "on" takes the best candidate wherever one improves on not
    smoothing; "auto" only where it lowers the error by ``MIN_GAIN`` of itself and by
    ``MIN_ABS_GAIN`` (an unfoldable group costs a Mul).
    """
    from onnxopt.quantization import smoothquant as sq
    from onnxopt.quantization.range_search import sample_rows

    groups = smoothing_groups(layers)
    if not groups:
        return {}, {}, {}
    feeds = _first_feeds(calib_data)
    width = sum(model.graph.initializers[g[0].weight].const_value.shape[0] for g in groups.values())
    max_rows = max(64, min(2048, SEARCH_ROW_BYTES // max(1, 4 * width)))
    _say(progress, f"SmoothQuant: output error of {len(groups)} MatMul groups on {len(feeds)} samples")
    rows = sample_rows(model, feeds, list(groups), max_rows=max_rows)
    choice = sq.choose_alphas(model, groups, rows, scheme, alphas=sq.ALPHAS if alpha is None else (alpha,))
    del rows

    def worth_it(c: dict) -> bool:
        if c["alpha"] is None:
            return False
        if mode != "auto":
            return True
        gain = c["error_unsmoothed"] - c["error_best"]
        return gain >= sq.MIN_GAIN * c["error_unsmoothed"] and gain >= sq.MIN_ABS_GAIN

    alphas = {x: c["alpha"] for x, c in choice.items() if worth_it(c)}
    return {x: g for x, g in groups.items() if x in alphas}, alphas, choice


def _search_ranges(model, layers, ranges, scheme, calib_data, rep, progress) -> None:
    """Replace the calibrated ranges of MatMul/Gemm inputs by the ones with the least layer
    output error (:mod:`.range_search`), measured on rows of the first calibration samples."""
    from onnxopt.quantization.range_search import sample_rows, search_matmul_ranges

    tensors = sorted({l.act_input for l in layers if l.op_type in ("MatMul", "Gemm")})
    if not tensors:
        return
    feeds = _first_feeds(calib_data)
    _say(progress, f"range search for {len(tensors)} MatMul/Gemm inputs on {len(feeds)} samples")
    t = time.perf_counter()
    choices = search_matmul_ranges(model, layers, ranges, scheme, sample_rows(model, feeds, tensors))
    for name, c in choices.items():
        ranges[name] = c.chosen
    rep["range_search"] = {"samples": len(feeds), "seconds": round(time.perf_counter() - t, 3),
                           "changed": sum(c.chosen != c.minmax for c in choices.values()),
                           "tensors": {n: c.as_report() for n, c in choices.items()}}


def quantize_file(input_path, output_path, **kwargs) -> QuantizeResult:
    """Load, quantize and atomically save; options as in :func:`quantize`."""
    check_output_path(output_path, input_path)
    report = kwargs.pop("report", None)
    if report is not None:
        check_side_output(report, "--report", inputs=[input_path], outputs=[output_path])
        # The report is written here, after the model; its per-layer SQNR must still be taken.
        kwargs.setdefault("sensitivity", True)
    result = quantize(input_path, **kwargs)
    save_model(result.model, pathlib.Path(output_path))
    if report is not None:  # after the model: a failed save must not leave a report behind
        write_json_atomic(report, result.report)
    return result
