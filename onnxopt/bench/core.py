"""``benchmark()``: time ONNX models on an execution provider, honestly.

What "honestly" means here, and where each rule is enforced:

- Sessions are created and run once before timing; the creation time and the first
  run (which in ONNX Runtime includes kernel selection, arena growth and, for TensorRT,
  engine building) are reported apart from the steady state, never mixed into it.
- ``warmup`` further untimed runs follow; then the timed runs.
- The timed region is exactly one inference call: feeds are built, bound and (on GPU)
  copied to the device before timing; outputs are released after the clock stops; the
  garbage collector is off while timing. Per run the harness does nothing in Python
  beyond two ``perf_counter_ns`` calls and a list append, outside the region.
- GPU providers use IO binding: inputs live on the device as OrtValues and outputs are
  bound to device buffers allocated by the first run, so neither host copies nor output
  allocations are timed (``include_copies=True`` puts the copies back, as an
  application that feeds numpy arrays would see them). ``run_with_iobinding`` returns
  after the provider's stream is synchronised, and ``synchronize_outputs()`` is called
  inside the timed region as well, so the clock never stops before the GPU is done.
- Threads are set, not left to chance: intra-op = physical cores by default, inter-op
  1, sequential execution; all three are recorded.
- Several models are timed in interleaved rounds (A B A B ...) so machine drift hits
  all of them alike; each candidate's speedup over the first model is the median of the
  per-round ratios with a seeded bootstrap interval (see ``stats.paired_speedup``).
- Peak memory is the growth of the process's resident set while one model's session is
  created, run once and warmed up (``machine.PeakMemory``). Device memory is not counted.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.bench.machine import PeakMemory, machine_info, package_versions, physical_cores
from onnxopt.bench.providers import ProviderConfig, check_session_providers, make_provider_config
from onnxopt.bench.report import BenchReport
from onnxopt.bench.stats import latency_stats, paired_speedup
from onnxopt.errors import OnnxoptError
from onnxopt.inputs import load_npz_inputs, make_sample_inputs, model_inputs, validate_feeds
from onnxopt.model_io import EXTERNAL_DATA_THRESHOLD_BYTES, load_model, tensor_bytes
from onnxopt.verify import compare_outputs, diff_arrays

DEFAULT_RUNS = 100
DEFAULT_WARMUP = 10
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95

ProgressFn = Callable[[str, int, int | None], None]
ModelLike = str | os.PathLike | ir.Model


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


# --- models -------------------------------------------------------------------------------

@dataclasses.dataclass
class _Model:
    label: str
    path: str | None
    model: ir.Model
    _tmp: tempfile.TemporaryDirectory | None = None

    def source(self) -> str | bytes:
        """What InferenceSession gets: the file (so init time is what users see) or bytes."""
        if self.path is not None:
            return self.path
        if tensor_bytes(self.model) > EXTERNAL_DATA_THRESHOLD_BYTES:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="onnxopt-bench-")
                ir.save(self.model, os.path.join(self._tmp.name, "model.onnx"), external_data="model.onnx.data")
            return os.path.join(self._tmp.name, "model.onnx")
        return ir.serde.serialize_model(self.model).SerializeToString()

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _load_models(models: Sequence[ModelLike]) -> list[_Model]:
    if isinstance(models, (str, os.PathLike, ir.Model)):
        models = [models]
    if not models:
        raise OnnxoptError("give at least one model to benchmark")
    loaded = []
    for i, m in enumerate(models):
        if isinstance(m, ir.Model):
            src = m.meta.get("onnxopt.source_path")
            loaded.append(_Model(os.path.basename(src) if src else f"model{i}", None, m))
        else:
            loaded.append(_Model(os.path.basename(os.fspath(m)), os.fspath(m), load_model(m)))
    # Labels must tell the models apart in tables and JSON: the file name, the path as
    # given where two different files share a name, "#2" for the same model twice.
    by_name: dict[str, set] = {}
    for m in loaded:
        src = m.path or m.model.meta.get("onnxopt.source_path")
        by_name.setdefault(m.label, set()).add(os.path.realpath(src) if src else id(m.model))
    for m in loaded:
        if m.path is not None and len(by_name[m.label]) > 1:
            m.label = m.path
    seen: dict[str, int] = {}
    for m in loaded:
        n = seen.get(m.label, 0) + 1
        seen[m.label] = n
        if n > 1:
            m.label = f"{m.label}#{n}"
    return loaded


# --- inputs -------------------------------------------------------------------------------

def _check_compatible(models: list[_Model], feeds: Mapping[str, np.ndarray], source: str) -> None:
    base = models[0]
    names0 = sorted(v.name for v in model_inputs(base.model))
    for m in models[1:]:
        names = sorted(v.name for v in model_inputs(m.model))
        if names != names0:
            raise OnnxoptError(
                f"the models have incompatible inputs: {base.label} takes {', '.join(names0)}, "
                f"{m.label} takes {', '.join(names)}"
            )
    for m in models:
        try:
            validate_feeds(m.model, feeds, source=source)
        except OnnxoptError as e:
            raise OnnxoptError(f"{m.label}: {e}") from None


def _batch_dim(model: _Model, name: str):
    for v in model_inputs(model.model):
        if v.name == name:
            return None if v.shape is None or len(v.shape) == 0 else v.shape[0]
    return None


def _feeds_for_batch(
    models: list[_Model], base: dict[str, np.ndarray], batch: int, *, generated: bool, seed: int
) -> dict[str, np.ndarray]:
    """The feeds with the leading (batch) dimension set to ``batch``.

    Every input's dimension 0 must be dynamic in every model (or already equal to
    ``batch``); generated inputs are regenerated at the new shape (same seed), inputs
    from a file are repeated cyclically along dimension 0.
    """
    for m in models:
        for name, arr in base.items():
            if arr.ndim == 0:
                raise OnnxoptError(f"{m.label}: input {name!r} is a scalar; it has no batch dimension for --batch-sizes")
            dim = _batch_dim(m, name)
            if isinstance(dim, int) and dim >= 0 and dim != batch:
                raise OnnxoptError(
                    f"{m.label}: input {name!r} has a fixed batch dimension of {dim}; --batch-sizes {batch} "
                    "needs a model exported with a dynamic batch axis"
                )
    if generated:
        new_shapes = {name: (batch, *arr.shape[1:]) for name, arr in base.items()}
        return make_sample_inputs(models[0].model, new_shapes, seed=seed)
    out = {}
    for name, arr in base.items():
        if arr.shape[0] == 0:
            raise OnnxoptError(f"--inputs: input {name!r} is empty along dimension 0; cannot repeat it to batch {batch}")
        out[name] = np.ascontiguousarray(np.take(arr, np.arange(batch) % arr.shape[0], axis=0))
    return out


def _batch_of(feeds: Mapping[str, np.ndarray]) -> int:
    for arr in feeds.values():
        if arr.ndim >= 1:
            return int(arr.shape[0])
    return 1


# --- sessions and the timed call --------------------------------------------------------------

def session_options(threads: int, *, spinning: bool = True, stop_spinning_after_run: bool = False) -> ort.SessionOptions:
    """Intra-op = ``threads``, inter-op 1, sequential: the setting latency numbers need.

    ``spinning=False`` stops pool threads from ever busy-waiting (ORT's default is to
    spin, which lowers the latency of a run's many parallel sections).
    ``stop_spinning_after_run=True`` keeps the spinning inside a run but ends it when
    the run returns (ORT's ``session.force_spinning_stop``). Several sessions timed in
    turn need it: otherwise the previous session's pool is still spinning while the next
    one runs, and on 2 cores that took half of its CPU (PP-OCRv4 det fp32 61 ms a run
    alternating against 28 ms with the spin stopped; int8 36 against 16; back to back,
    one session alone, the two settings are within 1%).
    """
    so = ort.SessionOptions()
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    elif stop_spinning_after_run:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    so.log_severity_level = 4  # fatal only: run errors become one OnnxoptError line, not ORT log spam
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


class _Runner:
    """One session bound to one feed; ``step`` is the zero-argument call the clock times."""

    def __init__(
        self, session: ort.InferenceSession, feeds: dict[str, np.ndarray], config: ProviderConfig, *, io_binding: bool, include_copies: bool
    ):
        self.session = session
        self.output_names = [o.name for o in session.get_outputs()]
        self.io_binding = io_binding
        self._keep: list = []  # OrtValues/arrays the binding points into
        if not io_binding:
            # session.run exactly as an application calls it; the feed dict is built once.
            self.step = functools.partial(session.run, self.output_names, dict(feeds))
            return
        device = config.device
        device_id = int(config.options.get("device_id", 0))
        io = session.io_binding()
        for name, arr in feeds.items():
            arr = np.ascontiguousarray(arr)
            self._keep.append(arr)
            if include_copies:
                io.bind_cpu_input(name, arr)  # host memory: copied to the device inside every run
            else:
                ov = ort.OrtValue.ortvalue_from_numpy(arr, device, device_id)
                self._keep.append(ov)
                io.bind_ortvalue_input(name, ov)
        out_device = "cpu" if include_copies else device
        for name in self.output_names:
            io.bind_output(name, out_device, device_id)
        io.synchronize_inputs()
        self.io = io
        run_io, sync = session.run_with_iobinding, io.synchronize_outputs

        def step():
            run_io(io)
            sync()

        self.step = step

    def first_run(self) -> tuple[float, dict[str, np.ndarray]]:
        """Time the first call and return host copies of its outputs."""
        t0 = time.perf_counter_ns()
        out = self.step()
        t1 = time.perf_counter_ns()
        if not self.io_binding:
            return (t1 - t0) / 1e6, dict(zip(self.output_names, out))
        values = self.io.get_outputs()
        outputs = dict(zip(self.output_names, self.io.copy_outputs_to_cpu()))
        # Bind the buffers the first run allocated, so timed runs allocate nothing.
        # Shapes cannot change between runs: the feeds are fixed.
        self.io.clear_binding_outputs()
        for name, value in zip(self.output_names, values):
            self.io.bind_ortvalue_output(name, value)
        self._keep.extend(values)
        return (t1 - t0) / 1e6, outputs

    def close(self) -> None:
        self._keep.clear()
        self.step = None
        self.io = None
        self.session = None


def _timed_rounds(
    steps: list[Callable[[], object]],
    *,
    rounds: int | None,
    seconds: float | None,
    on_round: Callable[[int], None] | None,
    block: int = 1,
) -> list[list[int]]:
    """Interleaved rounds: each round times every step ``block`` times in a row. Nanoseconds, per step.

    The order rotates from round to round (A B | B A | A B ... ; A B C | B C A | C A B
    ...) so every model runs equally often in every position of a round. Measured on
    2 cores with ORT's default thread-pool spinning, a model timed first in every round
    of an A/A pair came out 7-12% slower than its twin (median paired ratio); with the
    rotation the same pair gives 1.01-1.04.

    ``block`` > 1 runs each model that many times back to back within a round: a model
    then mostly runs after itself, with its weights and buffers still in cache, as a
    deployed model does. With one run per turn every run follows another model, which
    costs a model with large weights more (MiniLM fp32, 90 MB: 11.4 ms a run alternating
    against 8.9 ms in blocks of 20 on this 2-core VM; its int8 model 6.0 against 3.7;
    PP-OCRv4 det, 4.7 MB: within 2%). Those are with each session's spinning stopped
    after its run (``session_options``); before that, alternating also charged every run
    for the previous session's spinning threads.
    """
    pc = time.perf_counter_ns
    times: list[list[int]] = [[] for _ in steps]
    pairs = [(s, t.append) for s, t in zip(steps, times)]
    orders = [pairs[r:] + pairs[:r] for r in range(len(pairs))]
    n_orders = len(orders)
    # --duration gives each model about that much timed work.
    deadline = pc() + int(seconds * 1e9 * len(steps)) if seconds is not None else None
    max_rounds = rounds if rounds is not None else 1 << 62
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed run would be charged to the model
    try:
        done = 0
        while done < max_rounds:
            for step, append in orders[done % n_orders]:
                for _ in range(block):
                    t0 = pc()
                    out = step()
                    t1 = pc()
                    out = None  # outputs are freed here, after the clock stopped  # noqa: F841
                    append(t1 - t0)
            done += 1
            if deadline is not None and pc() >= deadline:
                break
            if on_round is not None:
                on_round(done)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


# --- the benchmark ----------------------------------------------------------------------------

def _check_counts(runs, duration, warmup, threads, batch_sizes) -> None:
    if runs is not None and duration is not None:
        raise OnnxoptError("give --runs or --duration, not both")
    if runs is not None and (not isinstance(runs, int) or runs < 1):
        raise OnnxoptError(f"--runs must be at least 1, got {runs}")
    if duration is not None and not (duration > 0 and np.isfinite(duration)):
        raise OnnxoptError(f"--duration must be a positive number of seconds, got {duration}")
    if warmup is None or warmup < 0:
        raise OnnxoptError(f"--warmup must be 0 or more, got {warmup}")
    if threads is not None and threads < 1:
        raise OnnxoptError(f"--threads must be at least 1, got {threads}")
    for b in batch_sizes or ():
        if not isinstance(b, int) or b < 1:
            raise OnnxoptError(f"--batch-sizes: every batch size must be a positive integer, got {b}")


def parse_batch_sizes(text: str | None) -> list[int] | None:
    """``"1,8,32"`` -> ``[1, 8, 32]``."""
    if text is None:
        return None
    sizes = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            sizes.append(int(part))
        except ValueError:
            raise OnnxoptError(f"--batch-sizes {text!r}: expected comma-separated integers, for example 1,8,32") from None
    if not sizes:
        raise OnnxoptError(f"--batch-sizes {text!r}: expected comma-separated integers, for example 1,8,32")
    return sizes


def benchmark(
    models: Sequence[ModelLike] | ModelLike,
    *,
    ep: str | Sequence[str] = "cpu",
    threads: int | None = None,
    warmup: int = DEFAULT_WARMUP,
    runs: int | None = None,
    duration: float | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    inputs: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    batch_sizes: Sequence[int] | None = None,
    io_binding: bool | None = None,
    include_copies: bool = False,
    check_outputs: bool = False,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    trt_fp16: bool = False,
    trt_int8: bool = False,
    trt_engine_cache: str | os.PathLike | None = None,
    ep_options: Mapping[str, str] | None = None,
    seed: int = 0,
    spinning: bool = True,
    block: int = 1,
    progress: ProgressFn | None = None,
) -> BenchReport:
    """Time ``models`` (paths or ``onnx_ir`` models) on each provider and batch size.

    ``runs`` timed runs per model (default 100) or ``duration`` seconds of timed runs
    per model; ``warmup`` untimed runs first. Several models are interleaved and each
    is compared with the first (``report.comparisons``). ``io_binding=None`` means on
    for device providers (CUDA, TensorRT, DirectML...), off for CPU. ``block``: runs of
    each model back to back within a round (1: strictly alternating). ``progress`` is
    called as ``progress(description, done, total)`` between runs, never inside one.
    """
    from onnxopt import arguments as arg

    # Types here; the ranges below, in the CLI's words.
    runs = arg.number("runs", runs, integer=True, optional=True)
    warmup = arg.number("warmup", warmup, integer=True)
    threads = arg.number("threads", threads, integer=True, optional=True)
    duration = arg.number("duration", duration, optional=True)
    block = arg.number("block", block, integer=True)
    seed = arg.number("seed", seed, integer=True)
    rtol, atol = arg.number("rtol", rtol), arg.number("atol", atol)
    if not (rtol >= 0 and atol >= 0):
        raise OnnxoptError(f"tolerances must be >= 0 (got rtol {rtol}, atol {atol})")
    shapes = arg.shapes("shapes", shapes)
    for name, value in (("include_copies", include_copies), ("check_outputs", check_outputs), ("trt_fp16", trt_fp16),
                        ("trt_int8", trt_int8), ("spinning", spinning)):
        arg.flag(name, value)
    if io_binding is not None:
        arg.flag("io_binding", io_binding)
    if inputs is not None and not isinstance(inputs, (str, os.PathLike, Mapping)):
        raise OnnxoptError(f"inputs: expected an .npz path or one feed dict {{input name: array}}, "
                           f"got {type(inputs).__name__}")
    if ep_options is not None and not isinstance(ep_options, Mapping):
        from onnxopt.bench.providers import parse_ep_options

        ep_options = parse_ep_options(arg.names("ep_options", ep_options))
    if isinstance(batch_sizes, str):
        batch_sizes = parse_batch_sizes(batch_sizes)
    if runs is None and duration is None:
        runs = DEFAULT_RUNS
    batch_sizes = list(batch_sizes) if batch_sizes else None
    _check_counts(runs, duration, warmup, threads, batch_sizes)
    if not isinstance(block, int) or block < 1:
        raise OnnxoptError(f"--block must be at least 1, got {block}")
    eps = [ep] if isinstance(ep, str) else list(ep)
    if not eps:
        raise OnnxoptError("give at least one execution provider")
    configs = [
        make_provider_config(e, trt_fp16=trt_fp16, trt_int8=trt_int8, trt_engine_cache=trt_engine_cache, options=ep_options)
        for e in eps
    ]
    if include_copies and io_binding is False:
        raise OnnxoptError("--include-copies needs IO binding; without it session.run copies inputs and outputs anyway")
    n_threads = threads or physical_cores()
    loaded = _load_models(models)
    try:
        for config in configs:
            _check_trt_int8(loaded, config)
        return _run(
            loaded, configs, n_threads=n_threads, threads_given=threads is not None, warmup=warmup, runs=runs,
            duration=duration, shapes=shapes, inputs=inputs, batch_sizes=batch_sizes, io_binding=io_binding,
            include_copies=include_copies, check_outputs=check_outputs, rtol=rtol, atol=atol, seed=seed, progress=progress,
            spinning=spinning, block=block,
        )
    finally:
        for m in loaded:
            m.close()


def _check_trt_int8(models: list[_Model], config: ProviderConfig) -> None:
    """TensorRT int8 needs scales: QDQ nodes in the model, or a calibration table.

    Without either TensorRT has no ranges for the activations; rather than let it fail
    deep in engine building (or quietly fall back to other precisions), say so.
    """
    if config.options.get("trt_int8_enable") != "True" or config.options.get("trt_int8_calibration_table_name"):
        return
    from onnxopt.graph import all_nodes

    for m in models:
        if not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in all_nodes(m.model)):
            raise OnnxoptError(
                f"{m.label}: --trt-int8 needs a QDQ model (QuantizeLinear/DequantizeLinear nodes) and this one has none; "
                "quantize it first, or give a calibration table with --ep-option trt_int8_calibration_table_name=FILE"
            )


def _run(loaded: list[_Model], configs: list[ProviderConfig], *, n_threads, threads_given, warmup, runs, duration, shapes,
         inputs, batch_sizes, io_binding, include_copies, check_outputs, rtol, atol, seed, progress, spinning,
         block=1) -> BenchReport:
    generated = inputs is None
    if generated:
        base_feeds = make_sample_inputs(loaded[0].model, shapes, seed=seed)
        source = "generated inputs"
    elif isinstance(inputs, (str, os.PathLike)):
        if shapes:
            raise OnnxoptError("--shape applies to generated inputs; with --inputs the file's arrays set the shapes")
        base_feeds = load_npz_inputs(inputs, None)
        source = f"--inputs {inputs}"
    else:
        base_feeds = {k: np.asarray(v) for k, v in inputs.items()}
        source = "inputs"
    _check_compatible(loaded, base_feeds, source)

    if batch_sizes:
        settings_list = [
            (b, _feeds_for_batch(loaded, base_feeds, b, generated=generated, seed=seed)) for b in batch_sizes
        ]
    else:
        settings_list = [(_batch_of(base_feeds), base_feeds)]

    results: list[dict] = []
    comparisons: list[dict] = []
    samples: dict[tuple[str, str, int], np.ndarray] = {}
    for config in configs:
        use_binding = io_binding if io_binding is not None else config.device != "cpu"
        for batch, feeds in settings_list:
            _bench_setting(
                loaded, config, batch, feeds, n_threads=n_threads, spinning=spinning, block=block, warmup=warmup, runs=runs,
                duration=duration,
                io_binding=use_binding, include_copies=include_copies, check_outputs=check_outputs, rtol=rtol, atol=atol,
                seed=seed, progress=progress, results=results, comparisons=comparisons, samples=samples,
            )
    settings = {
        "eps": [c.short for c in configs],
        "providers": {c.short: {"name": c.name, "options": c.options, "device": c.device} for c in configs},
        "threads": {
            "intra_op": n_threads,
            "inter_op": 1,
            "execution_mode": "sequential",
            "source": "--threads" if threads_given else "physical cores",
            "spinning": spinning,
            "spinning_stops_after_run": spinning and len(loaded) > 1,
        },
        "block": block,
        "warmup": warmup,
        "runs": runs,
        "duration_s": duration,
        "batch_sizes": batch_sizes,
        "io_binding": io_binding,
        "include_copies": include_copies,
        "inputs": source,
        "input_shapes": {k: list(v.shape) for k, v in base_feeds.items()},
        "input_dtypes": {k: str(v.dtype) for k, v in base_feeds.items()},
        "check_outputs": check_outputs,
        "rtol": rtol,
        "atol": atol,
        "seed": seed,
        "interleaved": len(loaded) > 1,
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "confidence": CONFIDENCE, "statistic": "median of paired ratios"},
        "timer": "time.perf_counter_ns around one inference call",
    }
    return BenchReport(
        machine=machine_info(),
        packages=package_versions(),
        settings=settings,
        results=results,
        comparisons=comparisons,
        samples=samples,
        model_paths=[m.path for m in loaded if m.path is not None],
    )


def _bench_setting(loaded, config, batch, feeds, *, n_threads, spinning, warmup, runs, duration, io_binding, include_copies,
                   block=1,
                   check_outputs, rtol, atol, seed, progress, results, comparisons, samples) -> None:
    what = f"{config.short} batch {batch}"
    runners: list[_Runner] = []
    info: list[dict] = []
    first_outputs: list[dict[str, np.ndarray]] = []
    try:
        for m in loaded:
            if progress:
                progress(f"{what}: loading {m.label}", 0, None)
            mem = PeakMemory()
            mem.start()
            src = m.source()
            providers, provider_options = config.session_args()
            t0 = time.perf_counter_ns()
            try:
                # Several sessions in turn: each one's spinning must end with its run (see session_options).
                so = session_options(n_threads, spinning=spinning, stop_spinning_after_run=len(loaded) > 1)
                sess = ort.InferenceSession(src, so, providers=providers, provider_options=provider_options)
            except Exception as e:
                raise OnnxoptError(f"{m.label}: onnxruntime cannot create a {config.short} session: {_first_line(e)}") from None
            init_ms = (time.perf_counter_ns() - t0) / 1e6
            check_session_providers(sess, config, m.label)
            try:
                runner = _Runner(sess, feeds, config, io_binding=io_binding, include_copies=include_copies)
                runners.append(runner)
                first_ms, outs = runner.first_run()
                if progress:
                    progress(f"{what}: warm-up {m.label}", 0, warmup)
                step = runner.step
                for i in range(warmup):
                    step()
            except OnnxoptError:
                raise
            except Exception as e:
                raise OnnxoptError(f"{m.label}: onnxruntime failed to run it at batch {batch}: {_first_line(e)}") from None
            info.append({"session_init_ms": init_ms, "first_run_ms": first_ms, "peak_memory_mb": mem.stop()})
            first_outputs.append(outs if check_outputs else {})
            del outs

        total = runs
        label = f"{what}: timing {len(loaded)} model{'s' if len(loaded) > 1 else ''}" + (
            (" (interleaved" + (f", blocks of {block})" if block > 1 else ")")) if len(loaded) > 1 else "")
        last = [0.0]

        def on_round(done: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 0.2:  # rendering between runs, at most 5 times a second
                last[0] = now
                progress(label, min(done * block, total) if total is not None else done * block, total)

        if progress:
            progress(label, 0, total)
        try:
            rounds = -(-runs // block) if runs is not None else None
            times_ns = _timed_rounds([r.step for r in runners], rounds=rounds, seconds=duration,
                                     on_round=on_round if progress else None, block=block)
            if runs is not None:
                times_ns = [t[:runs] for t in times_ns]  # the last block may overshoot; same cut for all
        except Exception as e:
            raise OnnxoptError(f"onnxruntime failed during the timed runs at batch {batch}: {_first_line(e)}") from None
        if progress:
            progress(label, len(times_ns[0]), len(times_ns[0]))
    finally:
        for r in runners:
            r.close()
        runners.clear()

    ms = [np.asarray(t, dtype=np.float64) / 1e6 for t in times_ns]
    for m, t, extra in zip(loaded, ms, info):
        stats = latency_stats(t)
        results.append({
            "model": m.label,
            "path": m.path,
            "ep": config.short,
            "provider": config.name,
            "batch": batch,
            "io_binding": io_binding,
            "latency_ms": stats,
            "throughput_per_s": batch * 1000.0 / stats["mean"],
            "runs": int(t.size),
            "first_run_ms": extra["first_run_ms"],
            "session_init_ms": extra["session_init_ms"],
            "peak_memory_mb": extra["peak_memory_mb"],
            "threads": {"intra_op": n_threads, "inter_op": 1},
        })
        samples[(m.label, config.short, batch)] = t
    for i in range(1, len(loaded)):
        speedup, (lo, hi) = paired_speedup(ms[0], ms[i], resamples=BOOTSTRAP_RESAMPLES, confidence=CONFIDENCE, seed=seed)
        comp = {
            "baseline": loaded[0].label,
            "candidate": loaded[i].label,
            "ep": config.short,
            "batch": batch,
            "speedup": speedup,
            "speedup_interval": [lo, hi],
            "pairs": int(ms[0].size),
        }
        if check_outputs:
            comp["outputs"] = [d.as_dict() for d in _diff_outputs(first_outputs[0], first_outputs[i], rtol=rtol, atol=atol)]
        comparisons.append(comp)


def _diff_outputs(ref: dict[str, np.ndarray], new: dict[str, np.ndarray], *, rtol: float, atol: float):
    """Match outputs by name; if the names differ but the counts agree, by position."""
    if set(ref) <= set(new):
        diffs = compare_outputs(ref, new, rtol=rtol, atol=atol)
    elif len(ref) == len(new):
        diffs = [diff_arrays(a, ref[a], new[b], rtol=rtol, atol=atol) for a, b in zip(ref, new)]
    else:
        diffs = compare_outputs(ref, new, rtol=rtol, atol=atol)  # missing ones come back as not within
    for d in diffs:
        d.shape_ref = list(d.shape_ref)
        d.shape_new = list(d.shape_new)
    return diffs
