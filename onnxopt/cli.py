"""The ``onnxopt`` command line: a thin layer over the Python API.

Errors the user can cause print one line on stderr (``onnxopt: error: ...``) and exit
with status 2; nothing is written in that case. Set ONNXOPT_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from onnxopt.errors import OnnxoptError

# Piped output (CI logs, files) gets wide tables instead of rich's 80-column default.
_WIDTH = None if sys.stdout.isatty() else 200  # piped: wide enough that no number wraps
console = Console(stderr=True, highlight=False, soft_wrap=True)  # stderr messages stay one line each
out = Console(highlight=False, width=_WIDTH)


def _float_reasons_summary(layers: dict) -> str:
    """'15 high-resolution front conv, 2 excluded ...': the float layers counted by reason
    (the reason's text before its parenthesised detail)."""
    from collections import Counter

    counts = Counter(v.get("reason", "float").split(" (")[0].split(":")[0].strip()
                     for v in layers.values() if not v.get("quantized"))
    return ", ".join(f"{n} {why}" for why, n in counts.most_common())


def shape_option(f):
    return click.option(
        "--shape",
        "shapes",
        multiple=True,
        metavar="NAME:DIMS",
        help="Value of an input's dynamic dimensions for sample inputs, e.g. x:1x3x640x640 (repeatable).",
    )(f)


def inputs_option(f):
    return click.option(
        "--inputs",
        type=click.Path(dir_okay=False),
        help="An .npz file with one array per model input (keys = input names), used instead of generated inputs.",
    )(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="onnxopt")
@click.option("-v", "--verbose", is_flag=True, help="Show warnings and progress details.")
def cli(verbose: bool) -> None:
    """Make exported ONNX models smaller and faster, and measure the result honestly.

    \b
    onnxopt optimize model.onnx -o model.opt.onnx   graph rewrites, verified against the original
    onnxopt quantize model.onnx -o model.int8.onnx --calib DATA   static int8 (QDQ)
    onnxopt prune model.onnx -o model.pruned.onnx --ratio 0.25   structured channel pruning
    onnxopt bench model.onnx model.opt.onnx         interleaved latency, speedup with an interval
    onnxopt compare model.onnx model.opt.onnx       same answers? per-output errors
    onnxopt inspect model.onnx                      opsets, inputs, op histogram, parameters
    onnxopt passes                                  every pass and preset
    onnxopt demo                                    optimize and time a real detector (PP-OCRv4)
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, format="onnxopt: %(message)s")
    logging.getLogger().setLevel(logging.INFO if verbose else logging.ERROR)  # basicConfig acts once per process
    # Python warnings (numpy's "invalid value in sqrt" on a degenerate weight, ...) go to the
    # log, shown with -v, instead of raw lines on stderr: the safety net judges the result.
    logging.captureWarnings(True)


@cli.command()
@click.option("--plugin", "plugins", multiple=True, metavar="MODULE", help="Also list the passes of a module or .py file (repeatable).")
def passes(plugins) -> None:
    """List every registered pass and preset with a one-line description."""
    from onnxopt.passes import all_passes, all_presets, preset_passes
    from onnxopt.plugins import load_plugin

    for plugin in plugins:
        load_plugin(plugin)

    table = Table(title="Passes", show_lines=False)
    table.add_column("pass", no_wrap=True)
    table.add_column("in default")
    table.add_column("source")
    table.add_column("what it does")
    default = set(preset_passes("default"))
    for info in all_passes():
        table.add_row(info.name, "yes" if info.name in default else "", info.source, info.description)
    out.print(table)
    presets = Table(title="Presets")
    presets.add_column("preset", no_wrap=True)
    presets.add_column("why / what")
    presets.add_column("passes")
    for p in all_presets():
        presets.add_row(p.name, p.description, ", ".join(preset_passes(p.name)))
    out.print(presets)


def _stats_table(result, title: str) -> Table:
    table = Table(title=title)
    table.add_column("pass", no_wrap=True)
    table.add_column("runs", justify="right")
    table.add_column("time (ms)", justify="right")
    table.add_column("nodes in", justify="right")  # around its first round plus later rounds that changed it (in - out == removed)
    table.add_column("removed", justify="right")  # by the pass itself, over all its runs
    table.add_column("rewrites", justify="right")
    table.add_column("status")
    for s in result.stats:
        table.add_row(
            escape(s.name), str(s.runs), f"{s.seconds * 1000:.1f}", str(s.nodes_before), str(s.nodes_removed), str(s.rewrites),
            s.status
        )
    table.caption = (
        f"nodes {result.nodes_before} -> {result.nodes_after} in {result.seconds:.2f} s; "
        + ("verified against the original" if result.verified else "not verified numerically")
    )
    return table


# Below this many timed runs a bootstrap interval of the median is not worth its digits.
FEW_RUNS = 10


def _given(param: str) -> bool:
    """Whether the user typed this option (not just its default)."""
    ctx = click.get_current_context()
    return ctx.get_parameter_source(param) not in (None, click.core.ParameterSource.DEFAULT)


@cli.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the optimized model.")
@click.option("--preset", default="default", show_default=True, help="Named pipeline (see 'onnxopt passes').")
@click.option("--passes", "pass_list", help="Comma-separated pass names to run instead of the preset.")
@click.option("--verify", "verify_each", is_flag=True, help="Check the model after every pass, not only at the end.")
@click.option("--no-verify", is_flag=True, help="Skip the numeric comparison (the result must still pass the ONNX checker and load in ONNX Runtime).")
@shape_option
@inputs_option
@click.option("--plugin", "plugins", multiple=True, metavar="MODULE", help="Import passes from a module or .py file (repeatable).")
@click.option("--rtol", type=float, help="Relative tolerance of the safety net [default: 1e-4; float16 outputs 2e-3].")
@click.option("--atol", type=float, help="Absolute tolerance of the safety net [default: 1e-5; float16 outputs 1e-3].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the statistics as JSON.")
@click.option(
    "--target-opset",
    type=int,
    metavar="N",
    help="First convert the model up to default-domain opset N (upgrade-opset), so fusions into newer ops apply "
    "(LayerNormalization >= 17, Gelu >= 20). Opt-in: runtimes older than N cannot load the result.",
)
def optimize(model, output, preset, pass_list, verify_each, no_verify, shapes, inputs, plugins, rtol, atol, json_path, target_opset) -> None:
    """Rewrite MODEL into a smaller, faster equivalent and write it to OUTPUT.

    The result is checked (ONNX checker, ONNX Runtime loads it) and compared with the
    original on sample inputs; a pass that breaks the model is found, rolled back,
    reported by name, and the rest of the pipeline still runs. Dynamic dimensions stay
    dynamic: sample shapes are used only for the comparison.
    """
    from onnxopt.inputs import parse_shape_specs
    from onnxopt.optimize import optimize_file
    from onnxopt.plugins import load_plugin

    # Contradictory options are refused: quietly letting one win hides what actually ran.
    if verify_each and no_verify:
        raise click.UsageError("--verify and --no-verify contradict each other; give one")
    if pass_list is not None and _given("preset"):
        raise click.UsageError("--passes replaces the preset; give --passes or --preset, not both")
    if pass_list is not None and not pass_list.strip(" ,"):
        raise click.UsageError("no passes given: --passes is empty (onnxopt passes lists them)")
    if json_path:  # a bad --json path must fail before the model is written, not after
        from onnxopt.model_io import check_side_output

        check_side_output(json_path, "--json", inputs=[model], outputs=[output])
    for plugin in plugins:
        load_plugin(plugin)
    passes_ = [p.strip() for p in pass_list.split(",") if p.strip()] if pass_list else None
    if passes_ is not None:
        from onnxopt.passes import get_pass

        for name in passes_:
            get_pass(name)
    else:
        from onnxopt.passes import preset_passes

        preset_passes(preset)
    verify = "off" if no_verify else ("each" if verify_each else "final")
    with console.status("optimizing...") as status:
        result = optimize_file(
            model,
            output,
            preset=preset,
            passes=passes_,
            verify=verify,
            shapes=parse_shape_specs(shapes),
            inputs=inputs,
            rtol=rtol,
            atol=atol,
            progress=lambda name: status.update(f"optimizing: {name}"),
            target_opset=target_opset,
        )
    out.print(_stats_table(result, f"onnxopt optimize {os.path.basename(model)}"))
    for name, reason in result.rolled_back.items():
        console.print(f"[yellow]rolled back[/yellow] {escape(name)}: {escape(reason)}")
    for w in result.warnings:
        console.print(f"[yellow]warning[/yellow] {escape(w)}")
    if json_path:
        from onnxopt.atomic import write_json_atomic

        write_json_atomic(json_path, result.as_dict())
    console.print(f"wrote {escape(output)}")


@cli.command(name="inspect")
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def inspect_cmd(model, as_json) -> None:
    """Show MODEL's opsets, inputs/outputs, op histogram, parameters and external data."""
    from onnxopt.inspection import inspect_model, print_inspect

    info = inspect_model(model)
    try:
        # Rendered whole before anything is printed: a model that fails the checker may hold
        # things no table can show, and then only the checker's verdict is printed, alone.
        if as_json:
            text = json.dumps(info)
        else:
            with out.capture() as captured:
                print_inspect(out, info)
            text = captured.get()
    except Exception:
        if info.get("checker_error"):
            raise OnnxoptError(f"{model}: fails the ONNX checker: {info['checker_error']}") from None
        raise
    if as_json:
        out.print_json(text)
    else:
        sys.stdout.write(text)


@cli.command()
@click.argument("model_a", type=click.Path())
@click.argument("model_b", type=click.Path())
@shape_option
@inputs_option
@click.option("--rtol", default=1e-4, show_default=True, help="Relative tolerance.")
@click.option("--atol", default=1e-5, show_default=True, help="Absolute tolerance.")
def compare(model_a, model_b, shapes, inputs, rtol, atol) -> None:
    """Run MODEL_A and MODEL_B on the same inputs and compare every output.

    Prints max absolute/relative error and cosine similarity per output; exits with
    status 1 if any output is outside the tolerance (|b - a| <= atol + rtol * |a|).
    """
    from onnxopt.compare import compare_models, compare_table, nonfinite_warnings
    from onnxopt.inputs import parse_shape_specs

    diffs = compare_models(model_a, model_b, shapes=parse_shape_specs(shapes), inputs=inputs, rtol=rtol, atol=atol)
    out.print(compare_table(diffs, os.path.basename(model_a), os.path.basename(model_b)))
    for w in nonfinite_warnings(diffs):
        console.print(f"[yellow]warning[/yellow] {escape(w)}")
    if not all(d.within for d in diffs):
        console.print(f"outputs differ beyond rtol {rtol:g}, atol {atol:g}")
        sys.exit(1)


@cli.command()
@click.option("-o", "--output-dir", type=click.Path(file_okay=False), help="Keep the example and its optimized version here.")
@click.option("--synthetic", is_flag=True, help="Use the small bundled CNN even if the real PP-OCRv4 detector is installed.")
@click.option("--runs", type=click.IntRange(min=2), default=20, show_default=True,
              help="Timed runs per model in the latency comparison (real model only).")
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads for the timing (default: the physical cores).")
def demo(output_dir, synthetic, runs, threads) -> None:
    """Optimize a real pretrained model, verify it and time it against the original.

    The model is the PP-OCRv4 text detector that ships in the rapidocr-onnxruntime wheel
    (pip install --no-deps rapidocr-onnxruntime==1.4.4); it is copied into the output
    folder, never modified in place, and nothing is downloaded. Without that wheel (or
    with --synthetic) a small CNN bundled with onnxopt is optimized instead.
    """
    import tempfile

    from onnxopt.demo import REAL_DESCRIPTION, REAL_INSTALL_HINT, real_model_path, run_demo, run_real_demo, stderr_progress
    from onnxopt.testing.real_models import RealModelUnavailable

    source = None
    if not synthetic:
        try:
            source = real_model_path()
        except RealModelUnavailable:
            source = None

    def run(folder):
        if source is None:
            return run_demo(folder) + (None,)
        result, report, paths = run_real_demo(folder, source=source, runs=runs, threads=threads, say=stderr_progress())
        return result, paths, report

    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        result, paths, report = run(output_dir)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result, paths, report = run(tmp)
    where = f"; files in {output_dir}" if output_dir else ""
    match = (f"outputs match the original within rtol {result.rtol:g}, atol {result.atol:g}" if result.verified
             else "outputs NOT verified")
    if report is None:
        out.print(_stats_table(result, "onnxopt demo: a Conv/BatchNorm network as a PyTorch export writes it"))
        out.print(f"nodes {result.nodes_before} -> {result.nodes_after}; {match}{where}")
        if not synthetic:
            out.print(f"for the real example (PP-OCRv4 text detector, no download at run time): {REAL_INSTALL_HINT}, then onnxopt demo")
        return
    out.print(_stats_table(result, f"onnxopt demo: {REAL_DESCRIPTION}"))
    for name, reason in result.rolled_back.items():
        console.print(f"[yellow]rolled back[/yellow] {escape(name)}: {escape(reason)}")
    base, opt = report.results[0], report.results[1]
    comp = report.comparisons[0]
    speedup, (lo, hi) = comp["speedup"], comp["speedup_interval"]
    n_threads = report.settings["threads"]["intra_op"]
    out.print(
        f"latency (CPU, {n_threads} threads, {comp['pairs']} interleaved runs each, median): "
        f"original {base['latency_ms']['p50']:.1f} ms, optimized {opt['latency_ms']['p50']:.1f} ms"
    )
    out.print(
        f"speedup {speedup:.2f}x, 95% CI [{lo:.2f}, {hi:.2f}] (median of per-round ratios"
        + ("; the interval includes 1: no difference measurable on this machine)" if lo <= 1.0 <= hi else ")")
    )
    out.print(f"nodes {result.nodes_before} -> {result.nodes_after}; {match}; speedup {speedup:.2f}x [{lo:.2f}, {hi:.2f}]{where}")


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("--ep", "eps", multiple=True, default=("cpu",), show_default=True, metavar="EP",
              help="Execution provider: cpu, cuda, tensorrt, openvino, dml, rocm, ... (repeatable or comma-separated).")
@click.option("--threads", type=int, help="Intra-op threads (default: the physical cores); inter-op is 1, execution sequential.")
@click.option("--spin/--no-spin", default=True, show_default=True,
              help="Let idle ORT pool threads busy-wait between runs (ORT's default); --no-spin when sessions compete for few cores.")
@click.option("--block", type=int, default=1, show_default=True, metavar="N",
              help="Run each model N times back to back per round (1: strictly alternate). Larger blocks time warm, "
                   "steady-state runs; alternating runs each start after another model's.")
@click.option("--warmup", type=int, default=10, show_default=True, help="Untimed runs per model after the first run.")
@click.option("--runs", type=int, help="Timed runs per model (default 100).")
@click.option("--duration", type=float, metavar="SECONDS", help="Time each model for about this long instead of --runs.")
@shape_option
@inputs_option
@click.option("--batch-sizes", metavar="1,8,32", help="Set the dynamic batch dimension to each of these sizes in turn.")
@click.option("--io-binding/--no-io-binding", default=None, help="Bind inputs/outputs on the device (default: on for GPU providers).")
@click.option("--include-copies", is_flag=True, help="With IO binding: keep inputs/outputs in host memory, so copies are timed.")
@click.option("--check-outputs", is_flag=True, help="Compare every model's outputs with the first model's on the same inputs.")
@click.option("--rtol", default=1e-4, show_default=True, help="Relative tolerance for --check-outputs.")
@click.option("--atol", default=1e-5, show_default=True, help="Absolute tolerance for --check-outputs.")
@click.option("--trt-fp16", is_flag=True, help="TensorRT: allow fp16 kernels.")
@click.option("--trt-int8", is_flag=True, help="TensorRT: int8 (for QDQ models; their scales are used).")
@click.option("--trt-engine-cache", type=click.Path(), metavar="DIR", help="TensorRT: cache built engines in DIR.")
@click.option("--ep-option", "ep_option", multiple=True, metavar="KEY=VALUE", help="Extra provider option (repeatable), e.g. device_id=1.")
@click.option("--seed", default=0, show_default=True, help="Seed of generated inputs and of the bootstrap.")
@click.option("--memory/--no-memory", default=True, show_default=True,
              help="Measure each model's peak memory in a fresh child process; --no-memory skips it (peak MB: ?).")
@click.option("--json", "json_path", type=click.Path(), help="Write the report as JSON (schema: docs/bench.md).")
@click.option("--csv", "csv_path", type=click.Path(), help="Write one CSV row per model and setting.")
@click.option("--plot", "plot_path", type=click.Path(), metavar="PNG", help="Draw the latency distributions (needs matplotlib).")
def bench(models, eps, threads, spin, block, warmup, runs, duration, shapes, inputs, batch_sizes, io_binding, include_copies, check_outputs,
          rtol, atol, trt_fp16, trt_int8, trt_engine_cache, ep_option, seed, memory, json_path, csv_path, plot_path) -> None:
    """Time MODELS on an execution provider: warm-up, percentiles, throughput, speedups.

    Several models are timed in interleaved rounds on the same inputs and each is
    reported against the first as a speedup (median of paired ratios, bootstrap 95%
    interval). Session creation and the first run are reported apart.
    """
    from onnxopt.bench import benchmark, parse_batch_sizes
    from onnxopt.bench.plot import require_matplotlib
    from onnxopt.bench.progress import rich_progress
    from onnxopt.bench.providers import parse_ep_options
    from onnxopt.bench.report import check_report_path
    from onnxopt.inputs import parse_shape_specs

    sides = [(o, p) for o, p in (("--json", json_path), ("--csv", csv_path), ("--plot", plot_path)) if p]
    for i, (option, path) in enumerate(sides):
        check_report_path(path, option, models=models, inputs_file=inputs, outputs=[p for _, p in sides[:i]])
    if plot_path:
        require_matplotlib()
    kwargs = dict(
        ep=[e.strip() for spec in eps for e in spec.split(",") if e.strip()], threads=threads, warmup=warmup, runs=runs,
        duration=duration, shapes=parse_shape_specs(shapes), inputs=inputs, batch_sizes=parse_batch_sizes(batch_sizes),
        io_binding=io_binding, include_copies=include_copies, check_outputs=check_outputs, rtol=rtol, atol=atol,
        trt_fp16=trt_fp16, trt_int8=trt_int8, trt_engine_cache=trt_engine_cache, ep_options=parse_ep_options(ep_option), seed=seed,
        spinning=spin, block=block, memory=memory,
    )
    with rich_progress(console) as progress:
        report = benchmark(list(models), progress=progress, **kwargs)
    for table in report.tables(width=out.width):  # split, never truncated, where the terminal is narrow
        out.print(table)
    for warning in report.warnings:
        console.print(f"onnxopt: warning: {escape(warning)}")
    # The bootstrap resamples rounds: with --block N, N runs per model make one round.
    fewest = min((c["rounds"] for c in report.comparisons), default=None)
    if fewest is not None and fewest < FEW_RUNS:
        if block > 1:
            console.print(f"onnxopt: warning: {fewest} round{'s' if fewest != 1 else ''} of {block} runs per model: "
                          f"the 95% intervals are rough (--runs {FEW_RUNS * 3 * block} or more for numbers to rely on)")
        else:
            console.print(f"onnxopt: warning: {fewest} timed run{'s' if fewest != 1 else ''} per model: the 95% intervals "
                          f"are rough (--runs {FEW_RUNS * 3} or more for numbers to rely on)")
    if json_path:
        report.write_json(json_path)
    if csv_path:
        report.write_csv(csv_path)
    if plot_path:
        report.plot(plot_path)


@cli.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the int8 QDQ model.")
@click.option("--calib", required=True, metavar="DATA",
              help="Calibration data: a folder of .npz (one sample each) or images, one .npz with a sample axis, or 'random' (smoke test).")
@click.option("--method", default="minmax", show_default=True, type=click.Choice(["minmax", "percentile", "entropy", "mse"]),
              help="How activation ranges are chosen.")
@click.option("--target", default="cpu", show_default=True, type=click.Choice(["cpu", "tensorrt", "generic"]),
              help="cpu: uint8 asymmetric activations + int8 per-channel weights; tensorrt: int8 symmetric both; generic: as cpu (the scheme every QDQ runtime accepts).")
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="Weight scales per output channel (needs opset 13: upgraded if older).")
@click.option("--exclude", multiple=True, metavar="NAME_OR_OPTYPE", help="Keep this node (name) or op type in float (repeatable).")
@click.option("--samples", type=click.IntRange(min=1), help="Use only the first N calibration samples.")
@click.option("--max-drop", type=float, metavar="X",
              help="Accuracy budget: 1 - cosine of the outputs on held-out calibration samples; noisiest layers go back to float until it holds.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report (per-layer SQNR, fallback, fused kernels) as JSON.")
@click.option("--smoothquant", default="auto", show_default=True, type=click.Choice(["auto", "on", "off"]),
              help="SmoothQuant (activation outlier channels moved into the MatMul weights): auto = the MatMul inputs where it lowers the layer output error by 25%+ on calibration rows; on = wherever it lowers it at all.")
@click.option("--smoothquant-alpha", default=None, type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True),
              help="SmoothQuant migration strength (0..1; higher moves more of the activation range into the weights). Default: chosen per MatMul group by its output error.")
@click.option("--float-front/--no-float-front", default=True, show_default=True,
              help="Keep the front of a CNN on an image input in float: the whole encoder of a dense-prediction "
                   "network (everything before its neck's first upsampling) when it is depthwise-separable and holds "
                   "at most 50% of the conv compute, else the high-resolution convs (stride <= 8) while they hold at most 25%, else the stem. "
                   "More accurate, and on ONNX Runtime's CPU provider about as fast.")
@click.option("--image-size", metavar="HxW", help="Image calibration: resize to HxW (e.g. 640x640), [-1,1] normalised RGB NCHW; see --image-spec.")
@click.option("--image-spec", metavar="SPEC", help="Image preprocessing, e.g. '640x640,mean=0.5,std=0.5,bgr,nchw'.")
@shape_option
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
def quantize(model, output, calib, method, target, per_channel, exclude, samples, max_drop, report_path, smoothquant,
             smoothquant_alpha, float_front, image_size, image_spec, shapes, quiet) -> None:
    """Static int8 quantization (QDQ) with streaming calibration and an accuracy check."""
    from onnxopt.inputs import parse_shape_specs
    from onnxopt.quantization import quantize_file

    if smoothquant == "off" and smoothquant_alpha is not None:
        raise click.UsageError("--smoothquant-alpha sets SmoothQuant's strength, but --smoothquant off turns it off")
    spec = _image_spec(image_size, image_spec)
    result = quantize_file(
        model, output, calib=calib, method=method, target=target, per_channel=per_channel, exclude=exclude,
        samples=samples, max_drop=max_drop, report=report_path, smoothquant=smoothquant,
        smoothquant_alpha=smoothquant_alpha, float_front=float_front, image_spec=spec,
        shapes=parse_shape_specs(shapes) or None, progress=not quiet,
    )
    rep = result.report
    kernels = ", ".join(f"{k} x{v}" for k, v in rep["ort_fused_kernels"].items()) or "none"
    out.print(f"{escape(output)}: {rep['quantized_layers']} layers int8, {rep['float_layers']} float ({rep['scheme']})")
    out.print(f"ONNX Runtime kernels: {kernels}")
    why_float = _float_reasons_summary(rep["layers"])
    if why_float:
        hints = [] if report_path else ["each layer's reason: --report FILE"]
        if any("front conv" in v.get("reason", "") or "encoder conv" in v.get("reason", "") for v in rep["layers"].values()):
            hints.append("--no-float-front quantizes the front too")
        out.print(f"kept float: {escape(why_float)}" + (f" ({'; '.join(hints)})" if hints else ""))
    if rep["calibration"]["is_random"]:
        console.print("onnxopt: warning: calibrated on random data (a smoke test): ranges do not reflect real inputs")
    if "fallback" in rep:
        fb = rep["fallback"]
        seen = "held-out calibration samples" if fb.get("held_out") else "calibration samples, none held out"
        if fb.get("max_drop") is None:
            out.print(f"output drop vs fp32 (1 - cosine, {seen}): {fb['after']:.4f}")
        else:
            out.print(f"output drop (1 - cosine, {seen}): {fb['before']:.4f} -> {fb['after']:.4f}"
                      + (f", {len(fb['to_float'])} layer(s) back to float" if fb["to_float"] else ""))
    for w in rep.get("warnings", ()):
        console.print(f"onnxopt: warning: {escape(w)}")


@cli.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(), help="Where to write the pruned model.")
@click.option("--ratio", required=True, type=float, metavar="R",
              help="Fraction of the channels to remove from every prunable channel group (0 < R < 1).")
@click.option("--calib", metavar="DATA",
              help="Calibration data (as for 'onnxopt quantize'): ranks channels by their activations and refits the "
                   "layers that read pruned channels by least squares. Without it: weight-magnitude ranking, no refit.")
@click.option("--samples", type=click.IntRange(min=1), help="Use only the first N calibration samples.")
@click.option("--image-size", metavar="HxW", help="Image calibration: resize to HxW, [-1,1] normalised RGB NCHW; see --image-spec.")
@click.option("--image-spec", metavar="SPEC", help="Image preprocessing, e.g. '640x640,mean=0.5,std=0.5,bgr,nchw'.")
@click.option("--exclude", multiple=True, metavar="NAME_OR_OPTYPE", help="Keep the output channels of this node (name) or op type (repeatable).")
@click.option("--multiple", default=8, show_default=True, type=int,
              help="Round each group's kept channel count up to a multiple of this (SIMD-friendly widths; 1 = exact ratio).")
@click.option("--no-refit", is_flag=True, help="With --calib: rank by activations but do not refit the reading layers.")
@click.option("--max-drop", type=float, metavar="X",
              help="With --calib: prune the largest ratio (steps of 1/16, up to --ratio) whose outputs stay within "
                   "1 - cosine <= X of the original's on held-out calibration samples.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the report (groups, parameters, output error) as JSON.")
@shape_option
@click.option("--quiet", is_flag=True, help="No progress on stderr.")
def prune(model, output, ratio, calib, samples, image_size, image_spec, exclude, multiple, no_refit, max_drop, report_path,
          shapes, quiet) -> None:
    """Structured channel pruning: remove channels (whole filters) so the model is smaller and
    faster on every runtime.

    Channels tied together (residual Adds, depthwise convs, Concat, squeeze-excite) are removed
    together. No retraining: the output error is measured and printed; a detector or
    classifier usually needs --calib (and a modest --ratio) to stay close to the original.
    """
    from onnxopt.inputs import parse_shape_specs
    from onnxopt.pruning import prune_file
    from onnxopt.pruning.summary import print_summary

    spec = _image_spec(image_size, image_spec)
    if (samples or spec or no_refit or max_drop is not None) and not calib:
        raise OnnxoptError("--samples, --image-size, --image-spec, --no-refit and --max-drop need --calib")
    result = prune_file(model, output, ratio=ratio, calib=calib, samples=samples, image_spec=spec, exclude=exclude,
                        multiple=multiple, reconstruct=not no_refit, max_drop=max_drop, report=report_path,
                        shapes=parse_shape_specs(shapes) or None, progress=not quiet)
    print_summary(result.report, output, max_drop, out, console)


def _image_spec(image_size: str | None, image_spec: str | None) -> str | None:
    """The image preprocessing of --image-spec, or of --image-size with the [-1, 1] default."""
    if image_size and image_spec:
        raise OnnxoptError("give either --image-size or --image-spec, not both")
    return image_spec or (f"{image_size},mean=0.5,std=0.5" if image_size else None)


def _verbose(ctx, _param, value: bool) -> None:
    if value:
        logging.getLogger().setLevel(logging.INFO)


# `-v` after the command too (`onnxopt optimize m.onnx -o o.onnx -v`), as users type it.
for _command in cli.commands.values():
    _command.params.append(click.Option(["-v", "--verbose"], is_flag=True, expose_value=False, callback=_verbose,
                                        help="Show warnings and progress details (as 'onnxopt -v COMMAND')."))


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and turn user errors into one line on stderr."""
    try:
        cli.main(args=argv, prog_name="onnxopt", standalone_mode=False)
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except getattr(click.exceptions, "NoArgsIsHelpError", ()) as e:  # plain `onnxopt`: the help, not an error
        click.echo(e.ctx.get_help() if e.ctx is not None else e.format_message())
        return 0
    except click.UsageError as e:
        hint = f" (see 'onnxopt {e.ctx.command.name} --help')" if e.ctx is not None and e.ctx.command is not None and e.ctx.command.name != "cli" else " (see 'onnxopt --help')"
        click.echo(f"onnxopt: error: {e.format_message()}{hint}", err=True)
        return 2
    except click.ClickException as e:
        click.echo(f"onnxopt: error: {e.format_message()}", err=True)
        return e.exit_code or 1
    except click.Abort:
        click.echo("onnxopt: aborted", err=True)
        return 130
    except OnnxoptError as e:
        click.echo(f"onnxopt: error: {e}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("onnxopt: interrupted; no output was written", err=True)
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except MemoryError:
        click.echo("onnxopt: error: out of memory", err=True)
        return 2
    except Exception as e:  # a bug: say so in one line, traceback only on request
        if os.environ.get("ONNXOPT_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        click.echo(f"onnxopt: internal error: {type(e).__name__}: {msg} (set ONNXOPT_DEBUG=1 for the traceback)", err=True)
        return 3


if __name__ == "__main__":
    sys.exit(main())
