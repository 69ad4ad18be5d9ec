"""The lines ``onnxopt prune`` prints from a prune report (:func:`.api.prune`'s ``report``).

Kept apart from the CLI so the wording is tested on the report itself. Model-derived text
(paths, output names) is escaped: rich reads ``[...]`` as markup and would drop it.
"""

from __future__ import annotations

from rich.markup import escape

from onnxopt.pruning.api import _NEAR_ZERO, _why


def refit_summary(rep: dict) -> str:
    """'16 of 32 layers refit (16 kept their cut weights: ...)', or '' when nothing was to refit."""
    done, total = len(rep["refit_layers"]), rep.get("refit_candidates", len(rep["refit_layers"]))
    if not total:
        return ""
    skipped = rep.get("refit_skipped") or {}
    line = f"{done} of {total} layers refit" if done != total else f"{done} layers refit"
    if skipped:
        whys = sorted({_why(w) for w in skipped.values()})
        hint = "; more samples or larger inputs give more rows" if any("rows" in w for w in whys) else ""
        line += f" ({len(skipped)} kept their cut weights: {'; '.join(whys)}{hint})"
    return line


def summary_line(rep: dict, output: str) -> str:
    """The one-line result: groups, channels, parameters kept, ranking and refit."""
    pb, pa = rep["params_before"], rep["params_after"]
    pi = rep.get("params_input", pb)
    refit = refit_summary(rep)
    folded = f" ({pb:,} after BatchNorm folding)" if pi != pb else ""
    return (f"{escape(str(output))}: {rep['spaces_pruned']} channel groups pruned ({rep['channels_before']} -> "
            f"{rep['channels_after']} channels), parameters {pi:,}{folded} -> {pa:,} ({pa / max(pi, 1):.0%} of the "
            f"input's); ranking: {escape(rep['ranking'])}" + (f"; {refit}" if refit else ""))


def output_line(name: str, d: dict, evaluated_on: str) -> str:
    """'output y vs the original (...): cosine min 0.99, max abs error 0.01'; cosine n/a on ~0 outputs."""
    if d["cosine_min"] is None:
        cosine = f"cosine n/a (both models' outputs are ~0, |value| < {_NEAR_ZERO:g}, on every input)"
    else:
        cosine = f"cosine min {d['cosine_min']:.4f}"
        if d.get("cosine_feeds", d.get("feeds")) != d.get("feeds"):
            cosine += f" (over {d['cosine_feeds']} of {d['feeds']} inputs; on the others both outputs are ~0)"
    top1 = f", top-1 class unchanged on {d['top1_agreement']:.0%} of rows" if "top1_agreement" in d else ""
    return (f"output {escape(name)} vs the original ({escape(evaluated_on)}): {cosine}, max abs error "
            f"{d['max_abs']:.4g}{top1}")


def print_summary(rep: dict, output: str, max_drop: float | None, out, console) -> None:
    """Print the prune result on ``out`` (stdout) and its warnings on ``console`` (stderr)."""
    if rep["max_drop_search"]:
        tried = ", ".join(f"{t['ratio']:.4g}: {t['drop']:.4g}" for t in rep["max_drop_search"])
        out.print(f"--max-drop {max_drop}: ratio {rep['ratio']:.4g} (tried ratio: drop {tried})")
    out.print(summary_line(rep, output))
    if rep["calibration_is_random"]:
        console.print("onnxopt: warning: calibrated on random data (a smoke test): the ranking and refit "
                      "do not reflect real inputs")
    for name, d in rep["outputs_vs_original"].items():
        out.print(output_line(name, d, rep["evaluated_on"]))
