"""Latency statistics and paired speedups.

Percentiles use linear interpolation between order statistics (numpy's default), so
p50 of an even count is the mean of the two middle runs. ``std`` is the sample
standard deviation (n - 1).

A speedup compares two models measured in the same rounds: run ``i`` of the baseline
and run ``i`` of the candidate come from the same round, close together in time, so
``baseline[i] / candidate[i]`` is one paired ratio in which slow drift of the machine
(clock boost, a neighbour's job, thermal state) cancels. The reported speedup is the
median of those ratios (robust to the odd descheduled run) and its interval is a
percentile bootstrap of that median, with a fixed seed so a report is reproducible.

With ``block`` runs per model per round (``--block``), the runs of one round share the
machine state of that moment and are not independent; resampled one by one they make
the interval too narrow, and an A/A pair (one model against itself) often got an
interval excluding 1.0. The bootstrap therefore resamples whole rounds (a cluster
bootstrap); with ``block=1`` that is the ordinary paired bootstrap. One round gives no
spread to resample, so its interval is ``None``.
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
    block: int = 1,
) -> tuple[float, tuple[float, float] | None]:
    """Median of ``baseline[i] / candidate[i]`` and its bootstrap interval (>1: candidate faster).

    Runs ``i`` with the same ``i // block`` are one round, resampled together (the last
    round may be shorter). The interval is ``None`` with fewer than two rounds.
    """
    b = np.asarray(baseline_ms, dtype=np.float64)
    c = np.asarray(candidate_ms, dtype=np.float64)
    if b.shape != c.shape or b.size == 0:
        raise ValueError("paired speedup needs two equally long, non-empty series")
    if block < 1:
        raise ValueError("block must be at least 1")
    ratios = b / c
    median = float(np.median(ratios))
    n = ratios.size
    n_rounds = -(-n // block)
    if n_rounds < 2:
        return median, None
    # One row per round; a short last round is padded with NaN, which nanmedian skips.
    by_round = np.full(n_rounds * block, np.nan)
    by_round[:n] = ratios
    by_round = by_round.reshape(n_rounds, block)
    rng = np.random.default_rng(seed)
    medians = np.empty(resamples)
    # Resample in chunks so memory stays bounded for long --duration runs.
    chunk = max(1, min(resamples, 4_000_000 // (n_rounds * block)))
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, n_rounds, size=(stop - start, n_rounds))
        drawn = by_round[idx].reshape(stop - start, -1)
        medians[start:stop] = np.median(drawn, axis=1) if n % block == 0 else np.nanmedian(drawn, axis=1)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(medians, [alpha, 1 - alpha])
    return median, (float(lo), float(hi))


def rounds_of(pairs: int, block: int) -> int:
    """How many rounds ``pairs`` paired runs span with ``block`` runs per model per round."""
    return -(-pairs // block)
