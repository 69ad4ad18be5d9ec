"""Streaming, mergeable range observers for static quantization.

An observer sees a tensor batch by batch (``update``), forgets the batch, and at the end
proposes a quantization range (``range() -> (lo, hi)``). Observers of the same kind and
options merge exactly (``a.merge(b)``), so calibration can be sharded.

Methods
-------
``minmax``      the smallest and largest finite value seen.
``percentile``  the ``(100-p)``-th and ``p``-th percentiles (two-sided; with ``symmetric=True``
                the ``p``-th percentile of ``|x|``, giving ``(-T, T)``).
``entropy``     TensorRT's KL-divergence threshold search (alias ``kl``), run on each side of
                zero separately (see :meth:`HistogramObserver._entropy_range`).
``mse``         the clip range that minimises the expected squared quantization error
                (rounding noise inside, clipping error outside) for uint8 asymmetric
                (default) or int8 symmetric (``symmetric=True``).

Non-finite and mask-like values
-------------------------------
NaN and +-Inf never enter a histogram; they clear ``finite``. Values with
``|x| > outlier_abs`` (default 1e6: additive attention masks use -1e4..-3.4e38) are
"saturating" values: they are counted in ``outlier_count``, set ``saturated``, and are kept
out of the histogram so that one ``-3.4e38`` does not leave every real value in one bin.
``observed_min`` / ``observed_max`` report the raw extremes (non-NaN, so they can be
+-Inf or -3.4e38); the chosen ``range()`` is always finite and lies within the histogram's
(the "core") values. A quantizer should keep tensors with ``finite=False`` or
``saturated=True`` in float.

The histogram
-------------
Bins live on a global grid: bin ``g`` covers ``[g*w, (g+1)*w)`` with ``w`` a power of two,
and an observer stores the ``2*num_bins`` slots from ``g0``. ``w`` is always the smallest
power of two (not below ``|x|max * 2**-22``, the float32 resolution) for which the values
seen so far fit in the slots. Because grids with power-of-two widths nest, growing the
range merges whole bins (no interpolation, no smearing like a re-binned histogram), and
merging two observers gives exactly the histogram of observing both streams: the result
does not depend on batch order or sharding. The occupied span is between ``num_bins`` and
``2*num_bins`` bins. ``x * 2**-k`` and ``floor`` are exact in float32, so binning is exact.
Cost per element: two reductions (min/max) and ~1.2 ns for the histogram (float32 work in
64k-element blocks that stay in cache, then ``np.add.at`` on intp bin indices); no float64
copies.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np

from onnxopt.errors import OnnxoptError

METHODS = ("minmax", "percentile", "entropy", "mse")
_ALIASES = {"kl": "entropy", "min-max": "minmax", "min_max": "minmax", "max": "minmax"}

DEFAULT_OUTLIER_ABS = 1e6
_BLOCK = 1 << 16  # elements per histogram block: float32 + intp buffers stay in L2 (measured best)
_MIN_EXP = -100  # smallest bin width 2**-100 (constant-zero tensors)
_REL_EXP = -22  # bins never finer than |x|max * 2**-22: finer is below float32 resolution
# ufunc.at got its fast path in numpy 2 (1.2x faster than bincount here; before, far slower).
_FAST_ADD_AT = int(np.__version__.split(".")[0]) >= 2


def canonical_method(method: str) -> str:
    m = _ALIASES.get(method.lower(), method.lower())
    if m not in METHODS:
        raise OnnxoptError(f"unknown calibration method {method!r} (choose from {', '.join(METHODS)})")
    return m


class Observer:
    """Base: counts, finiteness, raw extremes and the finite core min/max.

    Subclasses add the per-method state. All statistics are float64 Python scalars; the
    big arrays are only ever reduced in their own dtype.
    """

    method = "minmax"

    def __init__(self, *, outlier_abs: float = DEFAULT_OUTLIER_ABS, symmetric: bool = False, **_: Any):
        if not outlier_abs > 0:
            raise OnnxoptError(f"outlier_abs must be positive, got {outlier_abs}")
        self.outlier_abs = float(outlier_abs)
        self.symmetric = bool(symmetric)
        self.count = 0  # elements seen (all of them)
        self.nonfinite_count = 0  # NaN or +-Inf
        self.outlier_count = 0  # finite but |x| > outlier_abs
        self.observed_min = math.inf  # raw, NaN ignored (may be -inf / -3.4e38)
        self.observed_max = -math.inf
        self.core_min = math.inf  # finite, |x| <= outlier_abs: what ranges are built from
        self.core_max = -math.inf

    # -- public -----------------------------------------------------------------
    @property
    def finite(self) -> bool:
        return self.nonfinite_count == 0

    @property
    def saturated(self) -> bool:
        return self.outlier_count > 0

    @property
    def core_count(self) -> int:
        return self.count - self.nonfinite_count - self.outlier_count

    def update(self, array: np.ndarray) -> None:
        """Observe one batch. Only reductions and (for histograms) small blocks are allocated."""
        x = np.asarray(array)
        if x.dtype == np.bool_:
            x = x.view(np.uint8)
        if x.size == 0:
            return
        self.count += x.size
        # One min and one max answer everything on the common path: NaN propagates through
        # both, so finite extremes within the outlier bound mean a clean batch.
        lo, hi = float(x.min()), float(x.max())
        if -self.outlier_abs <= lo and hi <= self.outlier_abs:  # False for NaN / Inf
            self.observed_min = min(self.observed_min, lo)
            self.observed_max = max(self.observed_max, hi)
            self._core(x, lo, hi)
            return
        self._update_slow(x)

    def _update_slow(self, x: np.ndarray) -> None:
        # Rare path (masks, overflow): one boolean mask, then the clean values.
        if x.dtype.kind == "f":
            nan = np.isnan(x)
            n_nan = int(np.count_nonzero(nan))
            if n_nan < x.size:
                self.observed_min = min(self.observed_min, float(np.nanmin(x) if n_nan else x.min()))
                self.observed_max = max(self.observed_max, float(np.nanmax(x) if n_nan else x.max()))
            finite = np.isfinite(x)
            self.nonfinite_count += x.size - int(np.count_nonzero(finite))
            keep = finite
            del nan
        else:
            self.observed_min = min(self.observed_min, float(x.min()))
            self.observed_max = max(self.observed_max, float(x.max()))
            keep = np.ones(x.shape, dtype=bool)
        inside = keep & (np.abs(x) <= self.outlier_abs)
        self.outlier_count += int(np.count_nonzero(keep)) - int(np.count_nonzero(inside))
        core = x[inside]
        if core.size:
            self._core(core, float(core.min()), float(core.max()))

    def update_extremes(self, lo: float, hi: float, count: int) -> None:
        """Observe a batch known only by its min, max and size (reductions run inside ONNX
        Runtime). Only for min-max observers, and only when the caller knows the batch
        holds no NaN/Inf; extremes beyond ``outlier_abs`` need the values (``update``)."""
        if type(self)._core is not Observer._core:
            raise TypeError(f"{type(self).__name__} needs the values; use update()")
        if not (-self.outlier_abs <= lo <= hi <= self.outlier_abs):
            raise ValueError("update_extremes needs finite extremes within outlier_abs; use update()")
        self.count += int(count)
        self.observed_min = min(self.observed_min, float(lo))
        self.observed_max = max(self.observed_max, float(hi))
        Observer._core(self, None, float(lo), float(hi))  # type: ignore[arg-type]

    def _core(self, x: np.ndarray, lo: float, hi: float) -> None:
        """Finite values within the outlier bound, with their min/max already known."""
        self.core_min = min(self.core_min, lo)
        self.core_max = max(self.core_max, hi)

    def merge(self, other: Observer) -> Observer:
        """A new observer equal to having observed both streams (neither input changes)."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        out = copy.deepcopy(self)
        out._merge_from(other)
        return out

    def _merge_from(self, other: Observer) -> None:
        self.count += other.count
        self.nonfinite_count += other.nonfinite_count
        self.outlier_count += other.outlier_count
        self.observed_min = min(self.observed_min, other.observed_min)
        self.observed_max = max(self.observed_max, other.observed_max)
        self.core_min = min(self.core_min, other.core_min)
        self.core_max = max(self.core_max, other.core_max)

    def core_range(self) -> tuple[float, float]:
        """Finite min/max of the core values, (0, 0) if none was seen."""
        if self.core_count <= 0:
            return 0.0, 0.0
        return self.core_min, self.core_max

    def range(self) -> tuple[float, float]:
        """The chosen quantization range (finite, within the core min/max)."""
        lo, hi = self.core_range()
        if self.symmetric:
            t = max(abs(lo), abs(hi))
            return -t, t
        return lo, hi

    def __repr__(self) -> str:
        lo, hi = self.range()
        return (
            f"{type(self).__name__}(method={self.method!r}, count={self.count}, range=({lo:.6g}, {hi:.6g}), "
            f"finite={self.finite}, saturated={self.saturated})"
        )


class MinMaxObserver(Observer):
    method = "minmax"


class HistogramObserver(Observer):
    """Core values in a power-of-two-width histogram (see the module docstring)."""

    method = "percentile"

    def __init__(self, *, num_bins: int = 2048, percentile: float = 99.99, **kw: Any):
        super().__init__(**kw)
        if int(num_bins) < 16:
            raise OnnxoptError(f"num_bins must be at least 16, got {num_bins}")
        if not 50.0 < float(percentile) <= 100.0:
            raise OnnxoptError(f"percentile must be in (50, 100], got {percentile}")
        self.num_bins = int(num_bins)
        self.slots = 2 * self.num_bins
        self.percentile = float(percentile)
        self.exp: int | None = None  # bin width w = 2**exp
        self.g0 = 0  # global index of slot 0
        self.counts = np.zeros(self.slots, dtype=np.int64)

    # -- histogram maintenance ------------------------------------------------------
    def _fit_exp(self, lo: float, hi: float, start: int | None) -> int:
        """Smallest exponent >= start (and the resolution floor) at which [lo, hi] fits."""
        e = self._floor_exp(lo, hi)
        if start is not None:
            e = max(e, start)
        span = hi - lo
        if span > 0:
            # Jump close to the answer, then step: floor(hi/w) - floor(lo/w) < slots.
            e = max(e, math.frexp(span / self.slots)[1] - 1)
        while math.floor(math.ldexp(hi, -e)) - math.floor(math.ldexp(lo, -e)) >= self.slots:
            e += 1
        return e

    def _rebin(self, exp: int, g0: int) -> None:
        """Move the counts to width 2**exp (>= current) starting at global index g0."""
        if self.exp is None:
            self.exp, self.g0 = exp, g0
            return
        if exp == self.exp and g0 == self.g0:
            return
        nz = np.flatnonzero(self.counts)
        new = np.zeros(self.slots, dtype=np.int64)
        if nz.size:
            g = (nz + self.g0) >> (exp - self.exp)  # arithmetic shift = floor division by 2**d
            np.add.at(new, g - g0, self.counts[nz])
        self.counts, self.exp, self.g0 = new, exp, g0

    def _floor_exp(self, lo: float, hi: float) -> int:
        amax = max(abs(lo), abs(hi))
        return max(_MIN_EXP, math.frexp(amax)[1] + _REL_EXP) if amax > 0 else _MIN_EXP

    def _core(self, x: np.ndarray, lo: float, hi: float) -> None:
        # Grow (never shrink) the grid so that everything seen so far plus [lo, hi] fits;
        # the width stays the smallest power of two that holds the union (see docstring).
        ulo, uhi = min(lo, self.core_min), max(hi, self.core_max)
        fits = False
        if self.exp is not None and self._floor_exp(ulo, uhi) <= self.exp:
            g_lo = math.floor(math.ldexp(ulo, -self.exp))
            g_hi = math.floor(math.ldexp(uhi, -self.exp))
            fits = g_lo >= self.g0 and g_hi < self.g0 + self.slots
        if not fits:
            exp = self._fit_exp(ulo, uhi, self.exp)
            self._rebin(exp, math.floor(math.ldexp(ulo, -exp)))
        super()._core(x, lo, hi)
        self._accumulate(x)

    def _accumulate(self, x: np.ndarray) -> None:
        flat = x.reshape(-1)
        n = flat.size
        inv_w = np.float32(math.ldexp(1.0, -self.exp))
        g0 = np.float32(self.g0)
        # float32/float16 values bin exactly, so every index is in [0, slots). Other dtypes
        # are rounded to float32 per block, which may push a top value one bin past the end:
        # those blocks are clipped (as the scatter below would otherwise raise or wrap).
        top = None if x.dtype in (np.float32, np.float16) else np.float32(self.slots - 1)
        bsz = min(_BLOCK, n)
        fbuf = np.empty(bsz, dtype=np.float32)
        ibuf = np.empty(bsz, dtype=np.intp)
        counts = self.counts
        for start in range(0, n, _BLOCK):
            blk = flat[start : start + _BLOCK]
            m = blk.size
            f, i = fbuf[:m], ibuf[:m]
            # x * 2**-e is exact in float32 (also for int/float16 input, cast per block);
            # floor is exact; the difference of two integers below 2**24 is exact.
            np.multiply(blk, inv_w, out=f, casting="unsafe")
            np.floor(f, out=f)
            np.subtract(f, g0, out=f)
            if top is not None:
                np.clip(f, 0, top, out=f)
            i[...] = f
            if _FAST_ADD_AT:
                # numpy >= 2's unbuffered add.at on intp indices is ~25% faster than bincount
                # here (bincount casts, scans min/max, then allocates its own counts).
                np.add.at(counts, i, 1)
            else:
                counts += np.bincount(i, minlength=self.slots)

    def _merge_from(self, other: Observer) -> None:
        assert isinstance(other, HistogramObserver)
        if other.num_bins != self.num_bins:
            raise ValueError("cannot merge histograms with different num_bins")
        mine_before = self.core_count
        self_lo, self_hi = self.core_min, self.core_max
        super()._merge_from(other)
        if other.exp is None or other.core_count <= 0:
            return
        if self.exp is None or mine_before <= 0:
            self.exp, self.g0, self.counts = other.exp, other.g0, other.counts.copy()
            return
        lo, hi = min(self_lo, other.core_min), max(self_hi, other.core_max)
        exp = self._fit_exp(lo, hi, max(self.exp, other.exp))
        g0 = math.floor(math.ldexp(lo, -exp))
        self._rebin(exp, g0)
        theirs = copy.deepcopy(other)
        theirs._rebin(exp, g0)
        self.counts += theirs.counts

    # -- reading the histogram --------------------------------------------------------
    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """``(counts, edges)`` over the occupied bins (``len(edges) == len(counts) + 1``)."""
        if self.exp is None or self.core_count <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(1)
        nz = np.flatnonzero(self.counts)
        a, b = nz[0], nz[-1] + 1
        w = math.ldexp(1.0, self.exp)
        edges = (np.arange(a, b + 1, dtype=np.float64) + self.g0) * w
        return self.counts[a:b].copy(), edges

    def _abs_histogram(self) -> tuple[np.ndarray, float]:
        """Histogram of |x| from 0 (exact fold of the signed grid), and its bin width."""
        counts, edges = self.histogram()
        w = math.ldexp(1.0, self.exp)
        g = np.round(edges[:-1] / w).astype(np.int64)  # global indices of the bins
        folded = np.where(g >= 0, g, -g - 1)
        out = np.zeros(int(folded.max()) + 1, dtype=np.int64)
        np.add.at(out, folded, counts)
        return out, w

    def _side_histogram(self, positive: bool) -> tuple[np.ndarray, float]:
        """Histogram of x (positive side) or -x (negative side), from 0 outwards."""
        counts, edges = self.histogram()
        w = math.ldexp(1.0, self.exp)
        g = np.round(edges[:-1] / w).astype(np.int64)
        sel = g >= 0 if positive else g < 0
        idx = g[sel] if positive else -g[sel] - 1
        if idx.size == 0:
            return np.zeros(0, dtype=np.int64), w
        out = np.zeros(int(idx.max()) + 1, dtype=np.int64)
        np.add.at(out, idx, counts[sel])
        return out, w

    # -- methods ---------------------------------------------------------------------
    def _clamp(self, lo: float, hi: float) -> tuple[float, float]:
        cmin, cmax = self.core_range()
        if self.symmetric:
            t = min(max(abs(lo), abs(hi)), max(abs(cmin), abs(cmax)))
            return -t, t
        lo = min(max(lo, cmin), cmax)
        hi = min(max(hi, cmin), cmax)
        return (lo, hi) if lo <= hi else (hi, lo)

    def range(self) -> tuple[float, float]:
        if self.core_count <= 0:
            return 0.0, 0.0
        return self._clamp(*self._method_range())

    def _method_range(self) -> tuple[float, float]:
        return self._percentile_range()

    def _percentile_range(self) -> tuple[float, float]:
        p = self.percentile / 100.0
        if self.symmetric:
            counts, w = self._abs_histogram()
            t = _quantile(counts, np.arange(counts.size + 1) * w, p)
            return -t, t
        counts, edges = self.histogram()
        return _quantile(counts, edges, 1.0 - p), _quantile(counts, edges, p)

    def percentile_value(self, q: float) -> float:
        """The q-th percentile (0..100) of the core values, linear within a bin."""
        counts, edges = self.histogram()
        if counts.size == 0:
            return 0.0
        return _quantile(counts, edges, q / 100.0)


def _quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """Value below which a fraction q of the histogram's mass lies (uniform within bins)."""
    total = counts.sum()
    if total <= 0:
        return 0.0
    cum = np.cumsum(counts, dtype=np.float64)
    target = q * total
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, counts.size - 1)
    before = cum[i - 1] if i > 0 else 0.0
    frac = (target - before) / counts[i] if counts[i] > 0 else 0.0
    return float(edges[i] + min(max(frac, 0.0), 1.0) * (edges[i + 1] - edges[i]))


class PercentileObserver(HistogramObserver):
    method = "percentile"


class EntropyObserver(HistogramObserver):
    """TensorRT's entropy calibration: the clip threshold whose 8-bit quantized
    distribution has the smallest KL divergence from the observed one.

    For each candidate threshold (in bins) ``i``: P = the histogram up to ``i`` with
    everything beyond folded into the last bin; Q = those ``i`` bins merged into ``L``
    quantization levels and spread back uniformly over each level's non-empty bins;
    minimise KL(P || Q). Sign handling: with ``symmetric=True`` the search runs on |x|
    with 127 levels -> ``(-T, T)``. Otherwise (uint8 asymmetric) a tensor without negative
    values is searched on ``[0, max]`` with 255 levels; a tensor with both signs is searched
    on each side separately, each side getting levels in proportion to its observed extent
    (at least 16), -> ``(-T_neg, T_pos)``. Candidates are capped at ~256 per side (evenly
    strided) so the search costs milliseconds per tensor.
    """

    method = "entropy"
    max_candidates = 256

    def _method_range(self) -> tuple[float, float]:
        cmin, cmax = self.core_range()
        if self.symmetric:
            counts, w = self._abs_histogram()
            t = _kl_threshold(counts, 127, self.max_candidates) * w
            return -t, t
        if cmin >= 0 or cmax <= 0:
            positive = cmin >= 0
            counts, w = self._side_histogram(positive)
            t = _kl_threshold(counts, 255, self.max_candidates) * w
            return (0.0, t) if positive else (-t, 0.0)
        total = cmax - cmin
        lev_pos = int(min(max(round(255 * cmax / total), 16), 255 - 16))
        pos, w = self._side_histogram(True)
        neg, _ = self._side_histogram(False)
        t_pos = _kl_threshold(pos, lev_pos, self.max_candidates) * w
        t_neg = _kl_threshold(neg, 255 - lev_pos, self.max_candidates) * w
        return -t_neg, t_pos


def _kl_threshold(hist: np.ndarray, levels: int, max_candidates: int) -> int:
    """Number of bins (from 0) to keep, TensorRT style. Returns len(hist) if no clipping helps."""
    n = hist.size
    if n <= levels:
        return n
    hist = hist.astype(np.float64)
    nonzero = (hist > 0).astype(np.float64)
    csum = np.concatenate([[0.0], np.cumsum(hist)])  # per-level sums in O(levels) per candidate
    cnz = np.concatenate([[0.0], np.cumsum(nonzero)])
    total = csum[-1]
    step = max(1, (n - levels) // max_candidates)
    candidates = list(range(levels, n + 1, step))
    if candidates[-1] != n:
        candidates.append(n)
    lev = np.arange(levels + 1, dtype=np.int64)
    best_i, best_kl = n, math.inf
    for i in candidates:
        # Bins j with j*levels//i == l form level l: j in [ceil(l*i/levels), ceil((l+1)*i/levels)).
        bounds = -((-lev * i) // levels)
        mass = csum[bounds[1:]] - csum[bounds[:-1]]
        used = cnz[bounds[1:]] - cnz[bounds[:-1]]
        per_bin = np.repeat(mass / np.maximum(used, 1.0), np.diff(bounds))
        q = per_bin * nonzero[:i]  # each level's mass spread evenly over its non-empty bins
        p = hist[:i].copy()
        p[i - 1] += total - csum[i]  # everything beyond the threshold is clipped into the last bin
        keep = p > 0
        ps, qs = total, q.sum()
        if qs <= 0:
            continue
        p_n = p[keep] / ps
        # A bin with p > 0 and q == 0 (clipped mass landing in an empty source bin):
        # TensorRT smooths; a small epsilon does the same job.
        q_n = np.maximum(q[keep] / qs, 1e-12)
        kl = float(np.dot(p_n, np.log(p_n / q_n)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i


class MSEObserver(HistogramObserver):
    """Clip range minimising the expected squared quantization error.

    For a range [a, b] containing 0 with step s = (b - a) / 255 (uint8 asymmetric) the error
    of a value x is about s**2/12 inside (uniform rounding noise) and (x - clip(x))**2
    outside. With the histogram's bin centres this is
    ``E(a, b) = s**2/12 * N_in(a, b) + Elo(a) + Ehi(b)``, where ``Elo`` / ``Ehi`` come from
    prefix sums of n, n*c and n*c**2, so every (a, b) pair on a grid of bin edges is
    evaluated at once by broadcasting (<= 384 x 384 candidates). ``symmetric=True`` (int8
    symmetric, s = T/127) searches T on the |x| histogram.
    """

    method = "mse"
    max_candidates = 384

    def _method_range(self) -> tuple[float, float]:
        if self.symmetric:
            counts, w = self._abs_histogram()
            centers = (np.arange(counts.size) + 0.5) * w
            cand = _edge_candidates(counts.size, self.max_candidates) * w
            cand = cand[cand > 0]
            if cand.size == 0:
                return 0.0, 0.0
            n_out, e_out = _tail_error(counts, centers, cand, upper=True)
            err = (cand / 127.0) ** 2 / 12.0 * (counts.sum() - n_out) + e_out
            t = float(cand[int(np.argmin(err))])
            return -t, t
        counts, edges = self.histogram()
        centers = 0.5 * (edges[:-1] + edges[1:])
        cmin, cmax = self.core_range()
        lo_c = edges[_edge_candidates(counts.size, self.max_candidates)]
        a = np.unique(np.minimum(np.concatenate([lo_c[lo_c <= 0], [min(cmin, 0.0)]]), 0.0))
        b = np.unique(np.maximum(np.concatenate([lo_c[lo_c >= 0], [max(cmax, 0.0)]]), 0.0))
        nlo, elo = _tail_error(counts, centers, a, upper=False)
        nhi, ehi = _tail_error(counts, centers, b, upper=True)
        s = (b[None, :] - a[:, None]) / 255.0
        err = s * s / 12.0 * (counts.sum() - nlo[:, None] - nhi[None, :]) + elo[:, None] + ehi[None, :]
        i, j = np.unravel_index(int(np.argmin(err)), err.shape)
        return float(a[i]), float(b[j])


def _edge_candidates(nbins: int, max_candidates: int) -> np.ndarray:
    step = max(1, nbins // max_candidates)
    idx = np.arange(0, nbins + 1, step)
    if idx[-1] != nbins:
        idx = np.append(idx, nbins)
    return idx


def _tail_error(counts: np.ndarray, centers: np.ndarray, cuts: np.ndarray, *, upper: bool):
    """For each cut t: (count, sum of n*(c - t)**2) over bins beyond t (above if upper)."""
    n = counts.astype(np.float64)
    c1 = np.concatenate([[0.0], np.cumsum(n)])
    c2 = np.concatenate([[0.0], np.cumsum(n * centers)])
    c3 = np.concatenate([[0.0], np.cumsum(n * centers * centers)])
    if upper:
        k = np.searchsorted(centers, cuts, side="right")  # bins k.. are above the cut
        cnt, s1, s2 = c1[-1] - c1[k], c2[-1] - c2[k], c3[-1] - c3[k]
    else:
        k = np.searchsorted(centers, cuts, side="left")  # bins ..k-1 are below
        cnt, s1, s2 = c1[k], c2[k], c3[k]
    err = s2 - 2.0 * cuts * s1 + cuts * cuts * cnt
    return cnt, np.maximum(err, 0.0)


_CLASSES = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MSEObserver,
}


def make_observer(method: str = "minmax", **opts: Any) -> Observer:
    """A fresh observer: ``minmax``, ``percentile``, ``entropy`` (``kl``) or ``mse``.

    Options: ``num_bins`` (2048), ``percentile`` (99.99), ``symmetric`` (False: ranges for
    uint8 asymmetric; True: ``(-T, T)`` for int8 symmetric), ``outlier_abs`` (1e6).
    Options a method does not use are ignored, so one option set serves every method.
    """
    cls = _CLASSES[canonical_method(method)]
    if cls is MinMaxObserver:
        opts = {k: v for k, v in opts.items() if k in ("outlier_abs", "symmetric")}
    return cls(**opts)
