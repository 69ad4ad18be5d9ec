"""``benchmark()``: time ONNX models on an execution provider, honestly.

What "honestly" means here, and where each rule is enforced:

- Sessions are created and run once before timing; the creation time and the first
  run (which in ONNX Runtime includes kernel selection, arena growth and, for TensorRT,
  engine building) are reported apart from the steady state, never mixed into it.
- ``warmup`` further untimed runs per model follow, interleaved like the timed runs and
  right before them (after every session exists), so no model's warm-up has gone
  stale behind the other models' session creation; then the timed runs.
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
  paired per-run ratios with a seeded bootstrap interval over rounds (see
  ``stats.paired_speedup``).
- Peak memory is measured apart from the timing, in a fresh child process per model
  (``memprobe``): in this process it depended on the sessions created before.
  Device memory is not counted.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import numbers
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.bench import memprobe
from onnxopt.bench.machine import machine_info, package_versions, physical_cores
from onnxopt.bench.providers import ProviderConfig, check_session_providers, make_provider_config
from onnxopt.bench.report import BenchReport
from onnxopt.bench.stats import latency_stats, paired_speedup, rounds_of
from onnxopt.errors import OnnxoptError
from onnxopt.inputs import DEFAULT_DIM, load_npz_inputs, make_sample_inputs, model_inputs, validate_feeds
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
    return memprobe.make_session_options(ort, session_spec(threads, spinning=spinning,
                                                          stop_spinning_after_run=stop_spinning_after_run))


def session_spec(threads: int, *, spinning: bool = True, stop_spinning_after_run: bool = False) -> dict:
    """What :func:`session_options` sets, as JSON: the memory probe's child builds the same options."""
    config = {}
    if not spinning:
        config["session.intra_op.allow_spinning"] = "0"
        config["session.inter_op.allow_spinning"] = "0"
    elif stop_spinning_after_run:
        config["session.force_spinning_stop"] = "1"
    # log_severity 4, fatal only: run errors become one OnnxoptError line, not ORT log spam.
    return {"config": config, "log_severity": 4, "intra_op": threads, "inter_op": 1}


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
        io, keep = memprobe.bind_io(ort, session, feeds, config.device, _device_id(config), include_copies)
        self._keep.extend(keep)
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


def _device_id(config: ProviderConfig) -> int:
    try:
        return int(config.options.get("device_id", 0))
    except ValueError:
        raise OnnxoptError(f"--ep-option device_id={config.options['device_id']!r}: expected an integer") from None


def _timed_rounds(
    steps: list[Callable[[], object]],
    *,
    rounds: int | None,
    seconds: float | None,
    on_round: Callable[[int], None] | None,
    block: int = 1,
) -> list[list[int]]:
    """Interleaved rounds: each round times every step ``block`` times in a row. Nanoseconds, per step.

    Two models strictly alternate (A B A B ...), so with one run per turn every run
    starts right after the other model's. Three or more rotate from round to round
    (A B C | B C A | C A B ...): every model runs equally often in every position of a
    round, and no model ever follows itself. (A rotation of two, A B | B A, would make
    half of all runs follow the same model: A B B A A B ...) With ORT's default
    thread-pool spinning left on (before ``session_options`` stopped it after each run),
    a model timed first in every round of an A/A pair came out 7-12% slower than its
    twin on 2 cores; with the spinning stopped, an A/A pair of the PP-OCR classifier
    (200 runs, 10 reruns) read a median of 1.007 alternating and 1.005 with A B | B A.

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
    # Two models: one order, A B A B ... (see the docstring); more: rotate.
    orders = [pairs] if len(pairs) <= 2 else [pairs[r:] + pairs[:r] for r in range(len(pairs))]
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

def _check_counts(runs, duration, warmup, threads, batch_sizes, block=1, seed=0) -> None:
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
    if seed < 0:
        raise OnnxoptError(f"--seed must be 0 or more, got {seed}")
    if block < 1:
        raise OnnxoptError(f"--block must be at least 1, got {block}")
    if runs is not None and block > runs:
        # Every round runs each model `block` times: the extra runs would be thrown away,
        # and with a single round nothing is interleaved any more.
        raise OnnxoptError(f"--block {block} is larger than --runs {runs}: a round runs each model --block times; "
                           f"give a --block of at most {runs}")
    for b in batch_sizes or ():
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise OnnxoptError(f"--batch-sizes: every batch size must be a positive integer, got {b!r}")
    dup = _first_duplicate(batch_sizes or ())
    if dup is not None:
        raise OnnxoptError(f"--batch-sizes: {dup} is given twice; give each batch size once")


def _first_duplicate(items):
    seen = set()
    for x in items:
        if x in seen:
            return x
        seen.add(x)
    return None


def _batch_size_list(batch_sizes) -> list[int] | None:
    """``batch_sizes`` as given to :func:`benchmark` -> a list of ints (None: the inputs' own batch)."""
    if batch_sizes is None:
        return None
    if isinstance(batch_sizes, str):
        return parse_batch_sizes(batch_sizes)
    if isinstance(batch_sizes, numbers.Integral) and not isinstance(batch_sizes, bool):
        return [int(batch_sizes)]  # one size, like one model or one provider
    if isinstance(batch_sizes, (bytes, Mapping)) or not isinstance(batch_sizes, (Sequence, np.ndarray, set, frozenset)):
        raise OnnxoptError(f"batch_sizes={batch_sizes!r}: expected a list of positive integers such as [1, 8, 32]")
    sizes = []
    for b in batch_sizes:
        # numpy integers (np.int64 out of an array) are integers; True is not a batch size.
        if isinstance(b, (bool, np.bool_)) or not isinstance(b, numbers.Integral):
            raise OnnxoptError(f"--batch-sizes: every batch size must be a positive integer, got {b!r}")
        sizes.append(int(b))
    return sizes or None  # [] as None: the inputs' own batch


def _ep_list(ep) -> list[str]:
    if isinstance(ep, str):
        eps = [ep]
    elif isinstance(ep, Sequence) and not isinstance(ep, (bytes, Mapping)):
        eps = list(ep)
    else:
        raise OnnxoptError(f"ep={ep!r}: expected a provider name such as 'cpu' or 'cuda', or a list of them")
    for e in eps:
        if not isinstance(e, str):
            raise OnnxoptError(f"ep={ep!r}: every provider must be a name such as 'cpu' or 'cuda', got {e!r}")
    if not eps:
        raise OnnxoptError("give at least one execution provider")
    return eps


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
    memory: bool = True,
    progress: ProgressFn | None = None,
) -> BenchReport:
    """Time ``models`` (paths or ``onnx_ir`` models) on each provider and batch size.

    ``runs`` timed runs per model (default 100) or ``duration`` seconds of timed runs
    per model; ``warmup`` untimed runs first. Several models are interleaved and each
    is compared with the first (``report.comparisons``). ``io_binding=None`` means on
    for device providers (CUDA, TensorRT, DirectML...), off for CPU. ``block``: runs of
    each model back to back within a round (1: strictly alternating). ``memory``:
    measure each model's peak memory in a child process (``False``: ``peak_memory_mb``
    is ``None``). ``progress`` is called as ``progress(description, done, total)``
    between runs, never inside one.
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
                        ("trt_int8", trt_int8), ("spinning", spinning), ("memory", memory)):
        arg.flag(name, value)
    memory = bool(memory)
    if io_binding is not None:
        arg.flag("io_binding", io_binding)
    if inputs is not None and not isinstance(inputs, (str, os.PathLike, Mapping)):
        raise OnnxoptError(f"inputs: expected an .npz path or one feed dict {{input name: array}}, "
                           f"got {type(inputs).__name__}")
    if ep_options is not None and not isinstance(ep_options, Mapping):
        from onnxopt.bench.providers import parse_ep_options

        ep_options = parse_ep_options(arg.names("ep_options", ep_options))
    batch_sizes = _batch_size_list(batch_sizes)
    if runs is None and duration is None:
        runs = DEFAULT_RUNS
    _check_counts(runs, duration, warmup, threads, batch_sizes, block=block, seed=seed)
    eps = _ep_list(ep)
    configs = [
        make_provider_config(e, trt_fp16=trt_fp16, trt_int8=trt_int8, trt_engine_cache=trt_engine_cache, options=ep_options)
        for e in eps
    ]
    # The same provider twice (cpu and CPUExecutionProvider) would give two rows with one
    # key, and the table, CSV and plot would show the first one's numbers for both.
    names = [c.name for c in configs]
    dup = _first_duplicate(names)
    if dup is not None:
        given = [e for e, n in zip(eps, names) if n == dup]
        raise OnnxoptError(f"--ep: {dup} is given twice ({' and '.join(repr(g) for g in given)}); give each provider once")
    if include_copies and io_binding is False:
        raise OnnxoptError("--include-copies needs IO binding; without it session.run copies inputs and outputs anyway")
    if include_copies:
        host = [c.short for c in configs if c.device == "cpu"]
        if host:
            # Its tensors live in host memory: there is no copy to put back in the timing,
            # and a report saying include_copies: true would claim otherwise.
            raise OnnxoptError(f"--include-copies applies to device providers (cuda, tensorrt, ...); {host[0]} works on "
                               "host memory, so there are no copies to time")
    n_threads = threads or physical_cores()
    loaded = _load_models(models)
    try:
        for config in configs:
            _check_trt_int8(loaded, config)
        return _run(
            loaded, configs, n_threads=n_threads, threads_given=threads is not None, warmup=warmup, runs=runs,
            duration=duration, shapes=shapes, inputs=inputs, batch_sizes=batch_sizes, io_binding=io_binding,
            include_copies=include_copies, check_outputs=check_outputs, rtol=rtol, atol=atol, seed=seed, progress=progress,
            spinning=spinning, block=block, memory=memory,
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


def _defaulted_dims(model: ir.Model, shapes: Mapping[str, tuple[int, ...]] | None) -> dict[str, list[int]]:
    """{input: [dimension indices]} that generated inputs set to ``inputs.DEFAULT_DIM``.

    A dynamic dimension past the first (the batch, which defaults to 1) takes the
    default unless ``--shape`` gives the input, or gives another input sharing its
    named dimension (``make_sample_inputs`` propagates those).
    """
    given = dict(shapes or {})
    named: set[str] = set()
    for v in model_inputs(model):
        if v.name in given and v.shape is not None:
            named.update(d.value for d in v.shape if isinstance(d, ir.SymbolicDim) and d.value is not None)
    out: dict[str, list[int]] = {}
    for v in model_inputs(model):
        if v.name in given or v.shape is None:
            continue
        dims = [
            i for i, d in enumerate(v.shape)
            if i > 0 and not (isinstance(d, int) and d >= 0)
            and not (isinstance(d, ir.SymbolicDim) and d.value is not None and d.value in named)
        ]
        if dims:
            out[v.name] = dims
    return out


def _defaulted_warning(defaulted: dict[str, list[int]], feeds: Mapping[str, np.ndarray]) -> str:
    parts = [
        f"{name} (dimension{'s' if len(dims) > 1 else ''} {', '.join(map(str, dims))}: timed at "
        f"{'x'.join(map(str, feeds[name].shape))})"
        for name, dims in defaulted.items()
    ]
    name, dims = next(iter(defaulted.items()))
    example = "x".join("?" if i in dims else str(d) for i, d in enumerate(feeds[name].shape))
    return (f"dynamic input dimensions set to the default {DEFAULT_DIM}: {'; '.join(parts)}; "
            f"give the sizes the model is used at with --shape NAME:DIMS (--shape {name}:{example}, ? filled in)")


def _run(loaded: list[_Model], configs: list[ProviderConfig], *, n_threads, threads_given, warmup, runs, duration, shapes,
         inputs, batch_sizes, io_binding, include_copies, check_outputs, rtol, atol, seed, progress, spinning,
         block=1, memory=True) -> BenchReport:
    generated = inputs is None
    inputs_path = None
    if generated:
        base_feeds = make_sample_inputs(loaded[0].model, shapes, seed=seed)
        source = "generated inputs"
    elif isinstance(inputs, (str, os.PathLike)):
        if shapes:
            raise OnnxoptError("--shape applies to generated inputs; with --inputs the file's arrays set the shapes")
        base_feeds = load_npz_inputs(inputs, None)
        source = f"--inputs {inputs}"
        inputs_path = os.fspath(inputs)
    else:
        base_feeds = {k: np.asarray(v) for k, v in inputs.items()}
        source = "inputs"
    _check_compatible(loaded, base_feeds, source)
    defaulted = _defaulted_dims(loaded[0].model, shapes) if generated else {}
    warnings = [_defaulted_warning(defaulted, base_feeds)] if defaulted else []

    if batch_sizes:
        settings_list = [
            (b, _feeds_for_batch(loaded, base_feeds, b, generated=generated, seed=seed)) for b in batch_sizes
        ]
    else:
        settings_list = [(_batch_of(base_feeds), base_feeds)]

    results: list[dict] = []
    comparisons: list[dict] = []
    samples: dict[tuple[str, str, int], np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-mem-") as probe_dir:
        for config in configs:
            use_binding = io_binding if io_binding is not None else config.device != "cpu"
            for batch, feeds in settings_list:
                _bench_setting(
                    loaded, config, batch, feeds, n_threads=n_threads, spinning=spinning, block=block, warmup=warmup,
                    runs=runs, duration=duration, io_binding=use_binding, include_copies=include_copies,
                    check_outputs=check_outputs, rtol=rtol, atol=atol, seed=seed, progress=progress, results=results,
                    comparisons=comparisons, samples=samples, probe_dir=probe_dir if memory else None,
                )
    # One warning per reason, not one per model and setting.
    for note in dict.fromkeys(r["peak_memory_note"] for r in results if r.get("peak_memory_note")):
        warnings.append(f"peak memory not measured (shown as ?): {note}")
    for c in comparisons:
        for o in c.get("outputs", ()):
            if o.get("nonfinite"):  # equal NaN/inf count as equal: "within" proves nothing there
                warnings.append(f"{c['candidate']} ({c['ep']}, batch {c['batch']}): output {o['name']!r} has "
                                f"{o['nonfinite']} of {o['size']} values NaN or inf in both models; compare on real inputs (--inputs)")
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
        "defaulted_dims": defaulted,
        "check_outputs": check_outputs,
        "rtol": rtol,
        "atol": atol,
        "seed": seed,
        "interleaved": len(loaded) > 1,
        "order": "alternating" if len(loaded) == 2 else ("rotating" if len(loaded) > 2 else "single"),
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "confidence": CONFIDENCE,
                      "statistic": "median of paired per-run ratios", "resampled": "rounds"},
        "memory": {"measured": memory, "method": memprobe.METHOD if memory else None},
        "timer": "time.perf_counter_ns around one inference call",
    }
    # Files a report must never overwrite: the model files (also of in-memory models that
    # were loaded from one) and the --inputs file.
    model_paths = []
    for m in loaded:
        src = m.path or m.model.meta.get("onnxopt.source_path")
        if src is not None:
            model_paths.append(src)
    return BenchReport(
        machine=machine_info(),
        packages=package_versions(),
        settings=settings,
        results=results,
        comparisons=comparisons,
        samples=samples,
        model_paths=model_paths,
        inputs_path=inputs_path,
        warnings=warnings,
    )


def _write_npz(path: str, feeds: Mapping[str, np.ndarray]) -> None:
    # Not np.savez: an input named "file" would collide with its first parameter.
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in feeds.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)


def _probe_memory(loaded, config, feeds, info, *, n_threads, spinning, io_binding, include_copies, probe_dir, what,
                  progress) -> None:
    """Each model's peak memory, one fresh child process each (see ``memprobe``), into ``info``."""
    feeds_path = os.path.join(probe_dir, "feeds.npz")
    try:
        _write_npz(feeds_path, feeds)
    except (OSError, ValueError) as e:
        for extra in info:
            extra["peak_memory_mb"], extra["peak_memory_note"] = None, f"cannot write the feeds for the probe: {_first_line(e)}"
        return
    providers, provider_options = config.session_args()
    binding = ({"device": config.device, "device_id": _device_id(config), "include_copies": include_copies}
               if io_binding else None)
    for i, (m, extra) in enumerate(zip(loaded, info)):
        if progress:
            progress(f"{what}: peak memory of {m.label} (child process)", i, len(loaded))
        src = m.source()
        if isinstance(src, bytes):
            model_path = os.path.join(probe_dir, f"model{i}.onnx")
            with open(model_path, "wb") as f:
                f.write(src)
        else:
            model_path = src
        spec = {
            "model": os.path.abspath(model_path),
            "feeds": feeds_path,
            # Same options as the timed sessions (see _bench_setting).
            "session": session_spec(n_threads, spinning=spinning, stop_spinning_after_run=len(loaded) > 1),
            "providers": providers,
            "provider_options": provider_options,
            "io_binding": binding,
        }
        # Generous: the child creates and runs the session once, as the parent just did.
        timeout = 120 + 5 * (extra["session_init_ms"] + extra["first_run_ms"]) / 1000
        peak, note = memprobe.probe(spec, os.path.join(probe_dir, "spec.json"), timeout_s=timeout)
        extra["peak_memory_mb"], extra["peak_memory_note"] = peak, note
    try:
        os.remove(feeds_path)
    except OSError:
        pass


def _bench_setting(loaded, config, batch, feeds, *, n_threads, spinning, warmup, runs, duration, io_binding, include_copies,
                   block=1, check_outputs, rtol, atol, seed, progress, results, comparisons, samples,
                   probe_dir=None) -> None:
    what = f"{config.short} batch {batch}"
    runners: list[_Runner] = []
    info: list[dict] = []
    first_outputs: list[dict[str, np.ndarray]] = []
    try:
        for m in loaded:
            if progress:
                progress(f"{what}: loading {m.label}", 0, None)
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
            except OnnxoptError:
                raise
            except Exception as e:
                raise OnnxoptError(f"{m.label}: onnxruntime failed to run it at batch {batch}: {_first_line(e)}") from None
            info.append({"session_init_ms": init_ms, "first_run_ms": first_ms, "peak_memory_mb": None})
            first_outputs.append(outs if check_outputs else {})
            del outs

        # Warm-up after every session exists and right before the timed runs, interleaved
        # like them: warmed right after its own creation, the first model's warm-up went
        # stale while the others were created, and its first timed run was its slowest.
        if warmup:
            if progress:
                progress(f"{what}: warm-up", 0, warmup)
            i = None
            try:
                for _ in range(warmup):
                    for i, r in enumerate(runners):
                        r.step()
            except Exception as e:
                raise OnnxoptError(
                    f"{loaded[i].label}: onnxruntime failed to run it at batch {batch}: {_first_line(e)}") from None

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

    # After the timing, with this process's sessions closed: the children neither compete
    # with timed runs nor fill a TensorRT engine cache before the first run is timed.
    if probe_dir is not None:
        _probe_memory(loaded, config, feeds, info, n_threads=n_threads, spinning=spinning, io_binding=io_binding,
                      include_copies=include_copies, probe_dir=probe_dir, what=what, progress=progress)

    ms = [np.asarray(t, dtype=np.float64) / 1e6 for t in times_ns]
    for m, t, extra in zip(loaded, ms, info):
        stats = latency_stats(t)
        result = {
            "model": m.label,
            "path": m.path,
            "ep": config.short,
            "provider": config.name,
            "batch": batch,
            "io_binding": io_binding,
            "input_shapes": {k: list(v.shape) for k, v in feeds.items()},
            "latency_ms": stats,
            "throughput_per_s": batch * 1000.0 / stats["mean"],
            "runs": int(t.size),
            "first_run_ms": extra["first_run_ms"],
            "session_init_ms": extra["session_init_ms"],
            "peak_memory_mb": extra["peak_memory_mb"],
            "threads": {"intra_op": n_threads, "inter_op": 1},
        }
        if extra.get("peak_memory_note"):
            result["peak_memory_note"] = extra["peak_memory_note"]
        results.append(result)
        samples[(m.label, config.short, batch)] = t
    for i in range(1, len(loaded)):
        speedup, interval = paired_speedup(ms[0], ms[i], resamples=BOOTSTRAP_RESAMPLES, confidence=CONFIDENCE, seed=seed,
                                           block=block)
        comp = {
            "baseline": loaded[0].label,
            "candidate": loaded[i].label,
            "ep": config.short,
            "batch": batch,
            "speedup": speedup,
            "speedup_interval": list(interval) if interval is not None else None,  # None: one round, no spread
            "pairs": int(ms[0].size),
            "rounds": rounds_of(int(ms[0].size), block),
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
