"""The safety net: does a model load, pass the checker, and give the same answers?

Every model onnxopt writes goes through :func:`check_model` and, where reference
outputs exist, :func:`compare_outputs`. Sessions are built from an in-memory proto
for ordinary models and from a temporary folder for models with external data, so
the checks never depend on the model having been saved by the caller.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxopt.errors import OnnxoptError, VerificationError
from onnxopt.model_io import EXTERNAL_DATA_THRESHOLD_BYTES, tensor_bytes


def session_options(threads: int | None = None, *, optimize: bool = True) -> ort.SessionOptions:
    so = ort.SessionOptions()
    # Fatal only: warnings about declared shapes are expected on real models, and ORT's
    # errors reach the user through the exception we turn into one line, not its logger.
    so.log_severity_level = 4
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return so


class _Session:
    """An ORT session that owns the temporary folder it may have needed."""

    def __init__(self, model: ir.Model, so: ort.SessionOptions, providers: Sequence[str]):
        self._tmp: tempfile.TemporaryDirectory | None = None
        if tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES or _has_external(model):
            self._tmp = tempfile.TemporaryDirectory(prefix="onnxopt-verify-")
            path = os.path.join(self._tmp.name, "model.onnx")
            _save_for_session(model, self._tmp.name, path)
            # Without prepacking ORT memory-maps the external weights instead of copying
            # them to its heap: a session on a 2.4 GB model then costs page cache, not RAM.
            so.add_session_config_entry("session.disable_prepacking", "1")
            self.session = ort.InferenceSession(path, so, providers=list(providers))
        else:
            proto = ir.serde.serialize_model(model)
            self.session = ort.InferenceSession(proto.SerializeToString(), so, providers=list(providers))

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, dict(feeds))))

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _save_for_session(model: ir.Model, folder: str, path: str) -> None:
    """Write ``model`` for ORT into ``folder`` without copying the weights it already has on disk.

    External tensors keep pointing at their files (hard-linked into ``folder``: ORT refuses
    data outside the model's folder, symlinks included); only tensors that live in memory
    (new or rewritten by a pass) are written, to ``new.data``. Verifying a 2.4 GB model
    then writes only what the passes changed. The model is left as it was.
    """
    values = [v for g in model.graphs() for v in g.initializers.values() if v.const_value is not None]
    originals = [v.const_value for v in values]
    links: dict[str, str | None] = {}
    in_memory = []
    try:
        for value in values:
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                source = os.path.realpath(tensor.path)
                if source not in links:
                    local = f"src{len(links)}.data"
                    try:
                        os.link(source, os.path.join(folder, local))
                    except OSError:  # another file system, or not allowed: copy it below
                        local = None
                    links[source] = local
                if links[source] is not None:
                    value.const_value = ir.ExternalTensor(
                        links[source], tensor.offset, tensor.length, tensor.dtype,
                        shape=tensor.shape, name=tensor.name, base_dir=folder,
                    )
                    continue
            if tensor.nbytes > 1024 or isinstance(tensor, ir.ExternalTensor):
                in_memory.append(value)  # (an external tensor here could not be linked: copy it)
        if in_memory:
            written = ir.external_data.convert_tensors_to_external(
                [v.const_value for v in in_memory], folder, "new.data"
            )
            for value, tensor in zip(in_memory, written):
                value.const_value = tensor
        onnx.save(ir.serde.serialize_model(model), path)
    finally:
        for value, tensor in zip(values, originals):
            value.const_value = tensor
    release_mappings(model)


def _is_empty(value) -> bool:
    try:
        return np.size(value) == 0
    except Exception:  # sequences of arrays with different shapes, maps
        return False


def _save_skeleton(model: ir.Model, folder: str, path: str) -> None:
    """Write ``model`` with every tensor over 1 KiB pointing into a sparse placeholder file."""
    values = [v for g in model.graphs() for v in g.initializers.values() if v.const_value is not None]
    originals = [v.const_value for v in values]
    offset = 0
    try:
        for value in values:
            tensor = value.const_value
            if tensor.nbytes > 1024 or isinstance(tensor, ir.ExternalTensor):
                value.const_value = ir.ExternalTensor(
                    "placeholder.data", offset, tensor.nbytes, tensor.dtype,
                    shape=tensor.shape, name=tensor.name, base_dir=folder,
                )
                offset += tensor.nbytes
        onnx.save(ir.serde.serialize_model(model), path)
    finally:
        for value, tensor in zip(values, originals):
            value.const_value = tensor
    with open(os.path.join(folder, "placeholder.data"), "wb") as f:
        f.truncate(offset)  # sparse: takes no disk space


def release_mappings(model: ir.Model) -> None:
    """Unmap the weight files a model's external tensors have mapped (they remap on next read).

    A pass that reads a weight leaves its file pages mapped in this process; ORT maps the
    same pages for its session, and both count in the resident size. Called before a
    session is built, so verifying a large model costs one copy of its weights, not two.
    """
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                try:
                    tensor.release()
                except BufferError:  # someone still holds an array view: keep the mapping
                    pass


def _has_external(model: ir.Model) -> bool:
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                return True
    return False


def make_session(
    model: ir.Model,
    *,
    threads: int | None = None,
    optimize: bool = True,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    options: ort.SessionOptions | None = None,
) -> _Session:
    """An ORT session for ``model``, in memory or (external data, > 1.8 GB) from a temp folder.

    ``options``: session options to use instead of ``session_options(threads, optimize=...)``
    (e.g. with ``optimized_model_filepath`` set); every session built from an ir.Model should
    come through here, because bytes from ``to_proto(...).SerializeToString()`` lose the
    folder external weights are resolved against.
    """
    so = options if options is not None else session_options(threads, optimize=optimize)
    return _Session(model, so, providers)


def run_model(model: ir.Model, feeds: Mapping[str, np.ndarray], *, threads: int | None = None) -> dict[str, np.ndarray]:
    """Run a model once in ONNX Runtime (CPU) and return its outputs by name."""
    sess = make_session(model, threads=threads)
    try:
        return sess.run(feeds)
    finally:
        sess.close()


DEFAULT_RTOL, DEFAULT_ATOL = 1e-4, 1e-5
# Half-precision outputs: reassociating or folding a few ops moves them by a few ulps (fp16's
# is ~1e-3 relative), which the float32 defaults read as a broken pass. Measured on torch
# fp16 exports (GPT-, BERT-like): every default pass lands within rtol 2e-3, atol 1e-3.
HALF_TOLERANCES = {ir.DataType.FLOAT16: (2e-3, 1e-3), ir.DataType.BFLOAT16: (1.6e-2, 8e-3)}


def default_tolerances(model: ir.Model, rtol: float | None, atol: float | None) -> tuple[float, float, str | None]:
    """(rtol, atol, why) with the ones not given filled in for the model's output dtype.

    ``why`` names the half-precision output that loosened a default, else None.
    """
    half = next((v for v in model.graph.outputs if v.dtype in HALF_TOLERANCES), None)
    if half is None or (rtol is not None and atol is not None):
        return (DEFAULT_RTOL if rtol is None else rtol), (DEFAULT_ATOL if atol is None else atol), None
    h_rtol, h_atol = HALF_TOLERANCES[half.dtype]
    return (h_rtol if rtol is None else rtol), (h_atol if atol is None else atol), \
        f"{half.dtype.name.lower()} output {half.name!r}"


def check_model(model: ir.Model) -> None:
    """The structural check: the ONNX checker passes (see :func:`check_loads` for ORT)."""
    names = [v.name for v in model.graph.outputs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # the checker lets this through; a runtime then cannot tell the outputs apart
        raise VerificationError(f"graph output {twice[0]!r} is listed twice")
    try:
        if tensor_bytes(model) <= EXTERNAL_DATA_THRESHOLD_BYTES and not _has_external(model):
            onnx.checker.check_model(ir.serde.serialize_model(model), full_check=False)
        else:
            # Large or external: the checker reads a file whose tensors point into a sparse
            # placeholder of the right size (it checks sizes, not values), so no data is
            # copied and no proto over 2 GB is built. (It refuses hard-linked data files.)
            with tempfile.TemporaryDirectory(prefix="onnxopt-check-") as tmp:
                path = os.path.join(tmp, "model.onnx")
                _save_skeleton(model, tmp, path)
                onnx.checker.check_model(path, full_check=False)
    except Exception as e:  # the checker raises ValidationError and, on odd graphs, others
        raise VerificationError(f"fails the ONNX checker: {_first_line(e)}") from None


def check_runs_on(model: ir.Model, feed: Mapping[str, np.ndarray], what: str) -> None:
    """Raise OnnxoptError if ORT cannot run the (original) ``model`` on ``feed``.

    Calibration data of the right names and ranks can still not fit a model (PP-OCR det at
    300x300: its FPN adds need multiples of 32). Found later, the failure surfaced as an
    internal error (prune) or as a wrong diagnosis ("the opset 13 upgrade changes this
    model's outputs", quantize).
    """
    try:
        sess = make_session(model)
    except Exception:
        return  # not loadable at all: the callers' own checks say so in their words
    try:
        sess.run(dict(feed))
    except Exception as e:
        shapes = ", ".join(f"{k} {'x'.join(map(str, np.shape(v)))}" for k, v in feed.items())
        raise OnnxoptError(f"the model does not run on {what} ({shapes}): {_first_line(e)}") from None
    finally:
        sess.close()


def check_loads(model: ir.Model, original: ir.Model) -> None:
    """Raise VerificationError if ONNX Runtime cannot build a session for ``model`` but can
    for ``original`` (a model ORT never loaded, with custom ops say, is not held against).

    With numeric checks off, the ONNX checker alone let a Conv weight turned float64 and a
    deleted graph output through: written, exit 0, unloadable.
    """
    try:
        make_session(model).close()
        return
    except Exception as e:
        reason = _first_line(e)
    try:
        make_session(original).close()
    except Exception:
        return
    raise VerificationError(f"ONNX Runtime cannot load it (it loads the original): {reason}")


@dataclasses.dataclass
class OutputDiff:
    name: str
    shape_ref: tuple[int, ...]
    shape_new: tuple[int, ...]
    max_abs: float
    max_rel: float
    cosine: float
    within: bool
    # Elements NaN in both outputs or the same infinity in both: they count as equal, so an
    # output that is mostly non-finite on the inputs used says little (callers warn).
    nonfinite: int = 0
    size: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def diff_arrays(name: str, ref: np.ndarray, new: np.ndarray, *, rtol: float, atol: float) -> OutputDiff:
    # inf - inf and overflowing products are handled below; numpy must not warn on stderr.
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        return _diff_arrays(name, ref, new, rtol=rtol, atol=atol)


def _diff_arrays(name: str, ref: np.ndarray, new: np.ndarray, *, rtol: float, atol: float) -> OutputDiff:
    ref = np.asarray(ref)
    new = np.asarray(new)
    if ref.shape != new.shape:
        return OutputDiff(name, ref.shape, new.shape, float("inf"), float("inf"), float("nan"), False)
    if ref.dtype.kind in "OSU" or new.dtype.kind in "OSU":
        # String tensors (StringNormalizer, ...): equal or not, there is no tolerance.
        same = ref.dtype.kind == new.dtype.kind or {ref.dtype.kind, new.dtype.kind} <= set("OSU")
        equal = bool(same and np.array_equal(ref.astype(object), new.astype(object)))
        return OutputDiff(name, ref.shape, new.shape, 0.0 if equal else float("inf"), 0.0 if equal else float("inf"),
                          1.0 if equal else 0.0, equal)
    a = ref.astype(np.float64)
    b = new.astype(np.float64)
    if a.size == 0:
        return OutputDiff(name, ref.shape, new.shape, 0.0, 0.0, 1.0, True)
    both_nan = np.isnan(a) & np.isnan(b)
    same_inf = np.isinf(a) & (a == b)
    ok_special = both_nan | same_inf
    diff = np.where(ok_special, 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), np.inf, diff)
    denom = np.abs(a)
    rel = np.where(ok_special, 0.0, diff / np.maximum(denom, 1e-12))
    within = bool(np.all(diff <= atol + rtol * np.where(ok_special, 0.0, denom)))
    fa = np.where(np.isfinite(a), a, 0.0).ravel()
    fb = np.where(np.isfinite(b), b, 0.0).ravel()
    na, nb = np.linalg.norm(fa), np.linalg.norm(fb)
    cosine = float(fa @ fb / (na * nb)) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
    return OutputDiff(name, ref.shape, new.shape, float(diff.max()), float(rel.max()), cosine, within,
                      nonfinite=int(ok_special.sum()), size=int(a.size))


def compare_outputs(
    ref: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray], *, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL
) -> list[OutputDiff]:
    """Element-wise comparison of two output sets (same names, in the reference's order)."""
    diffs = []
    for name, r in ref.items():
        if name not in new:
            diffs.append(OutputDiff(name, np.shape(r), (), float("inf"), float("inf"), float("nan"), False))
            continue
        diffs.append(diff_arrays(name, r, new[name], rtol=rtol, atol=atol))
    return diffs


# Quantize and prune run the model themselves and have no such option.
_SKIP_HINT = "only optimize can skip this check: --no-verify, or verify='off' in Python"


@dataclasses.dataclass
class Verifier:
    """Holds the reference outputs of the original model and judges candidates against them."""

    feeds: list[dict[str, np.ndarray]]
    reference: list[dict[str, np.ndarray]]
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL

    @classmethod
    def from_model(
        cls, model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], *, rtol: float = DEFAULT_RTOL,
        atol: float = DEFAULT_ATOL
    ) -> Verifier:
        # optimize, quantize and prune all come here; only optimize can skip the check.
        try:
            sess = make_session(model)
        except Exception as e:  # custom ops, future opsets, ...: nothing to compare against
            raise VerificationError(
                f"the original model does not load in ONNX Runtime, so results cannot be verified against it "
                f"({_SKIP_HINT}): {_first_line(e)}"
            ) from None
        try:
            reference = [sess.run(f) for f in feeds]
        except Exception as e:
            raise VerificationError(
                f"the original model does not run in ONNX Runtime on the sample inputs: {_first_line(e)} "
                "(generated sizes may not fit it, e.g. a KV cache's lengths: give them with --shape NAME:DIMS)"
            ) from None
        finally:
            sess.close()
        if reference and all(_is_empty(v) for ref in reference for v in ref.values()):
            # Comparing empty outputs proves nothing: a broken pass would pass the check.
            raise VerificationError(
                "every output is empty on the sample inputs, so results cannot be verified; "
                f"give non-zero sizes with --shape ({_SKIP_HINT})"
            )
        return cls([dict(f) for f in feeds], reference, rtol, atol)

    def nonfinite_outputs(self) -> list[tuple[str, int, int]]:
        """(output, NaN/inf values, values) over the sample feeds, for outputs with any.

        A candidate that reproduces a NaN passes the check there, so an output that is
        non-finite on the sample inputs is verified only where it is finite.
        """
        counts: dict[str, list[int]] = {}
        for name, v in self._reference_arrays("fc"):
            c = counts.setdefault(name, [0, 0])
            c[0] += int(np.count_nonzero(~np.isfinite(v)))
            c[1] += int(v.size)
        return [(name, bad, size) for name, (bad, size) in counts.items() if bad]

    def unseen_outputs(self) -> list[tuple[str, float]]:
        """(output, largest magnitude) for float outputs that stay within ``atol`` of zero
        on every sample input: any candidate passes there, even one that zeroes them.

        PP-OCRv4 det's probability map peaks at 3.7e-6 on generated noise (no text in it),
        under the default atol of 1e-5. Scaling atol down instead rolled back exact fusions:
        on noise the detector's outputs move by 5-26% (relative L2) under float reassociation.
        """
        peaks: dict[str, float] = {}
        for name, v in self._reference_arrays("f"):
            if v.size:
                finite = np.abs(v[np.isfinite(v)])
                peaks[name] = max(peaks.get(name, 0.0), float(finite.max()) if finite.size else 0.0)
        return [(name, peak) for name, peak in peaks.items() if 0.0 < peak <= self.atol]

    def _reference_arrays(self, kinds: str):
        """(output, array) of every reference output whose dtype kind is in ``kinds``, feed by feed."""
        for ref in self.reference:
            for name, v in ref.items():
                v = np.asarray(v)
                if v.dtype.kind in kinds:
                    yield name, v

    def verify(self, model: ir.Model) -> None:
        """Raise VerificationError with a one-line reason if the model is not equivalent."""
        check_model(model)
        try:
            sess = make_session(model)
        except Exception as e:
            raise VerificationError(f"ONNX Runtime cannot load it: {_first_line(e)}") from None
        try:
            for feeds, ref in zip(self.feeds, self.reference):
                try:
                    out = sess.run(feeds)
                except Exception as e:
                    raise VerificationError(f"ONNX Runtime fails to run it: {_first_line(e)}") from None
                if list(out) != list(ref):
                    lost = [n for n in ref if n not in out]
                    raise VerificationError(
                        f"the outputs changed: {', '.join(map(repr, lost))} missing" if lost
                        else f"the outputs changed: {list(ref)} became {list(out)}"
                    )
                for d in compare_outputs(ref, out, rtol=self.rtol, atol=self.atol):
                    if not d.within:
                        if d.shape_ref != d.shape_new:
                            raise VerificationError(
                                f"output {d.name!r} changed shape from {d.shape_ref} to {d.shape_new}"
                            )
                        raise VerificationError(
                            f"output {d.name!r} drifted: max abs error {d.max_abs:.3g}, max rel {d.max_rel:.3g} "
                            f"(rtol {self.rtol:g}, atol {self.atol:g})"
                        )
        finally:
            sess.close()


# ORT prefixes messages with the C++ source location and signature; users need the rest.
_ORT_SOURCE_LOCATION = re.compile(r"/onnxruntime_src/\S+:\d+ (?:[^()]*\((?:[^()]|\([^()]*\))*\) )?")


def _first_line(e: BaseException) -> str:
    text = _ORT_SOURCE_LOCATION.sub("", str(e)).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
