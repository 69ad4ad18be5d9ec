"""Sample inputs for verification, comparison and benchmarks.

Inputs come from the user (an ``.npz`` file) or are generated from the model's input
signature. Generation picks values a real model would see, because random garbage can
hide or fake differences: token ids stay below the vocabulary size (read from the
Gather that embeds them), masks are ones, type ids zeros, floats are standard normal.
Dynamic dimensions take ``--shape NAME:1x3x640x640`` values, else a default that is
shared by every input using the same symbolic dimension (``batch``, ``sequence``).
"""

from __future__ import annotations

import os
import pathlib
import zipfile
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.errors import OnnxoptError
from onnxopt.graph import ANONYMOUS_DIM_NAMES

DEFAULT_BATCH = 1
DEFAULT_DIM = 64


def parse_shape_specs(specs: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse ``NAME:1x3x640x640`` (or ``NAME:1,3,640,640``) into ``{name: shape}``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or ():
        name, sep, dims = spec.rpartition(":")
        if not sep or not name:
            raise OnnxoptError(f"--shape {spec!r}: expected NAME:DIMS, for example x:1x3x640x640")
        try:
            shape = tuple(int(d) for d in dims.replace(",", "x").split("x") if d != "")
        except ValueError:
            raise OnnxoptError(f"--shape {spec!r}: dimensions must be integers, for example 1x3x640x640") from None
        if any(d < 0 for d in shape):
            raise OnnxoptError(f"--shape {spec!r}: dimensions must not be negative")
        if name in shapes and shapes[name] != shape:
            raise OnnxoptError(f"--shape {name}: given twice ({'x'.join(map(str, shapes[name]))} and {dims}); give it once")
        shapes[name] = shape
    return shapes


def model_inputs(model: ir.Model) -> list[ir.Value]:
    """The graph inputs a caller must feed (initializers listed as inputs are skipped)."""
    return [v for v in model.graph.inputs if not v.is_initializer()]


def check_input_names(model: ir.Model, names: Sequence[str], what: str = "--shape") -> None:
    known = [v.name for v in model_inputs(model)]
    for name in names:
        if name not in known:
            raise OnnxoptError(f"{what}: the model has no input {name!r} (inputs: {', '.join(known) or 'none'})")


def _vocab_size(value: ir.Value) -> int | None:
    """Rows of the table this integer input indexes with Gather, if any."""
    for node, index in value.uses():
        if node.op_type == "Gather" and index == 1 and node.domain in ("", "ai.onnx"):
            data = node.inputs[0]
            if data is not None and data.shape is not None:
                axis = node.attributes.get_int("axis", 0)
                dim = data.shape[axis]
                if isinstance(dim, int) and dim > 0:
                    return dim
    return None


def _resolve_shape(value: ir.Value, given: Mapping[str, tuple[int, ...]], symbols: dict[str, int],
                   owners: dict[str, str] | None = None) -> tuple[int, ...]:
    if value.name in given:
        shape = given[value.name]
        declared = value.shape
        if declared is not None and len(declared) != len(shape):
            raise OnnxoptError(
                f"--shape {value.name}: the model declares rank {len(declared)} ({declared}), got {len(shape)} dims"
            )
        if declared is not None:
            for i, (want, got) in enumerate(zip(declared, shape)):
                if isinstance(want, int) and want >= 0 and want != got:
                    raise OnnxoptError(
                        f"--shape {value.name}: dimension {i} is fixed to {want} in the model, got {got}"
                    )
                if isinstance(want, ir.SymbolicDim) and want.value is not None:
                    owner = owners.get(want.value) if owners is not None else None
                    # "?" and the like name no dimension; within one input a repeat is the user's call.
                    if owner not in (None, value.name) and want.value not in ANONYMOUS_DIM_NAMES \
                            and symbols[want.value] != got:
                        # ORT would fail later with a cryptic broadcast error.
                        raise OnnxoptError(
                            f"--shape {value.name}: dimension {i} ({want.value!r}) is {got}, but {owner} gives "
                            f"{want.value!r} as {symbols[want.value]}; inputs sharing a named dimension must agree"
                        )
                    symbols.setdefault(want.value, got)
                    if owners is not None:
                        owners.setdefault(want.value, value.name)
        return shape
    if value.shape is None:
        raise OnnxoptError(f"input {value.name!r} has no declared shape; give it with --shape {value.name}:DIMS")
    dims = []
    for i, dim in enumerate(value.shape):
        if isinstance(dim, int) and dim >= 0:
            dims.append(dim)
            continue
        sym = dim.value if isinstance(dim, ir.SymbolicDim) else None  # -1 (Paddle) is anonymous
        if sym is not None and sym in symbols:
            dims.append(symbols[sym])
            continue
        size = DEFAULT_BATCH if i == 0 else DEFAULT_DIM
        if sym is not None:
            symbols[sym] = size
        dims.append(size)
    return tuple(dims)


_NUMPY_DTYPES = {
    ir.DataType.FLOAT: np.float32,
    ir.DataType.DOUBLE: np.float64,
    ir.DataType.FLOAT16: np.float16,
    ir.DataType.INT64: np.int64,
    ir.DataType.INT32: np.int32,
    ir.DataType.INT16: np.int16,
    ir.DataType.INT8: np.int8,
    ir.DataType.UINT8: np.uint8,
    ir.DataType.UINT16: np.uint16,
    ir.DataType.UINT32: np.uint32,
    ir.DataType.UINT64: np.uint64,
    ir.DataType.BOOL: np.bool_,
}


def numpy_dtype(dtype: ir.DataType | None) -> np.dtype:
    if dtype is None or dtype not in _NUMPY_DTYPES:
        raise OnnxoptError(f"cannot generate inputs of type {dtype}; pass them with --inputs FILE.npz")
    return np.dtype(_NUMPY_DTYPES[dtype])


def make_sample_inputs(
    model: ir.Model,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    *,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Generate one feed for every model input from its signature."""
    given = dict(shapes or {})
    check_input_names(model, list(given))
    rng = np.random.default_rng(seed)
    symbols: dict[str, int] = {}
    # Resolve user-given shapes first so their symbolic dims propagate to other inputs.
    ordered = sorted(model_inputs(model), key=lambda v: v.name not in given)
    feeds: dict[str, np.ndarray] = {}
    owners: dict[str, str] = {}  # named dimension -> the --shape input that fixed it
    for value in ordered:
        shape = _resolve_shape(value, given, symbols, owners)
        if any(d > 1 << 20 for d in shape) or int(np.prod(shape, dtype=np.float64)) > 1 << 30:
            raise OnnxoptError(f"input {value.name!r}: shape {shape} is too large to generate")
        dtype = numpy_dtype(value.dtype)
        lname = value.name.lower()
        if dtype == np.bool_:
            arr = np.ones(shape, dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            if "mask" in lname:
                arr = np.ones(shape, dtype=dtype)
            elif "type" in lname or "segment" in lname:
                arr = np.zeros(shape, dtype=dtype)
            else:
                high = _vocab_size(value) or 16
                arr = rng.integers(0, high, size=shape).astype(dtype)
        else:
            arr = rng.standard_normal(shape).astype(dtype)
        feeds[value.name] = arr
    return {v.name: feeds[v.name] for v in model_inputs(model)}


def load_npz_inputs(path: str | os.PathLike, model: ir.Model | None = None) -> dict[str, np.ndarray]:
    """Read a feed from an ``.npz`` file (keys are input names), checked against the model."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise OnnxoptError(f"{p}: no such inputs file")
    # np.load takes anything else (text, a lone .npy) for a pickle or one array and
    # fails with a misleading "contains pickled (object) data" or a TypeError.
    if not zipfile.is_zipfile(p):
        raise OnnxoptError(f"{p}: not a readable .npz file (not the zip archive of arrays numpy.savez writes, "
                           "one per model input)")
    try:
        with np.load(p, allow_pickle=False) as data:
            feeds = {k: data[k] for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise OnnxoptError(f"{p}: not a readable .npz file ({e})") from None
    if model is not None:
        validate_feeds(model, feeds, source=str(p))
    return feeds


def validate_feeds(model: ir.Model, feeds: Mapping[str, np.ndarray], *, source: str = "inputs") -> None:
    """Names, ranks, fixed dimensions and dtypes must match the model's inputs."""
    expected = {v.name: v for v in model_inputs(model)}
    unknown = sorted(set(feeds) - set(expected))
    if unknown:
        raise OnnxoptError(
            f"{source}: unknown input name {unknown[0]!r} (model inputs: {', '.join(expected) or 'none'})"
        )
    missing = [n for n in expected if n not in feeds]
    if missing:
        raise OnnxoptError(f"{source}: missing input {missing[0]!r}")
    for name, value in expected.items():
        arr = np.asarray(feeds[name])
        if value.dtype is not None and value.dtype in _NUMPY_DTYPES:
            want = numpy_dtype(value.dtype)
            if arr.dtype != want:
                raise OnnxoptError(f"{source}: input {name!r} has dtype {arr.dtype}, the model expects {want}")
        if value.shape is not None:
            if arr.ndim != len(value.shape):
                raise OnnxoptError(
                    f"{source}: input {name!r} has shape {arr.shape}, the model expects rank {len(value.shape)} "
                    f"({_shape_str(value.shape)})"
                )
            for dim, got in zip(value.shape, arr.shape):
                if isinstance(dim, int) and dim >= 0 and dim != got:
                    raise OnnxoptError(
                        f"{source}: input {name!r} has shape {arr.shape}, the model expects {_shape_str(value.shape)}"
                    )


def _shape_str(shape: ir.Shape) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else (d.value or "?") for d in shape) + "]"
