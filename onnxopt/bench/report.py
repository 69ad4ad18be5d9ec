"""``BenchReport``: the benchmark's results as data, JSON, CSV, a table and a plot.

The JSON layout is described in ``docs/bench.md`` and pinned by ``schema.json`` in
this package (:func:`onnxopt.bench.schema.validate_report` checks a report against it).
Per-run latencies stay in memory (``samples``) for plotting and are not written to
JSON, which keeps reports small and diffable.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os

import numpy as np

from onnxopt.atomic import write_text_atomic
from onnxopt.model_io import check_side_output

SCHEMA_VERSION = "onnxopt.bench/1"


def _clean(obj):
    """JSON has no NaN/Infinity: non-finite numbers become null (shapes say why)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.floating, np.integer)):
        return _clean(obj.item())
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


@dataclasses.dataclass
class BenchReport:
    machine: dict
    packages: dict
    settings: dict
    results: list[dict]
    comparisons: list[dict]
    samples: dict = dataclasses.field(default_factory=dict, repr=False)
    # The model files timed: a report path that names one of them is refused, not overwritten.
    model_paths: list = dataclasses.field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return _clean(
            {
                "schema": SCHEMA_VERSION,
                "machine": self.machine,
                "packages": self.packages,
                "settings": self.settings,
                "results": self.results,
                "comparisons": self.comparisons,
            }
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def write_json(self, path: str | os.PathLike) -> None:
        check_side_output(path, "json", inputs=self.model_paths)
        write_text_atomic(path, self.to_json() + "\n")

    def comparison_for(self, result: dict) -> dict | None:
        for c in self.comparisons:
            if (c["candidate"], c["ep"], c["batch"]) == (result["model"], result["ep"], result["batch"]):
                return c
        return None

    CSV_COLUMNS = (
        "model", "ep", "batch", "runs", "mean_ms", "std_ms", "min_ms", "max_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms",
        "throughput_per_s", "first_run_ms", "session_init_ms", "peak_memory_mb", "intra_op_threads", "io_binding",
        "speedup", "speedup_lo", "speedup_hi",
    )

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.CSV_COLUMNS)
        for r in self.results:
            lat = r["latency_ms"]
            c = self.comparison_for(r)
            w.writerow([
                r["model"], r["ep"], r["batch"], r["runs"],
                *(f"{lat[k]:.6f}" for k in ("mean", "std", "min", "max", "p50", "p90", "p95", "p99")),
                f"{r['throughput_per_s']:.3f}", f"{r['first_run_ms']:.6f}", f"{r['session_init_ms']:.6f}",
                "" if r["peak_memory_mb"] is None else r["peak_memory_mb"], r["threads"]["intra_op"], r["io_binding"],
                *( [f"{c['speedup']:.4f}", f"{c['speedup_interval'][0]:.4f}", f"{c['speedup_interval'][1]:.4f}"] if c else ["", "", ""]),
            ])
        return buf.getvalue()

    def write_csv(self, path: str | os.PathLike) -> None:
        check_side_output(path, "csv", inputs=self.model_paths)
        write_text_atomic(path, self.to_csv())

    def tables(self):
        """Rich renderables: the latency table and, with --check-outputs, the accuracy table."""
        from rich.table import Table

        t = Table(title="onnxopt bench: latency (ms) per inference call")
        t.add_column("model", overflow="fold")
        for col in ("ep", "batch", "runs", "p50", "p90", "p99", "mean ± std", "min", "samples/s", "first run", "session init", "peak MB"):
            t.add_column(col, justify="left" if col == "ep" else "right", no_wrap=col == "mean ± std")
        if self.comparisons:
            # Numbers that wrap mid-interval are misread; the header breaks where it should instead.
            t.add_column("speedup vs first\n[95% CI]", justify="right", no_wrap=True)
        for r in self.results:
            lat = r["latency_ms"]
            c = self.comparison_for(r)
            speed = [f"{c['speedup']:.3f}x [{c['speedup_interval'][0]:.3f}, {c['speedup_interval'][1]:.3f}]" if c else "baseline"]
            t.add_row(
                r["model"], r["ep"], str(r["batch"]), str(r["runs"]), f"{lat['p50']:.3f}", f"{lat['p90']:.3f}", f"{lat['p99']:.3f}",
                f"{lat['mean']:.3f} ± {lat['std']:.3f}", f"{lat['min']:.3f}", f"{r['throughput_per_s']:.1f}",
                f"{r['first_run_ms']:.1f}", f"{r['session_init_ms']:.1f}",
                "?" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.1f}", *(speed if self.comparisons else []),
            )
        th = self.settings["threads"]
        if not th.get("spinning", True):
            spin = ", no spinning"
        elif th.get("spinning_stops_after_run"):
            spin = ", spinning stopped after each run"
        else:
            spin = ""
        t.caption = (
            f"threads: intra-op {th['intra_op']} ({th['source']}), inter-op {th['inter_op']}, {th['execution_mode']}"
            f"{spin}; "
            f"warm-up {self.settings['warmup']} runs; first run and session init not in the statistics"
            + ("; interleaved rounds" + (f" of {self.settings.get('block', 1)} back-to-back runs per model"
                                         if self.settings.get("block", 1) > 1 else "")
               + "; speedup = median of paired per-round ratios, bootstrap 95% interval" if self.comparisons else "")
        )
        out = [t]
        diffs = [c for c in self.comparisons if c.get("outputs")]
        if diffs:
            d = Table(title="outputs vs the first model (same inputs, same run)")
            for col in ("candidate", "ep", "batch", "output", "max abs err", "max rel err", "cosine", "within rtol/atol"):
                d.add_column(col)
            for c in diffs:
                for o in c["outputs"]:
                    d.add_row(
                        c["candidate"], c["ep"], str(c["batch"]), o["name"], _fmt(o["max_abs"]), _fmt(o["max_rel"]),
                        _fmt(o["cosine"], ".6f"), "yes" if o["within"] else "no",
                    )
            out.append(d)
        return out

    def plot(self, path: str | os.PathLike) -> None:
        from onnxopt.bench.plot import plot_report

        check_side_output(path, "plot", inputs=self.model_paths)
        plot_report(self, path)


def _fmt(x, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return str(x)
    return format(x, spec)
