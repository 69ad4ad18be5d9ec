"""Conformance: the ONNX project's own backend test models through ``optimize``.

The ``onnx`` wheel ships model tests with their inputs and expected outputs
(``onnx/backend/test/data/{pytorch-converted,pytorch-operator,simple,light}``; ``real``
only holds download links to the ``light`` models). Each test case here is run as the
ONNX backend test runner runs it, with one step added:

1. the original model runs in ONNX Runtime on the shipped inputs (a model ORT cannot
   run is recorded as *unchanged* with ORT's error: there is nothing to compare with);
2. :func:`onnxopt.optimize` rewrites it, with the shipped inputs as the safety net's
   verification inputs;
3. an independent check that does not trust the optimizer's own verification: the
   result is saved with :func:`save_model`, re-read from disk, checked by the ONNX
   checker, loaded into a *fresh* ORT session from the file, run on the shipped inputs,
   and compared with the *expected outputs shipped with the test*, using the test's own
   tolerance (``np.testing.assert_allclose`` semantics, ``|new - expected| <= atol +
   rtol * |expected|``, default rtol 1e-3, atol 1e-7 as in onnx's runner). Where ORT
   itself does not reproduce the shipped outputs on the original model, the optimized
   model must reproduce ORT's outputs on the original instead (we cannot be more right
   than the runtime), and the case notes it.
   Where ORT cannot run the original at all (kernels for opsets < 7 are gone), onnx's
   reference evaluator takes its place when it reproduces the shipped outputs: the model
   is optimized without the safety net and checked with the evaluator.
   The graph signature must be unchanged too: input and output names, element types
   and input shapes (dynamic dimensions stay dynamic).

Inputs of ``light`` models are generated exactly as onnx's runner does
(``arange(n) / n``, dynamic dims 1) and compared with ``light_*_output_0.pb``.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import pathlib
import tempfile
import time
import traceback
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

DEFAULT_KINDS = ("pytorch-converted", "pytorch-operator", "simple", "light")
DEFAULT_RTOL = 1e-3
DEFAULT_ATOL = 1e-7


def data_dir() -> pathlib.Path:
    return pathlib.Path(onnx.__file__).parent / "backend" / "test" / "data"


@dataclasses.dataclass
class Case:
    name: str
    kind: str
    model_path: pathlib.Path
    # Each data set: (inputs in graph-input order, expected outputs in graph-output order).
    datasets: list[tuple[list, list]]
    rtol: float = DEFAULT_RTOL
    atol: float = DEFAULT_ATOL

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclasses.dataclass
class CaseResult:
    case: str
    status: str  # "optimized" | "unchanged" | "failed"
    reason: str = ""
    nodes_before: int | None = None
    nodes_after: int | None = None
    rolled_back: dict[str, str] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""
    quantize: str = ""  # "" (not run) | "ok" | "refused: ..." | "failed: ..."

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _read_value(path: str, type_proto: onnx.TypeProto):
    with open(path, "rb") as f:
        data = f.read()
    which = type_proto.WhichOneof("value")
    if which == "sequence_type":
        seq = onnx.SequenceProto()
        seq.ParseFromString(data)
        return numpy_helper.to_list(seq)
    if which == "optional_type":
        opt = onnx.OptionalProto()
        opt.ParseFromString(data)
        return numpy_helper.to_optional(opt)
    tensor = onnx.TensorProto()
    tensor.ParseFromString(data)
    return numpy_helper.to_array(tensor)


def _feed_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _light_dummy(vi: onnx.ValueInfoProto) -> np.ndarray:
    # onnx.backend.test.runner.Runner.generate_dummy_data(random=False)
    shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim)
    n = int(np.prod(shape))
    return (np.arange(n).reshape(shape) / n).astype(np.float32)


def discover_cases(kinds: Sequence[str] = DEFAULT_KINDS, root: pathlib.Path | None = None) -> list[Case]:
    """Every model test of the given kinds in the installed onnx wheel, with its data."""
    root = root or data_dir()
    cases: list[Case] = []
    for kind in kinds:
        kind_dir = root / kind
        if not kind_dir.is_dir():
            continue
        if kind == "light":
            for model_path in sorted(kind_dir.glob("light_*.onnx")):
                model = onnx.load(str(model_path), load_external_data=False)
                inputs = [_light_dummy(vi) for vi in _feed_inputs(model)]
                outputs = []
                for i, vo in enumerate(model.graph.output):
                    p = model_path.with_name(f"{model_path.stem}_output_{i}.pb")
                    if not p.exists():
                        outputs = None
                        break
                    outputs.append(_read_value(str(p), vo.type))
                if outputs is None:
                    continue
                tol = _light_tolerance(root, model_path.stem[len("light_") :])
                cases.append(Case(model_path.stem, kind, model_path, [(inputs, outputs)], *tol))
            continue
        for case_dir in sorted(p for p in kind_dir.iterdir() if p.is_dir()):
            model_path = case_dir / "model.onnx"
            if not model_path.exists():
                continue
            rtol, atol = DEFAULT_RTOL, DEFAULT_ATOL
            if (case_dir / "data.json").exists():
                data = json.loads((case_dir / "data.json").read_text())
                rtol, atol = data.get("rtol", rtol), data.get("atol", atol)
            model = onnx.load(str(model_path), load_external_data=False)
            feed_vis = _feed_inputs(model)
            datasets = []
            for ds in sorted(glob.glob(str(case_dir / "test_data_set_*"))):
                n_in = len(glob.glob(os.path.join(ds, "input_*.pb")))
                n_out = len(glob.glob(os.path.join(ds, "output_*.pb")))
                inputs = [_read_value(os.path.join(ds, f"input_{i}.pb"), feed_vis[i].type) for i in range(n_in)]
                outputs = [
                    _read_value(os.path.join(ds, f"output_{i}.pb"), model.graph.output[i].type) for i in range(n_out)
                ]
                datasets.append((inputs, outputs))
            if datasets:
                cases.append(Case(case_dir.name, kind, model_path, datasets, rtol, atol))
    return cases


def _light_tolerance(root: pathlib.Path, model_name: str) -> tuple[float, float]:
    meta = root / "real" / f"test_{model_name}" / "data.json"
    if meta.exists():
        data = json.loads(meta.read_text())
        return data.get("rtol", DEFAULT_RTOL), data.get("atol", DEFAULT_ATOL)
    return DEFAULT_RTOL, DEFAULT_ATOL


def _close(expected, actual, rtol: float, atol: float) -> str:
    """'' when ``actual`` matches ``expected`` like onnx's runner demands, else why not."""
    if isinstance(expected, (list, tuple)):
        if not isinstance(actual, (list, tuple)) or len(actual) != len(expected):
            return f"sequence of {len(expected)} expected, got {type(actual).__name__}"
        for e, a in zip(expected, actual):
            why = _close(e, a, rtol, atol)
            if why:
                return why
        return ""
    if expected is None:
        return "" if actual is None else "expected an empty optional"
    expected = np.asarray(expected)
    actual = np.asarray(actual)
    if expected.shape != actual.shape:
        return f"shape {actual.shape}, expected {expected.shape}"
    if expected.dtype == object or actual.dtype == object:
        return "" if np.array_equal(expected, actual) else "strings differ"
    if expected.dtype != actual.dtype:
        return f"dtype {actual.dtype}, expected {expected.dtype}"
    try:
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)
    except AssertionError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "Max absolute" in ln or "Mismatched" in ln]
        return "; ".join(lines) or "values differ"
    return ""


def _outputs_close(expected: list, actual: list, rtol: float, atol: float) -> str:
    if len(expected) != len(actual):
        return f"{len(actual)} outputs, expected {len(expected)}"
    for i, (e, a) in enumerate(zip(expected, actual)):
        why = _close(e, a, rtol, atol)
        if why:
            return f"output {i}: {why}"
    return ""


def _ort_run(model_path_or_bytes, feeds: dict):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # ORT's load errors are reported in the result, not logged
    sess = ort.InferenceSession(model_path_or_bytes, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return sess.run(names, feeds)


def _signature(model: onnx.ModelProto) -> tuple:
    def dims(vi):
        t = vi.type
        if t.WhichOneof("value") != "tensor_type" or not t.tensor_type.HasField("shape"):
            return None
        return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.tensor_type.shape.dim)

    def elem(vi):
        return vi.type.SerializeToString() if vi.type.WhichOneof("value") != "tensor_type" else vi.type.tensor_type.elem_type

    ins = tuple((vi.name, elem(vi), dims(vi)) for vi in _feed_inputs(model))
    outs = tuple((vo.name, elem(vo)) for vo in model.graph.output)
    return ins, outs


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:240]}" if text else type(e).__name__


def _reference_run(path: str, feeds: dict) -> list:
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(path).run(None, feeds)


def _reference_check(case: Case, feeds_list: list[dict], res: CaseResult) -> None:
    """Where ORT cannot run a model, onnx's reference evaluator may: optimize without the
    safety net (it needs ORT) and check the result with the reference implementation.

    Only when the reference evaluator reproduces the shipped outputs on the original;
    otherwise the case stays "unchanged". A mismatch after optimizing is a pass bug.
    """
    from onnxopt.model_io import load_model, save_model
    from onnxopt.optimize import optimize

    try:
        for feeds, (_, expected) in zip(feeds_list, case.datasets):
            if _outputs_close(expected, _reference_run(str(case.model_path), feeds), case.rtol, case.atol):
                return
        result = optimize(load_model(case.model_path), verify="off")
    except Exception:
        return  # stays "unchanged" with ORT's reason
    with tempfile.TemporaryDirectory(prefix="onnxopt-conf-ref-") as tmp:
        out = pathlib.Path(tmp) / "optimized.onnx"
        res.nodes_before, res.nodes_after = result.nodes_before, result.nodes_after
        try:
            save_model(result.model, out)
            onnx.checker.check_model(onnx.load(str(out)))
            for feeds, (_, expected) in zip(feeds_list, case.datasets):
                why = _outputs_close(expected, _reference_run(str(out), feeds), case.rtol, case.atol)
                if why:
                    res.status, res.reason = "failed", f"(onnx reference evaluator) optimized outputs do not match: {why}"
                    return
        except Exception as e:
            res.status, res.reason = "failed", f"(onnx reference evaluator) optimized model fails: {_first_line(e)}"
            return
    res.status = "optimized"
    res.note = f"checked with onnx's reference evaluator ({res.reason})"
    res.reason = ""


def run_case(case: Case, *, workdir: str | os.PathLike | None = None, quantize: bool = False,
             reference_fallback: bool = True) -> CaseResult:
    """Optimize one test model and check the result independently (see the module doc)."""
    from onnxopt.errors import OnnxoptError
    from onnxopt.model_io import load_model, save_model
    from onnxopt.optimize import optimize

    start = time.perf_counter()
    res = CaseResult(case.id, "failed")
    original = onnx.load(str(case.model_path), load_external_data=False)
    feed_vis = _feed_inputs(original)
    feeds_list = [{vi.name: x for vi, x in zip(feed_vis, inputs)} for inputs, _ in case.datasets]

    # 1. ORT on the original: the runtime must be able to run it for the test to mean anything.
    ort_ref = []
    try:
        for feeds in feeds_list:
            ort_ref.append(_ort_run(str(case.model_path), feeds))
    except Exception as e:
        res.status, res.reason = "unchanged", f"ORT cannot run the original: {_first_line(e)}"
        if reference_fallback:
            _reference_check(case, feeds_list, res)
        res.seconds = time.perf_counter() - start
        return res
    references = []
    for (_, expected), got in zip(case.datasets, ort_ref):
        if _outputs_close(expected, got, case.rtol, case.atol):
            res.note = "ORT differs from the shipped outputs on the original; compared with ORT's outputs"
            references.append(got)
        else:
            references.append(expected)

    # 2. optimize, with the shipped inputs as the safety net's inputs.
    try:
        model = load_model(case.model_path)
    except OnnxoptError as e:
        res.status, res.reason = "unchanged", f"onnxopt refuses to load it: {e}"
        res.seconds = time.perf_counter() - start
        return res
    try:
        result = optimize(model, inputs=feeds_list)
    except OnnxoptError as e:
        res.reason = f"optimize raised OnnxoptError on a model ORT runs: {e}"
        res.seconds = time.perf_counter() - start
        return res
    except Exception as e:
        res.reason = f"optimize crashed: {_first_line(e)} at {_where(e)}"
        res.seconds = time.perf_counter() - start
        return res
    res.nodes_before, res.nodes_after = result.nodes_before, result.nodes_after
    res.rolled_back = dict(result.rolled_back)

    # 3. the independent check, from the saved file.
    with tempfile.TemporaryDirectory(prefix="onnxopt-conf-", dir=workdir) as tmp:
        out = pathlib.Path(tmp) / "optimized.onnx"
        try:
            save_model(result.model, out)
            saved = onnx.load(str(out))
            onnx.checker.check_model(saved)
        except Exception as e:
            res.reason = f"the optimized model does not save/load/check: {_first_line(e)}"
            res.seconds = time.perf_counter() - start
            return res
        if _signature(saved) != _signature(original):
            res.reason = f"signature changed: {_signature(original)} -> {_signature(saved)}"
            res.seconds = time.perf_counter() - start
            return res
        for feeds, ref in zip(feeds_list, references):
            try:
                got = _ort_run(str(out), feeds)
            except Exception as e:
                res.reason = f"ORT cannot run the optimized model: {_first_line(e)}"
                res.seconds = time.perf_counter() - start
                return res
            why = _outputs_close(ref, got, case.rtol, case.atol)
            if why:
                res.reason = f"optimized model's outputs do not match: {why}"
                res.seconds = time.perf_counter() - start
                return res
        res.status = "optimized"
        if quantize:
            res.quantize = _quantize_check(case, out, feeds_list, tmp)
    res.seconds = time.perf_counter() - start
    return res


def _quantize_check(case: Case, optimized_path: pathlib.Path, feeds_list, tmp: str) -> str:
    """Random-calibration quantize of the test model: a valid, loadable model or a clear refusal."""
    try:
        from onnxopt.quantization import quantize_file
    except ImportError:
        return "skipped: onnxopt.quantization is not available"
    from onnxopt.errors import OnnxoptError

    out = pathlib.Path(tmp) / "quantized.onnx"
    # The shipped inputs fix the dynamic dimensions for the random calibration feeds.
    shapes = {k: tuple(np.shape(v)) for k, v in feeds_list[0].items() if isinstance(v, np.ndarray)}
    try:
        quantize_file(str(case.model_path), str(out), calib="random", shapes=shapes or None, progress=False)
    except OnnxoptError as e:
        return f"refused: {e}"
    except Exception as e:
        return f"failed: quantize crashed: {_first_line(e)} at {_where(e)}"
    try:
        onnx.checker.check_model(onnx.load(str(out)))
        _ort_run(str(out), feeds_list[0])
    except Exception as e:
        return f"failed: quantized model does not check/load/run: {_first_line(e)}"
    return "ok"


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    return f"{os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else "?"
