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
from onnxopt.errors import OnnxoptError
from onnxopt.model_io import check_side_output

SCHEMA_VERSION = "onnxopt.bench/1"


def check_report_path(path, option: str, *, models=(), inputs_file=None, outputs=()):
    """``check_side_output`` plus: the path must not be the ``--inputs`` file either."""
    p = check_side_output(path, option, inputs=[m for m in models if m is not None], outputs=outputs)
    if inputs_file is not None:
        q = os.fspath(inputs_file)
        same = os.path.abspath(p) == os.path.abspath(q)
        if not same and os.path.exists(p) and os.path.exists(q):
            same = os.path.samefile(p, q)
        if same:
            raise OnnxoptError(f"{option} {p}: is the --inputs file; write it to a new file")
    return p


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
    # The model files timed and the --inputs file: a report path that names one of them
    # is refused, not overwritten.
    model_paths: list = dataclasses.field(default_factory=list, repr=False)
    inputs_path: str | None = dataclasses.field(default=None, repr=False)
    # One-line warnings for the person reading the numbers (the CLI prints them on stderr).
    warnings: list = dataclasses.field(default_factory=list)

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
        check_report_path(path, "json", models=self.model_paths, inputs_file=self.inputs_path)
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
                *([f"{c['speedup']:.4f}", *_interval_cells(c, ".4f", "")] if c else ["", "", ""]),
            ])
        return buf.getvalue()

    def write_csv(self, path: str | os.PathLike) -> None:
        check_report_path(path, "csv", models=self.model_paths, inputs_file=self.inputs_path)
        write_text_atomic(path, self.to_csv())

    def tables(self, width: int | None = None):
        """Rich renderables: the latency table(s) and, with --check-outputs, the accuracy table.

        ``width``: the console's width. Numbers are never cut short: where the full
        latency table is wider, it is split (timing columns first, then the rest), each
        part repeating model, ep and batch; rich would otherwise shrink the columns and
        turn numbers into "0…". ``None``: one table, whatever its width.
        """
        from rich.table import Table
        from rich.text import Text  # plain text: "[n/a]" or a label in brackets is not markup

        key_cols = [
            _Col("model", [r["model"] for r in self.results], justify="left", wrap=True),
            _Col("ep", [r["ep"] for r in self.results], justify="left"),
            _Col("batch", [str(r["batch"]) for r in self.results]),
        ]
        lat = [r["latency_ms"] for r in self.results]
        timing = [
            _Col("runs", [str(r["runs"]) for r in self.results]),
            *(_Col(k, [f"{x[k]:.3f}" for x in lat]) for k in ("p50", "p90", "p99")),
            _Col("mean ± std", [f"{x['mean']:.3f} ± {x['std']:.3f}" for x in lat]),
        ]
        more = [
            _Col("min", [f"{x['min']:.3f}" for x in lat]),
            _Col("samples/s", [f"{r['throughput_per_s']:.1f}" for r in self.results]),
            _Col("first run", [f"{r['first_run_ms']:.1f}" for r in self.results]),
            _Col("session init", [f"{r['session_init_ms']:.1f}" for r in self.results]),
            _Col("peak MB", ["?" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.1f}" for r in self.results]),
        ]
        speed = []
        if self.comparisons:
            cells = []
            for r in self.results:
                c = self.comparison_for(r)
                if c is None:
                    cells.append("baseline")
                elif c.get("speedup_interval"):
                    lo, hi = _interval_cells(c, ".3f", "")
                    cells.append(f"{c['speedup']:.3f}x [{lo}, {hi}]")
                else:  # one round: no spread to give an interval
                    cells.append(f"{c['speedup']:.3f}x [n/a]")
            speed = [_Col("speedup vs first\n[95% CI]", cells)]

        title = "onnxopt bench: latency (ms) per inference call"
        if width is None or _table_width(key_cols + timing + more + speed) <= width:
            parts = [key_cols + timing + more + speed]
        else:
            parts = _pack(key_cols, timing + speed, width) + _pack(key_cols, more, width)
        out = []
        for i, cols in enumerate(parts):
            fits = width is None or _table_width(cols) <= width
            t = Table(title=title if i == 0 else "onnxopt bench (continued; times in ms)")
            for col in cols:
                if col.wrap:
                    t.add_column(col.header, justify=col.justify, overflow="fold")
                else:
                    # no_wrap keeps a number on one line; where even one column per table
                    # cannot fit, fold it instead, which still shows every digit.
                    t.add_column(col.header, justify=col.justify, no_wrap=fits, overflow="fold")
            for row in zip(*(col.cells for col in cols)):
                t.add_row(*(Text(cell) for cell in row))
            out.append(t)
        out[len(parts) - 1].caption = Text(self._caption(), style="table.caption", justify="center")
        diffs = [c for c in self.comparisons if c.get("outputs")]
        if diffs:
            d = Table(title="outputs vs the first model (same inputs, same run)")
            for col in ("candidate", "ep", "batch", "output", "max abs err", "max rel err", "cosine", "within rtol/atol"):
                d.add_column(col, overflow="fold")
            for c in diffs:
                for o in c["outputs"]:
                    d.add_row(*(Text(cell) for cell in (
                        c["candidate"], c["ep"], str(c["batch"]), o["name"], _fmt(o["max_abs"]), _fmt(o["max_rel"]),
                        _fmt(o["cosine"], ".6f"), "yes" if o["within"] else "no",
                    )))
            out.append(d)
        return out

    def _caption(self) -> str:
        st = self.settings
        th = st["threads"]
        if not th.get("spinning", True):
            spin = ", no spinning"
        elif th.get("spinning_stops_after_run"):
            spin = ", spinning stopped after each run"
        else:
            spin = ""
        shapes = st.get("input_shapes") or {}
        batched = bool(st.get("batch_sizes"))

        def shape(dims):
            dims = [str(d) for d in dims]
            if batched and dims:
                dims[0] = "N"  # one row per batch size
            return "x".join(dims) or "scalar"

        defaulted = st.get("defaulted_dims") or {}
        inputs = ", ".join(f"{name} {shape(dims)}" for name, dims in shapes.items())
        source = st.get("inputs", "inputs") + ("; N = batch" if batched else "")
        if defaulted:
            source += f"; dynamic dimensions of {', '.join(defaulted)} set to the default size, see --shape"
        block = st.get("block", 1)
        order = "alternating" if st.get("order") == "alternating" else "rotating order"
        compared = ""
        if self.comparisons:
            compared = (f"; interleaved rounds ({order}" + (f", {block} back-to-back runs per model" if block > 1 else "")
                        + "); speedup = median of paired per-run ratios, bootstrap 95% interval over rounds")
        return (
            f"inputs: {inputs} ({source}); "
            f"threads: intra-op {th['intra_op']} ({th['source']}), inter-op {th['inter_op']}, {th['execution_mode']}{spin}; "
            f"warm-up {st['warmup']} runs; first run and session init not in the statistics{compared}"
        )

    def plot(self, path: str | os.PathLike) -> None:
        from onnxopt.bench.plot import plot_report

        check_report_path(path, "plot", models=self.model_paths, inputs_file=self.inputs_path)
        plot_report(self, path)


def _fmt(x, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return str(x)
    return format(x, spec)


def _interval_cells(comp: dict, spec: str, missing: str) -> list[str]:
    """The interval's ends formatted, or ``missing`` twice where there is none (one round)."""
    iv = comp.get("speedup_interval")
    return [format(iv[0], spec), format(iv[1], spec)] if iv else [missing, missing]


@dataclasses.dataclass
class _Col:
    header: str
    cells: list
    justify: str = "right"
    wrap: bool = False  # may fold onto several lines (labels); numbers never do

    def width(self) -> int:
        from rich.cells import cell_len

        header = max(cell_len(line) for line in self.header.split("\n"))
        widest = max((cell_len(c) for c in self.cells), default=0)
        if self.wrap:
            # A label folds onto more lines where space is short (rich gives it whatever the
            # numbers leave); 12 characters a line stay readable.
            longest_word = max(cell_len(w) for w in self.header.split())
            return max(longest_word, min(widest, 12))
        return max(header, widest)


def _table_width(cols: list) -> int:
    # rich's default box: a border left, right and between columns; one space of padding each side.
    return sum(c.width() + 2 for c in cols) + len(cols) + 1


def _pack(keys: list, cols: list, width: int) -> list[list]:
    """``cols`` into as few tables as fit in ``width``, in order, each starting with ``keys``."""
    parts: list[list] = []
    current = list(keys)
    for col in cols:
        if len(current) > len(keys) and _table_width(current + [col]) > width:
            parts.append(current)
            current = list(keys)
        current.append(col)
    if len(current) > len(keys):
        parts.append(current)
    return parts
