"""Calibration data: every way a user can hand us samples, streamed and validated.

:func:`load_calibration_data` turns a source into a :class:`CalibrationData`, a
re-iterable sequence of feed dicts (``{input name: array}``, one batch each). Sources:

- a folder of ``.npz`` files, one sample per file (keys = input names), in name order;
- one ``.npz`` whose arrays carry a leading sample axis: an array of the input's rank is
  split along axis 0 into batch-1 feeds, an array of rank+1 is indexed along its extra
  leading axis. The arrays are read from the zip member sample by sample, never whole;
- a folder of images (PNG, JPEG, BMP, TIFF, WebP; read with Pillow) or one image file,
  preprocessed by an :class:`ImageSpec`;
- any Python iterable of feed dicts (a list is re-iterated; a one-shot iterator or
  generator is cached to a temporary folder on disk as it streams);
- an ONNX Runtime ``CalibrationDataReader`` or anything with ``get_next()`` (called until
  it returns None). With ``rewind()`` it is rewound for each pass; without, it is cached to
  disk like a generator, so memory never grows with the number of samples;
- the string ``"random"``: generated from the model's signature, labelled as a smoke test.

Every sample is validated against the model's inputs as it streams (names, dtypes, ranks,
fixed dimensions; :func:`onnxopt.inputs.validate_feeds`), and the first one already when
the data is loaded, so a wrong file fails in a second, not after the first calibration pass.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import pathlib
import re
import shutil
import tempfile
import weakref
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.errors import OnnxoptError
from onnxopt.inputs import make_sample_inputs, model_inputs, numpy_dtype, validate_feeds

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_RANDOM_SAMPLES = 8

Feed = dict[str, np.ndarray]


# ---------------------------------------------------------------------------------------
# image preprocessing
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """How to turn an image file into a model input.

    ``x = (pixel * scale - mean) / std`` per channel, where ``pixel`` is the 0..255 value,
    so ``mean`` and ``std`` are in the scaled units: with the default ``scale=1/255`` they
    are in 0..1 (ImageNet: mean 0.485/0.456/0.406, std 0.229/0.224/0.225); with
    ``scale=1`` they are in 0..255 (mean 123.675/116.28/103.53). One value applies to every
    channel. Images are resized (bilinear, aspect ratio not kept) to ``size`` = (h, w);
    ``None`` takes the model input's fixed height/width. ``channel_order`` is the order of
    the colour channels the model expects (``"BGR"`` for models trained on OpenCV-loaded
    images such as PaddleOCR's). A model input with one channel gets greyscale. A model
    input of integer type gets the raw resized pixels (no scale/mean/std).
    ``input_name``: the image input (default: the model's single input).
    """

    size: tuple[int, int] | None = None
    layout: str = "NCHW"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    channel_order: str = "RGB"
    scale: float = 1.0 / 255.0
    input_name: str | None = None

    def __post_init__(self) -> None:
        layout = self.layout.upper()
        order = self.channel_order.upper()
        if layout not in ("NCHW", "NHWC"):
            raise OnnxoptError(f"image layout must be NCHW or NHWC, got {self.layout!r}")
        if order not in ("RGB", "BGR"):
            raise OnnxoptError(f"image channel order must be RGB or BGR, got {self.channel_order!r}")
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "channel_order", order)
        mean = _as_floats(self.mean, "mean")
        std = _as_floats(self.std, "std")
        if any(s == 0 for s in std):
            raise OnnxoptError("image std must not be 0")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        if self.size is not None:
            size = tuple(int(d) for d in self.size)
            if len(size) != 2 or min(size) <= 0:
                raise OnnxoptError(f"image size must be (height, width) > 0, got {self.size!r}")
            object.__setattr__(self, "size", size)
        if not self.scale > 0:
            raise OnnxoptError(f"image scale must be positive, got {self.scale}")

    @classmethod
    def parse(cls, text: str) -> ImageSpec:
        """Parse the CLI form: comma-separated ``HxW`` (or ``N`` for square), ``mean=``,
        ``std=`` (one value or ``a/b/c``), ``scale=`` (``1/255``, ``1``, a number),
        ``rgb``/``bgr``, ``nchw``/``nhwc``, ``input=NAME``.
        Example: ``"640x640,mean=0.5,std=0.5,bgr,nchw"``."""
        kw: dict[str, Any] = {}
        for raw in text.split(","):
            tok = raw.strip()
            if not tok:
                continue
            low = tok.lower()
            if low in ("rgb", "bgr"):
                kw["channel_order"] = low.upper()
            elif low in ("nchw", "nhwc"):
                kw["layout"] = low.upper()
            elif re.fullmatch(r"\d+(x\d+)?", low):
                h, _, w = low.partition("x")
                kw["size"] = (int(h), int(w or h))
            elif "=" in tok:
                key, _, val = tok.partition("=")
                key = key.strip().lower()
                if key in ("mean", "std"):
                    kw[key] = tuple(_number(v, key) for v in re.split(r"[/:;]", val) if v.strip())
                elif key == "scale":
                    kw["scale"] = _number(val, "scale")
                elif key in ("input", "input_name"):
                    kw["input_name"] = val.strip()
                elif key == "size":
                    return cls.parse(text.replace(tok, val))
                else:
                    raise OnnxoptError(f"image spec {text!r}: unknown key {key!r} (mean, std, scale, input)")
            else:
                raise OnnxoptError(
                    f"image spec {text!r}: cannot read {tok!r} (expected HxW, mean=, std=, scale=, rgb|bgr, "
                    "nchw|nhwc, input=NAME)"
                )
        return cls(**kw)

    def describe(self) -> str:
        size = "model size" if self.size is None else f"{self.size[0]}x{self.size[1]}"
        fmt = lambda v: "/".join(f"{x:g}" for x in v)  # noqa: E731
        return f"{size}, {self.layout}, {self.channel_order}, scale {self.scale:g}, mean {fmt(self.mean)}, std {fmt(self.std)}"


def _number(text: str, what: str) -> float:
    text = text.strip()
    try:
        if "/" in text and what == "scale":
            a, b = text.split("/", 1)
            return float(a) / float(b)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise OnnxoptError(f"image spec: {what}={text!r} is not a number") from None


def _as_floats(values: Any, what: str) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        values = (values,)
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise OnnxoptError(f"image {what} must be numbers, got {values!r}") from None
    if len(out) not in (1, 3):
        raise OnnxoptError(f"image {what} needs 1 or 3 values, got {len(out)}")
    return out


def _import_pil():
    try:
        from PIL import Image
    except ImportError:
        raise OnnxoptError("reading images needs Pillow: pip install pillow") from None
    return Image


class _ImagePreprocessor:
    """Resolved against the model input: target size, channels, dtype."""

    def __init__(self, model: ir.Model, spec: ImageSpec):
        inputs = model_inputs(model)
        names = [v.name for v in inputs]
        if spec.input_name is not None:
            value = next((v for v in inputs if v.name == spec.input_name), None)
            if value is None:
                raise OnnxoptError(f"image spec: the model has no input {spec.input_name!r} (inputs: {', '.join(names)})")
        elif len(inputs) == 1:
            value = inputs[0]
        else:
            raise OnnxoptError(
                f"the model has {len(inputs)} inputs ({', '.join(names)}); say which one takes the images with input=NAME"
            )
        others = [n for n in names if n != value.name]
        if others:
            raise OnnxoptError(
                f"an image folder feeds only input {value.name!r}; the model also needs {', '.join(map(repr, others))} "
                "(use .npz files or a Python data source)"
            )
        shape = value.shape
        if shape is not None and len(shape) != 4:
            raise OnnxoptError(f"input {value.name!r} has rank {len(shape)}; images need a rank-4 input ({spec.layout})")
        self.name = value.name
        self.dtype = numpy_dtype(value.dtype)
        dims = list(shape) if shape is not None else [None] * 4
        c_dim, h_dim, w_dim = (dims[1], dims[2], dims[3]) if spec.layout == "NCHW" else (dims[3], dims[1], dims[2])
        fixed = lambda d: d if isinstance(d, int) and d > 0 else None  # noqa: E731
        self.channels = fixed(c_dim) or 3
        if self.channels not in (1, 3):
            raise OnnxoptError(
                f"input {value.name!r} has {self.channels} channels in layout {spec.layout}; images give 1 or 3 "
                "(wrong layout?)"
            )
        if spec.size is not None:
            h, w = spec.size
            for want, got, what in ((fixed(h_dim), h, "height"), (fixed(w_dim), w, "width")):
                if want is not None and want != got:
                    raise OnnxoptError(
                        f"image spec size {h}x{w}: input {value.name!r} {_shape_text(shape)} has a fixed {what} "
                        f"of {want} in layout {spec.layout} (wrong size or wrong layout?)"
                    )
            self.size = (h, w)
        else:
            if fixed(h_dim) is None or fixed(w_dim) is None:
                raise OnnxoptError(
                    f"input {value.name!r} has dynamic height/width; give the image size, e.g. 640x640"
                )
            self.size = (fixed(h_dim), fixed(w_dim))
        nmean, nstd = len(spec.mean), len(spec.std)
        if self.channels == 1 and (nmean == 3 or nstd == 3):
            raise OnnxoptError(f"input {value.name!r} has 1 channel; give one mean/std value, not three")
        self.spec = spec
        self._scale = np.float32(spec.scale)
        self._mean = np.asarray(spec.mean, dtype=np.float32)
        self._inv_std = (1.0 / np.asarray(spec.std, dtype=np.float64)).astype(np.float32)

    def __call__(self, path: pathlib.Path) -> Feed:
        Image = _import_pil()
        try:
            with Image.open(path) as img:
                img.load()
                img = img.convert("L" if self.channels == 1 else "RGB")
                h, w = self.size
                if img.size != (w, h):
                    img = img.resize((w, h), Image.BILINEAR)
                pixels = np.asarray(img)
        except Image.DecompressionBombError as e:
            raise OnnxoptError(f"{path}: image too large to decode ({e})") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise OnnxoptError(f"{path}: cannot decode image ({_first_line(e)})") from None
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        if self.channels == 3 and self.spec.channel_order == "BGR":
            pixels = pixels[:, :, ::-1]
        if np.issubdtype(self.dtype, np.integer):
            x = pixels.astype(self.dtype)
        else:
            x = pixels.astype(np.float32)
            x *= self._scale
            x -= self._mean
            x *= self._inv_std
            x = x.astype(self.dtype, copy=False)
        if self.spec.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return {self.name: np.ascontiguousarray(x[None])}


# ---------------------------------------------------------------------------------------
# sources: each yields (label, feed); label names the sample in error messages
# ---------------------------------------------------------------------------------------


class _Source:
    description = ""
    is_random = False

    def open(self) -> Iterator[tuple[str, Any]]:
        raise NotImplementedError

    def length(self) -> int | None:
        return None

    def close(self) -> None:
        pass


class _NpzFolder(_Source):
    def __init__(self, files: list[pathlib.Path], folder: pathlib.Path):
        self.files = files
        self.description = f"{len(files)} .npz files from {folder}"

    def open(self):
        from onnxopt.inputs import load_npz_inputs

        for f in self.files:
            yield str(f), load_npz_inputs(f)

    def length(self):
        return len(self.files)


class _ImageFolder(_Source):
    def __init__(self, files: list[pathlib.Path], where: str, pre: _ImagePreprocessor):
        self.files, self.pre = files, pre
        self.description = f"{len(files)} images from {where} ({pre.size[0]}x{pre.size[1]}, {pre.spec.describe()})"

    def open(self):
        for f in self.files:
            yield str(f), self.pre(f)

    def length(self):
        return len(self.files)


class _StackedNpz(_Source):
    """One .npz with a leading sample axis; members are streamed sample by sample."""

    def __init__(self, path: pathlib.Path, model: ir.Model):
        self.path = path
        expected = {v.name: v for v in model_inputs(model)}
        try:
            with zipfile.ZipFile(path) as zf:
                members = {}
                for info in zf.infolist():
                    if not info.filename.endswith(".npy"):
                        continue
                    with zf.open(info) as f:
                        version = np.lib.format.read_magic(f)
                        if version == (1, 0):
                            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                        else:
                            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                    members[info.filename[:-4]] = (info.filename, tuple(shape), bool(fortran), np.dtype(dtype))
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise OnnxoptError(f"{path}: not a readable .npz file ({_first_line(e)})") from None
        if not members:
            raise OnnxoptError(f"{path}: the .npz file holds no arrays")
        for key, (_, _, _, dtype) in members.items():
            if dtype.hasobject:
                raise OnnxoptError(f"{path}: array {key!r} holds Python objects; only numeric arrays are read")
        unknown = sorted(set(members) - set(expected))
        if unknown:
            raise OnnxoptError(f"{path}: unknown input name {unknown[0]!r} (model inputs: {', '.join(expected)})")
        missing = [n for n in expected if n not in members]
        if missing:
            raise OnnxoptError(f"{path}: missing input {missing[0]!r}")
        self.layout: dict[str, tuple[str, tuple[int, ...], bool, np.dtype, bool]] = {}
        counts = {}
        for key, (member, shape, fortran, dtype) in members.items():
            value = expected[key]
            rank = len(value.shape) if value.shape is not None else None
            if not shape:
                raise OnnxoptError(f"{path}: array {key!r} is a scalar; expected a leading sample axis")
            if rank is not None and len(shape) == rank + 1:
                stacked = True  # x[i] is one sample
            elif rank is None or len(shape) == rank:
                stacked = False  # x[i:i+1] is one batch-1 sample
            else:
                raise OnnxoptError(
                    f"{path}: array {key!r} has shape {shape}; input {key!r} has rank {rank}, so expected "
                    f"rank {rank} (samples along the batch axis) or {rank + 1} (a leading sample axis)"
                )
            counts[key] = shape[0]
            self.layout[key] = (member, shape, fortran, dtype, stacked)
        if len(set(counts.values())) > 1:
            detail = ", ".join(f"{k}: {n}" for k, n in counts.items())
            raise OnnxoptError(f"{path}: arrays disagree on the number of samples ({detail})")
        self.n = next(iter(counts.values()))
        if self.n == 0:
            raise OnnxoptError(f"{path}: the arrays hold 0 samples")
        self.description = f"{self.n} samples from {path}"

    def open(self):
        try:
            with zipfile.ZipFile(self.path) as zf:
                readers: dict[str, Callable[[], np.ndarray]] = {}
                handles = []
                for key, (member, shape, fortran, dtype, stacked) in self.layout.items():
                    item_shape = shape[1:]
                    if fortran:
                        # Samples are not contiguous in a Fortran-order file: read it whole (rare).
                        with zf.open(member) as f:
                            whole = np.lib.format.read_array(f, allow_pickle=False)
                        it = iter(whole)
                        readers[key] = lambda it=it: next(it)
                    else:
                        f = zf.open(member)
                        handles.append(f)
                        version = np.lib.format.read_magic(f)
                        (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
                        nbytes = int(np.prod(item_shape, dtype=np.int64)) * dtype.itemsize

                        def read(f=f, nbytes=nbytes, item_shape=item_shape, dtype=dtype):
                            buf = f.read(nbytes)
                            if len(buf) != nbytes:
                                raise EOFError("array data is truncated")
                            return np.frombuffer(buf, dtype=dtype).reshape(item_shape).copy()

                        readers[key] = read
                try:
                    for i in range(self.n):
                        feed = {}
                        for key, read in readers.items():
                            arr = read()
                            feed[key] = arr if self.layout[key][4] else arr[None]
                        yield f"{self.path} sample {i}", feed
                finally:
                    for f in handles:
                        f.close()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise OnnxoptError(f"{self.path}: not a readable .npz file ({_first_line(e)})") from None

    def length(self):
        return self.n


class _Reiterable(_Source):
    def __init__(self, obj: Iterable, what: str):
        self.obj = obj
        n = None
        try:
            n = len(obj)  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - no length, or a reader's NotImplementedError
            n = None
        self.n = n
        self.description = f"{n if n is not None else 'an unknown number of'} feeds from a {what}"

    def open(self):
        for i, feed in enumerate(self.obj):
            yield f"feed {i}", feed

    def length(self):
        return self.n


class _RewindableReader(_Source):
    def __init__(self, reader: Any):
        self.reader = reader
        self.n: int | None = None
        self.description = f"feeds from {type(reader).__name__} (rewound for each pass)"

    def open(self):
        self.reader.rewind()
        i = 0
        while True:
            feed = self.reader.get_next()
            if feed is None:
                break
            yield f"{type(self.reader).__name__} feed {i}", feed
            i += 1
        self.n = i

    def length(self):
        return self.n


class _DiskCached(_Source):
    """A one-shot stream (generator, reader without rewind) teed to a temporary folder.

    The first pass pulls from the stream and writes each feed as an uncompressed .npz;
    later passes (and the rest of an interrupted pass) read the files back, so the data
    are never all in memory, and re-iteration gives the same feeds.
    """

    def __init__(self, stream: Iterator[Any], what: str):
        self.stream = stream
        self.tmp = tempfile.mkdtemp(prefix="onnxopt-calib-")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.tmp, True)
        self.cached = 0
        self.done = False
        self.what = what
        self.description = f"feeds from a {what} (cached on disk for repeated passes)"

    def _path(self, i: int) -> str:
        return os.path.join(self.tmp, f"{i:08d}.npz")

    def open(self):
        i = 0
        while True:
            if i < self.cached:
                with np.load(self._path(i), allow_pickle=False) as z:
                    feed = {k: z[k] for k in z.files}
            elif self.done:
                return
            else:
                try:
                    feed = next(self.stream)
                except StopIteration:
                    self.done = True
                    return
                if feed is None:  # a reader's get_next() ended
                    self.done = True
                    return
                if isinstance(feed, Mapping):
                    try:
                        np.savez(self._path(i), **{str(k): np.asarray(v) for k, v in feed.items()})
                    except (TypeError, ValueError):
                        pass  # not storable: validation below names the problem
                    else:
                        self.cached = i + 1
            yield f"{self.what} feed {i}", feed
            i += 1

    def length(self):
        return self.cached if self.done else None

    def close(self):
        self._finalizer()


class _Random(_Source):
    is_random = True

    def __init__(self, model: ir.Model, shapes: Mapping[str, tuple[int, ...]] | None, n: int, seed: int):
        self.model, self.shapes, self.n, self.seed = model, dict(shapes or {}), n, seed
        make_sample_inputs(model, self.shapes, seed=seed)  # shape / dtype errors now, not later
        self.description = f"{n} random feeds (smoke test only: ranges from random data mean nothing)"

    def open(self):
        for i in range(self.n):
            yield f"random feed {i}", make_sample_inputs(self.model, self.shapes, seed=self.seed + i)

    def length(self):
        return self.n


def _reader_stream(reader: Any) -> Iterator[Any]:
    while True:
        feed = reader.get_next()
        if feed is None:
            return
        yield feed


# ---------------------------------------------------------------------------------------
# the public object
# ---------------------------------------------------------------------------------------


class CalibrationData:
    """A re-iterable, validated sequence of feeds (see the module docstring).

    ``for feed in data`` yields ``{input name: np.ndarray}``; ``len(data)`` is the number of
    feeds (for a one-shot source it is known after the first full pass; ``len()`` runs that
    pass if needed); ``data.length_hint()`` never triggers a pass (None if unknown).
    """

    def __init__(self, model: ir.Model, source: _Source, samples: int | None, *, reject_nan: bool = False):
        self._source = source
        self._reject_nan = reject_nan
        self._samples = samples
        self._known_len: int | None = None
        self._first: Feed | None = None
        self._inputs = {v.name: v for v in model_inputs(model)}
        self._model = model
        self.is_random = source.is_random
        self.input_names = list(self._inputs)
        # {input: first sample label} of float inputs holding +-inf: allowed (additive masks),
        # but named when every range comes out unusable, which one such pixel causes.
        self.infinite_inputs: dict[str, str] = {}
        n = self.length_hint()
        desc = source.description
        if samples is not None and n is not None and n >= samples:
            desc = f"first {samples} of {desc}" if n > samples else desc
        elif samples is not None and n is None:
            desc = f"up to {samples} {desc}"
        self.description = desc

    def __iter__(self) -> Iterator[Feed]:
        n = 0
        stream = self._source.open()
        if self._samples is not None:
            stream = itertools.islice(stream, self._samples)  # never pulls sample N+1
        for label, feed in stream:
            yield self._check(label, feed)
            n += 1
        self._known_len = n  # a complete pass: the length is known from now on

    def _check(self, label: str, feed: Any) -> Feed:
        if not isinstance(feed, Mapping):
            raise OnnxoptError(f"{label}: expected a dict of input name -> array, got {type(feed).__name__}")
        arrays = {}
        for k, v in feed.items():
            try:
                arrays[str(k)] = np.asarray(v)
            except Exception as e:  # noqa: BLE001 - ragged lists etc.
                raise OnnxoptError(f"{label}: input {k!r} is not an array ({_first_line(e)})") from None
        validate_feeds(self._model, arrays, source=label)
        for name, arr in arrays.items():
            if arr.ndim and arr.shape[0] == 0:
                raise OnnxoptError(f"{label}: input {name!r} has an empty batch (shape {arr.shape})")
            # NaN is never a value to calibrate on: one NaN pixel made ranges unusable (quantize)
            # and refit weights NaN (prune). +-inf stays allowed: additive masks use -inf.
            if self._reject_nan and arr.dtype.kind == "f" and np.isnan(arr).any():
                raise OnnxoptError(f"{label}: input {name!r} holds {int(np.isnan(arr).sum())} NaN value(s); "
                                   "fix or drop this sample")
            if arr.dtype.kind == "f" and name not in self.infinite_inputs and np.isinf(arr).any():
                self.infinite_inputs[name] = label
        return arrays

    def length_hint(self) -> int | None:
        if self._known_len is not None:
            return self._known_len
        n = self._source.length()
        if n is None:
            return None
        return min(n, self._samples) if self._samples is not None else n

    def __len__(self) -> int:
        n = self.length_hint()
        if n is None:
            n = sum(1 for _ in self)
        return n

    def first(self) -> Feed:
        """The first feed (validated; kept, so asking again costs nothing)."""
        if self._first is None:
            for feed in self:
                self._first = feed
                break
            else:
                raise OnnxoptError(f"{self.description}: no samples")
        return self._first

    def close(self) -> None:
        """Remove any temporary cache now (it is also removed when the object goes away)."""
        self._source.close()

    def __repr__(self) -> str:
        return f"CalibrationData({self.description!r})"


def load_calibration_data(
    spec: Any,
    model: ir.Model,
    *,
    samples: int | None = None,
    image_spec: ImageSpec | None = None,
    seed: int = 0,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    reject_nan: bool = False,
) -> CalibrationData:
    """Open a calibration data source (see the module docstring) for ``model``.

    ``samples``: use the first N feeds. ``image_spec``: preprocessing for image folders
    (an :class:`ImageSpec` or its string form). ``shapes``: dynamic dimensions for
    ``"random"`` (``{input: shape}``, as parsed by ``onnxopt.inputs.parse_shape_specs``);
    ``seed``: its random seed. ``reject_nan``: a sample with a NaN in a float input is an
    error naming it (quantize and prune; the statistics themselves cope with NaN). The first
    feed is read and validated before this returns.
    """
    if samples is not None:
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)):
            raise OnnxoptError(f"samples must be a whole number, got {samples!r}")
        if samples <= 0:
            raise OnnxoptError(f"samples must be at least 1, got {samples}")
        samples = int(samples)
    if isinstance(image_spec, str):
        image_spec = ImageSpec.parse(image_spec)
    source = _make_source(spec, model, samples, image_spec, seed, shapes)
    if image_spec is not None and not isinstance(source, _ImageFolder):
        # Silently ignoring it would let a user believe their preprocessing was applied.
        raise OnnxoptError(
            f"image preprocessing (--image-size/--image-spec) is for image calibration data; "
            f"{source.description or type(spec).__name__} holds model inputs already"
        )
    data = CalibrationData(model, source, samples, reject_nan=reject_nan)
    data.first()  # fail early: a wrong file should not cost a model load and a pass
    return data


def _make_source(spec, model, samples, image_spec, seed, shapes) -> _Source:
    if isinstance(spec, str) and spec == "random":
        return _Random(model, shapes, samples or DEFAULT_RANDOM_SAMPLES, seed)
    if isinstance(spec, (str, os.PathLike)):
        return _path_source(pathlib.Path(spec), model, image_spec)
    if isinstance(spec, CalibrationData):
        return spec._source
    if isinstance(spec, Mapping):
        return _Reiterable([spec], "single feed dict")
    if callable(getattr(spec, "get_next", None)):
        if callable(getattr(spec, "rewind", None)):
            return _RewindableReader(spec)
        return _DiskCached(_reader_stream(spec), type(spec).__name__)
    if isinstance(spec, Iterable):
        if iter(spec) is spec:  # a generator or iterator: one pass only
            return _DiskCached(iter(spec), type(spec).__name__)
        return _Reiterable(spec, type(spec).__name__)
    raise OnnxoptError(
        f"cannot read calibration data from a {type(spec).__name__}: give a folder of .npz files or images, "
        "an .npz file, an iterable of feed dicts, a CalibrationDataReader, or 'random'"
    )


def _path_source(path: pathlib.Path, model: ir.Model, image_spec: ImageSpec | None) -> _Source:
    if not path.exists():
        raise OnnxoptError(f"{path}: no such file or folder (calibration data)")
    if path.is_dir():
        try:
            entries = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        except OSError as e:
            raise OnnxoptError(f"{path}: cannot read the folder ({e.strerror or e})") from None
        npz = [p for p in entries if p.suffix.lower() == ".npz"]
        imgs = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
        if npz and imgs:
            raise OnnxoptError(f"{path}: holds both .npz files and images; keep one kind of calibration data per folder")
        if npz:
            return _NpzFolder(npz, path)
        if imgs:
            return _ImageFolder(imgs, str(path), _ImagePreprocessor(model, image_spec or ImageSpec()))
        what = "is empty" if not entries else f"holds no .npz files or images ({', '.join(IMAGE_SUFFIXES)})"
        raise OnnxoptError(f"{path}: calibration data folder {what}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _StackedNpz(path, model)
    if suffix in IMAGE_SUFFIXES:
        return _ImageFolder([path], str(path), _ImagePreprocessor(model, image_spec or ImageSpec()))
    raise OnnxoptError(
        f"{path}: not calibration data (expected a folder of .npz files or images, an .npz file, "
        "an image, or 'random')"
    )


def _shape_text(shape) -> str:
    if shape is None:
        return ""
    return "[" + ", ".join(str(d) if isinstance(d, int) and d >= 0 else "?" for d in shape) + "]"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
