"""Latency statistics and paired speedups.

Percentiles use linear interpolation between order statistics (numpy's default), so
p50 of an even count is the mean of the two middle runs. ``std`` is the sample
standard deviation (n - 1).

A speedup compares two models measured in the same rounds: round ``i`` ran the
baseline and the candidate back to back, so ``baseline[i] / candidate[i]`` is one
paired ratio in which slow drift of the machine (clock boost, a neighbour's job,
thermal state) cancels. The reported speedup is the median of those ratios (robust to
the odd descheduled run) and its interval is a percentile bootstrap of that median:
pairs are resampled with replacement, with a fixed seed so a report is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PERCENTILES = (50, 90, 95, 99)


def latency_stats(times_ms: Sequence[float] | np.ndarray) -> dict[str, float]:
    t = np.asarray(times_ms, dtype=np.float64)
    if t.size == 0:
        raise ValueError("no timed runs")
    p = np.percentile(t, PERCENTILES)
    return {
        "mean": float(t.mean()),
        "std": float(t.std(ddof=1)) if t.size > 1 else 0.0,
        "min": float(t.min()),
        "max": float(t.max()),
        **{f"p{q}": float(v) for q, v in zip(PERCENTILES, p)},
    }


def paired_speedup(
    baseline_ms: Sequence[float] | np.ndarray,
    candidate_ms: Sequence[float] | np.ndarray,
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """Median of ``baseline[i] / candidate[i]`` and its bootstrap interval (>1: candidate faster)."""
    b = np.asarray(baseline_ms, dtype=np.float64)
    c = np.asarray(candidate_ms, dtype=np.float64)
    if b.shape != c.shape or b.size == 0:
        raise ValueError("paired speedup needs two equally long, non-empty series")
    ratios = b / c
    median = float(np.median(ratios))
    n = ratios.size
    if n == 1:
        return median, (median, median)
    rng = np.random.default_rng(seed)
    medians = np.empty(resamples)
    # Resample in chunks so memory stays bounded for long --duration runs.
    chunk = max(1, min(resamples, 4_000_000 // n))
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        medians[start:stop] = np.median(ratios[idx], axis=1)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(medians, [alpha, 1 - alpha])
    return median, (float(lo), float(hi))
