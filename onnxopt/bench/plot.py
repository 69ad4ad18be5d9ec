"""Latency distributions side by side (matplotlib, the optional ``onnxopt[plot]`` extra)."""

from __future__ import annotations

import importlib.util
import io
import os

from onnxopt.errors import OnnxoptError

MISSING = "--plot needs matplotlib: pip install 'onnxopt[plot]'"


def require_matplotlib() -> None:
    """Fail before any benchmarking if the plot cannot be drawn."""
    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise OnnxoptError(MISSING)


def plot_report(report, path: str | os.PathLike) -> None:
    """One panel per (provider, batch): a box per model over its per-run latencies."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from onnxopt.atomic import write_bytes_atomic

    settings = sorted({(ep, batch) for (_, ep, batch) in report.samples}, key=lambda s: (s[0], s[1]))
    models = list(dict.fromkeys(label for (label, _, _) in report.samples))
    fig, axes = plt.subplots(1, max(1, len(settings)), figsize=(max(5, 1.6 * len(models) + 2) * max(1, len(settings)), 4.5), squeeze=False)
    for ax, (ep, batch) in zip(axes[0], settings):
        data = [report.samples[(m, ep, batch)] for m in models if (m, ep, batch) in report.samples]
        names = [m for m in models if (m, ep, batch) in report.samples]
        ax.violinplot(data, showmedians=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=15, ha="right", fontsize=8)
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{ep}, batch {batch}")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    fig.savefig(buf, format=fmt, dpi=120)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
