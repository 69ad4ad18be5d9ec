"""``compare``: run two models on the same inputs and report per-output differences."""

from __future__ import annotations

import dataclasses
import os

import onnx_ir as ir
from rich.markup import escape
from rich.table import Table

from onnxopt.errors import OnnxoptError
from onnxopt.inputs import model_inputs
from onnxopt.model_io import load_model
from onnxopt.optimize import sample_feeds
from onnxopt.verify import OutputDiff, make_session


def compare_models(
    model_a: ir.Model | str | os.PathLike,
    model_b: ir.Model | str | os.PathLike,
    *,
    shapes=None,
    inputs=None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> list[OutputDiff]:
    """Outputs of B against A (the reference) on the same feeds: max abs/rel error and cosine."""
    a = model_a if isinstance(model_a, ir.Model) else load_model(model_a)
    b = model_b if isinstance(model_b, ir.Model) else load_model(model_b)
    names_a = [v.name for v in model_inputs(a)]
    names_b = [v.name for v in model_inputs(b)]
    if sorted(names_a) != sorted(names_b):
        raise OnnxoptError(f"the models have different inputs: {names_a} vs {names_b}")
    outs_a = [v.name for v in a.graph.outputs]
    outs_b = [v.name for v in b.graph.outputs]
    if outs_a != outs_b:
        raise OnnxoptError(f"the models have different outputs: {outs_a} vs {outs_b}")
    # Two generated feeds (seeds 0 and 1) catch differences one draw could miss.
    feeds = sample_feeds(a, shapes=shapes, inputs=inputs, count=2)
    results: dict[str, OutputDiff] = {}
    from onnxopt.verify import diff_arrays, release_mappings

    # One session at a time: the outputs are small, the weights of two large models
    # side by side are not (a 2.4 GB model pair would need 2x its size).
    outputs: list[list[dict]] = []
    for m, label in ((a, "A"), (b, "B")):
        try:
            sess = make_session(m)
        except Exception as e:
            raise OnnxoptError(f"model {label} does not load in ONNX Runtime: {str(e).strip().splitlines()[0][:200]}") from None
        try:
            outputs.append([sess.run(feed) for feed in feeds])
        except Exception as e:
            raise OnnxoptError(f"running model {label} failed: {str(e).strip().splitlines()[0][:200]}") from None
        finally:
            sess.close()
            del sess
            release_mappings(m)
    nonfinite = dict.fromkeys(outs_a, 0)
    sizes = dict.fromkeys(outs_a, 0)
    for ra, rb in zip(*outputs):
        for name in outs_a:
            d = diff_arrays(name, ra[name], rb[name], rtol=rtol, atol=atol)
            nonfinite[name] += d.nonfinite
            sizes[name] += d.size
            prev = results.get(name)
            if prev is None or d.max_abs > prev.max_abs or not d.within:
                results[name] = d
    # The non-finite counts cover both feeds, whichever feed's errors are reported.
    return [dataclasses.replace(d, nonfinite=nonfinite[d.name], size=sizes[d.name]) for d in results.values()]


def nonfinite_warnings(diffs: list[OutputDiff]) -> list[str]:
    """One line per output whose values were NaN/inf in both models, so compared as equal.

    Generated inputs outside a model's range (a log of a negative, an exp overflow) can make
    an output non-finite in both models; "within tolerance" then proves little about it.
    """
    lines = []
    for d in diffs:
        if d.nonfinite:
            lines.append(
                f"output {d.name!r}: {d.nonfinite} of {d.size} values are NaN or inf in both models "
                "and count as equal; compare on real inputs (--inputs) to check them"
            )
    return lines


def compare_title(name_a: str, name_b: str) -> str:
    """The table title, in argument order, naming A as the reference the errors are measured against."""
    return f"{escape(name_a)} (reference) vs {escape(name_b)}"


def compare_table(diffs: list[OutputDiff], name_a: str, name_b: str) -> Table:
    """The table ``onnxopt compare`` prints: one row per output (errors of B against A).

    Output names are escaped: rich reads ``[...]`` as markup and would drop bracketed text.
    """
    table = Table(title=compare_title(name_a, name_b))
    for col in ("output", "shape", "max abs err", "max rel err", "cosine", "within tolerance"):
        table.add_column(col)
    for d in diffs:
        table.add_row(
            escape(d.name), escape(str(d.shape_new)), f"{d.max_abs:.3g}", f"{d.max_rel:.3g}", f"{d.cosine:.6f}",
            "yes" if d.within else "[red]NO[/red]",
        )
    return table
