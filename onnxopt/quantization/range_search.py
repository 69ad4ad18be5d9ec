"""Activation ranges chosen by the error they cause in the layers that read them.

A tensor-level criterion (min-max, percentile, entropy, the tensor's own MSE) judges a range
by how well it reproduces the activation itself. What matters is the layer output: on a BERT
encoder the LayerNorm outputs carry a few large outlier channels whose weights are large too,
so clipping them (what percentile, entropy and tensor-MSE do) ruins the model, while the GELU
outputs feeding the FFN down-projections have a long, sparse tail that min-max wastes most of
the 8-bit grid on. One rule serves both: for each activation ``X`` read by MatMul/Gemm layers
with weights ``W_j`` (quantized: ``Wq_j``), pick the range ``[lo, hi]`` minimising

    sum_j  || X W_j - fq(X; lo, hi) Wq_j ||^2  /  || X W_j ||^2

over rows of ``X`` sampled from the calibration data (``fq`` = the scheme's quantize then
dequantize), searched as ``lo = r_lo * min``, ``hi = r_hi * max`` over a grid of ratios in
(0, 1], the upper side first, then the lower one. The calibrated min-max range (ratio 1) is
always a candidate, so the chosen range never has a larger output error on the sample.
This is the per-layer output-MSE range search of AdaQuant-style post-training quantization,
without its weight updates.

Opt-in (``quantize(..., range_search=True)``): on MiniLM-L6 it lowered the embedding cosine
(0.993 -> 0.986) because padding tokens' rows dominate the sample and the few real tokens
with outlier values lose most; restricted to real tokens it raised the cosine (0.994) but
not nearest-neighbour agreement. SmoothQuant on the LayerNorm outputs did better.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from onnxopt.quantization.analysis import Layer
from onnxopt.quantization.scheme import Scheme, dequantize_weight, quantize_weight
from onnxopt.quantization.sensitivity import fake_quant

# Ratios of the calibrated extreme tried for each side (1.0 = min-max).
RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.42, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1)
MAX_ROWS = 2048


@dataclasses.dataclass
class RangeChoice:
    tensor: str
    minmax: tuple[float, float]
    chosen: tuple[float, float]
    error_minmax: float  # relative output error summed over the consumers
    error_chosen: float

    def as_report(self) -> dict:
        return {"minmax": [round(v, 6) for v in self.minmax], "chosen": [round(v, 6) for v in self.chosen],
                "output_error_minmax": self.error_minmax, "output_error_chosen": self.error_chosen}


def _weight_matrix(w: np.ndarray, layer: Layer) -> np.ndarray:
    """The [K, N] matrix the activation's rows are multiplied by."""
    if layer.op_type == "Gemm" and layer.axis == 0:  # transB: W is [N, K]
        return w.T
    return w


def search_matmul_ranges(
    model,
    layers: Sequence[Layer],
    ranges: dict[str, tuple[float, float]],
    scheme: Scheme,
    rows: dict[str, np.ndarray],
    *,
    ratios: Sequence[float] = RATIOS,
) -> dict[str, RangeChoice]:
    """Choose the range of every MatMul/Gemm input in ``rows`` ({tensor: [R, K] float32}).

    ``ranges``: the calibrated (min-max) ranges; returns {tensor: RangeChoice} for each
    tensor searched (use ``choice.chosen``). ``model``: the float model the layers belong to.
    """
    consumers: dict[str, list[Layer]] = {}
    for layer in layers:
        if layer.op_type in ("MatMul", "Gemm") and layer.act_input in rows and layer.act_input in ranges:
            consumers.setdefault(layer.act_input, []).append(layer)
    out: dict[str, RangeChoice] = {}
    for tensor, users in consumers.items():
        x = np.ascontiguousarray(rows[tensor], dtype=np.float32)
        if not np.all(np.isfinite(x)):
            continue
        mats = []
        for layer in users:
            w = np.asarray(model.graph.initializers[layer.weight].const_value.numpy(), dtype=np.float32)
            if scheme.per_channel:
                q, s = quantize_weight(w, layer.axis)
                wq = dequantize_weight(q, s, layer.axis)
            else:
                q, s = quantize_weight(w, None)
                wq = dequantize_weight(q, s, None)
            w, wq = _weight_matrix(w, layer), _weight_matrix(wq, layer)
            if not np.all(np.isfinite(w)):
                break
            ref = x @ w
            mats.append((wq, ref, max(float(np.vdot(ref, ref)), 1e-30)))

        if len(mats) != len(users):
            continue  # a non-finite weight: keep the calibrated range

        def error(lo: float, hi: float) -> float:
            xq = fake_quant(x, lo, hi, scheme)
            total = 0.0
            for wq, ref, norm in mats:
                d = xq @ wq
                d -= ref
                total += float(np.vdot(d, d)) / norm
            return total

        lo0, hi0 = ranges[tensor]
        e0 = error(lo0, hi0)
        best_lo, best_hi, best = lo0, hi0, e0
        if hi0 > 0:
            for r in ratios[1:]:
                e = error(best_lo, hi0 * r)
                if e < best:
                    best_hi, best = hi0 * r, e
        if lo0 < 0:
            for r in ratios[1:]:
                e = error(lo0 * r, best_hi)
                if e < best:
                    best_lo, best = lo0 * r, e
        out[tensor] = RangeChoice(tensor, (float(lo0), float(hi0)), (float(best_lo), float(best_hi)), e0, best)
    return out


def sample_rows(model, feeds: Sequence[dict], tensors: Sequence[str], *, max_rows: int = MAX_ROWS,
                seed: int = 0) -> dict[str, np.ndarray]:
    """Rows ([R, K], last axis = the MatMul's K) of each tensor over ``feeds``, at most ``max_rows``.

    Runs the float model once per feed with the tensors as extra outputs; keeps a seeded
    random subset of rows per feed so memory stays bounded by ``max_rows`` per tensor.
    """
    from onnxopt.quantization.qdq import with_outputs
    from onnxopt.verify import make_session

    if not feeds or not tensors:
        return {}
    rng = np.random.default_rng(seed)
    per_feed = max(1, max_rows // len(feeds))
    kept: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    sess = make_session(with_outputs(model, tensors))
    try:
        outs = (sess.run(feed) for feed in feeds)
        _keep_rows(outs, tensors, kept, per_feed, rng)
    finally:
        sess.close()
    return {t: np.concatenate(v) for t, v in kept.items() if v}


def _keep_rows(outs, tensors, kept, per_feed, rng) -> None:
    for out in outs:
        for t in tensors:
            if t not in out:
                continue
            a = np.asarray(out[t], dtype=np.float32)
            a = a.reshape(-1, a.shape[-1]) if a.ndim >= 2 else a.reshape(1, -1)
            if a.shape[0] > per_feed:
                a = a[np.sort(rng.choice(a.shape[0], per_feed, replace=False))]
            kept[t].append(a)
