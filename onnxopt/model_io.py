"""Loading and saving models through onnx-ir, safely.

- Loading validates the file (exists, parses, external data stays inside the model's
  folder) before anything else sees it; tensors stay memory-mapped, so a model over
  2 GB never goes through a single protobuf.
- Saving is atomic: the model (and its external data) is written under temporary
  names in the destination folder and renamed into place only when complete, so an
  interrupted run never leaves a partial file, and the input is never touched.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import tempfile
from collections.abc import Iterator

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxopt.errors import OnnxoptError

# Models whose tensors add up to more than this are saved with external data: the
# protobuf format cannot hold more than 2 GB in one message.
EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000


def _iter_graph_protos(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_graph_protos(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _iter_graph_protos(g)


def _iter_tensor_protos(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    graphs = list(_iter_graph_protos(model.graph))
    for func in model.functions:
        for node in func.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    graphs.extend(_iter_graph_protos(attr.g))
    for graph in graphs:
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices


def check_external_data(model: onnx.ModelProto, base_dir: pathlib.Path) -> list[pathlib.Path]:
    """Refuse external-data locations that escape the model's folder; return the files used.

    A model is untrusted input: a location such as ``/etc/passwd``, ``../secret`` or a
    symlink pointing out of the folder would make us read (and later copy) files the
    user never meant to hand over.
    """
    base = base_dir.resolve()
    files: set[pathlib.Path] = set()
    for tensor in _iter_tensor_protos(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        name = tensor.name or "<unnamed>"
        if not location:
            raise OnnxoptError(f"tensor {name!r} uses external data but names no file")
        if os.path.isabs(location) or location.startswith(("/", "\\")):
            raise OnnxoptError(
                f"tensor {name!r}: external data location {location!r} is an absolute path; "
                "only files inside the model's folder are allowed"
            )
        if ".." in pathlib.PurePath(location.replace("\\", "/")).parts:
            raise OnnxoptError(
                f"tensor {name!r}: external data location {location!r} points outside the model's folder"
            )
        path = (base / location).resolve()
        if base != path and base not in path.parents:
            raise OnnxoptError(
                f"tensor {name!r}: external data location {location!r} resolves outside the "
                f"model's folder (to {path})"
            )
        if not path.is_file():
            raise OnnxoptError(f"tensor {name!r}: external data file {location!r} is missing")
        try:
            offset = int(info.get("offset", 0) or 0)
            length = int(info.get("length", 0) or 0)
        except ValueError:
            raise OnnxoptError(f"tensor {name!r}: external data offset/length is not a number") from None
        expected = _expected_nbytes(tensor)
        if expected is not None and "length" in info and length != expected:
            # The data would be read with the tensor's shape, not this length: refuse the lie.
            raise OnnxoptError(
                f"tensor {name!r}: external data length {length} does not match its shape "
                f"{list(tensor.dims)} ({expected} bytes)"
            )
        if expected is not None and "length" not in info:
            length = expected
        if offset < 0 or length < 0 or offset + length > path.stat().st_size:
            raise OnnxoptError(
                f"tensor {name!r}: external data range {offset}+{length} is past the end of {location!r}"
            )
        files.add(path)
    return sorted(files)


def _expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes a tensor's dims and type call for (None for strings and sub-byte types)."""
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:
        return None
    if tensor.data_type in (onnx.TensorProto.STRING,) or itemsize == 0:
        return None
    if tensor.data_type in {
        getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2") if hasattr(onnx.TensorProto, n)
    }:
        return None
    count = 1
    for d in tensor.dims:
        count *= d
    return count * itemsize


def load_proto(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Read and validate a model file without loading external tensors."""
    p = pathlib.Path(path)
    if not p.exists():
        raise OnnxoptError(f"{p}: no such file")
    if p.is_dir():
        raise OnnxoptError(f"{p}: is a folder, not an ONNX model file")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError, OSError) as e:
        raise OnnxoptError(f"{p}: not a valid ONNX model ({_first_line(e) or type(e).__name__})") from None
    except Exception as e:  # protobuf raises a variety of internal errors on garbage
        raise OnnxoptError(f"{p}: not a valid ONNX model ({type(e).__name__})") from None
    if not proto.HasField("graph") or (not proto.graph.node and not proto.graph.output):
        raise OnnxoptError(f"{p}: not a valid ONNX model (no graph)")
    if not proto.opset_import:
        raise OnnxoptError(f"{p}: model declares no opset import")
    if not proto.graph.output:
        # Nothing is computed: every node is dead, and ORT cannot load what is left.
        raise OnnxoptError(f"{p}: the model declares no graph outputs")
    check_external_data(proto, p.parent)
    if check:
        problem = checker_problem(proto, p)
        if problem is not None:
            raise OnnxoptError(f"{p}: fails the ONNX checker: {problem}")
    return proto


def checker_problem(proto: onnx.ModelProto, path: str | os.PathLike) -> str | None:
    """The ONNX checker's one-line complaint about a model read from ``path``, or None."""
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in _iter_tensor_protos(proto))
    try:
        # With external data the checker must resolve files next to the model, so it
        # gets the path (it reads the graph, not the tensors; works past 2 GB).
        onnx.checker.check_model(os.fspath(path) if external else proto, full_check=False)
    except onnx.checker.ValidationError as e:
        return _first_line(e)
    except Exception as e:
        return _first_line(e) or type(e).__name__
    return None


def load_model(path: str | os.PathLike, *, check: bool = True) -> ir.Model:
    """Load a model as an onnx-ir Model; external tensors stay memory-mapped from their files."""
    p = pathlib.Path(path)
    return model_from_proto(load_proto(p, check=check), p)


def model_from_proto(proto: onnx.ModelProto, path: str | os.PathLike) -> ir.Model:
    """The onnx-ir Model of a proto :func:`load_proto` read from ``path``."""
    p = pathlib.Path(path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:
        # onnx-ir wraps the real reason ("77 is not a valid DataType") in a SerdeError.
        while e.__cause__ is not None or e.__context__ is not None:
            e = e.__cause__ or e.__context__
        raise OnnxoptError(f"{p}: cannot be read as an ONNX graph: {_first_line(e) or type(e).__name__}") from None
    ir.external_data.set_base_dir(model.graph, str(p.parent))
    # Remember where the model came from, so saving refuses to overwrite it.
    model.meta["onnxopt.source_path"] = str(p.resolve())
    return model


def tensor_bytes(model: ir.Model) -> int:
    """Total bytes of initializers (main graph and subgraphs)."""
    total = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def _external_bytes(model: ir.Model) -> int:
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                total += value.const_value.nbytes
    return total


def model_files(path: str | os.PathLike) -> set[pathlib.Path]:
    """The model file and every external data file it references, resolved.

    Reads the graph only (no tensor data); an unreadable file is just itself. One command
    asks this for the same input several times (output, report, the save itself), and a
    model with embedded weights is parsed whole to answer: the answer is kept per file
    version (size and modification time).
    """
    p = pathlib.Path(path)
    try:
        st = p.stat()
    except OSError:
        return {p.resolve()}
    return set(_model_files(os.path.abspath(p), st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=8)
def _model_files(path: str, _mtime_ns: int, _size: int) -> frozenset[pathlib.Path]:
    p = pathlib.Path(path)
    files = {p.resolve()}
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception:  # noqa: BLE001 - not a model (yet): nothing else to protect
        return frozenset(files)
    for tensor in _iter_tensor_protos(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = {e.key: e.value for e in tensor.external_data}.get("location")
            if location:
                files.add((p.parent / location).resolve())
    return frozenset(files)


def _same_file(a: pathlib.Path, b: pathlib.Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b) or (a.exists() and b.exists() and a.resolve() == b.resolve())


def _collision(path: pathlib.Path, models: tuple) -> tuple[str, str] | None:
    """(model, what) when writing ``path`` would overwrite a model file or its external data."""
    for model in models:
        if model is None:
            continue
        mp = pathlib.Path(model)
        if _same_file(path, mp):
            return os.fspath(model), "model"
        # Only an existing file can be someone's external data: read the graph only then.
        if path.exists() and mp.exists() and path.resolve() in model_files(mp):
            return os.fspath(model), "external data"
    return None


def check_output_path(output: str | os.PathLike, *inputs: str | os.PathLike | None) -> pathlib.Path:
    """Validate an output model path before any work is done.

    Refuses a folder, a missing folder, and any path whose writing (the model, or the
    ``OUT.data`` that large models get) would overwrite an input model or its external data.
    """
    out = pathlib.Path(output)
    if out.is_dir():
        raise OnnxoptError(f"{out}: is a folder; give a file name for the output model")
    if not out.parent.exists():
        raise OnnxoptError(f"{out.parent}: output folder does not exist")
    hit = _collision(out, inputs)
    if hit and hit[1] == "model":
        raise OnnxoptError(f"{out}: output path is the input model; write the result to a new file")
    if hit:
        raise OnnxoptError(f"{out}: is the external data file of the input model {hit[0]}; write the result to a new file")
    data = out.with_name(out.name + ".data")
    hit = _collision(data, inputs)
    if hit:
        raise OnnxoptError(
            f"{out}: its external data file {data.name} would overwrite the input model {hit[0]}"
            + ("" if hit[1] == "model" else "'s weights") + "; choose another output name"
        )
    return out


def check_side_output(
    path: str | os.PathLike,
    option: str,
    *,
    inputs: tuple | list = (),
    outputs: tuple | list = (),
) -> pathlib.Path:
    """Validate a report/JSON/CSV/plot path before any work: writable, and not a model.

    ``inputs``: model files read (the path must not be one, nor their external data);
    ``outputs``: model files (or other reports) this run writes.
    """
    p = pathlib.Path(path)
    if p.is_dir():
        raise OnnxoptError(f"{option} {p}: is a folder; give a file name")
    parent = p.absolute().parent
    if not parent.is_dir():
        raise OnnxoptError(f"{option} {p}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OnnxoptError(f"{option} {p}: folder {parent} is not writable")
    hit = _collision(p, tuple(inputs))
    if hit:
        what = "the input model" if hit[1] == "model" else f"the external data of the input model {hit[0]}"
        raise OnnxoptError(f"{option} {p}: is {what}; write it to a new file")
    for other in outputs:
        if other is not None:
            o = pathlib.Path(other)
            if _same_file(p, o) or _same_file(p, o.with_name(o.name + ".data")):
                raise OnnxoptError(f"{option} {p}: is also the output {other}; give it a file of its own")
    return p


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
) -> pathlib.Path:
    """Save atomically; large models get their tensors in ``<name>.data`` beside the file.

    ``external_data=None`` decides by size (over ~1.8 GB of tensors goes external).
    """
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    elif not isinstance(model, ir.Model):
        raise OnnxoptError(f"save_model: expected an onnx_ir.Model (or onnx.ModelProto), got {type(model).__name__}")
    out = pathlib.Path(path)
    source = model.meta.get("onnxopt.source_path")
    check_output_path(out, source)
    if external_data is None:
        # Over the protobuf limit, or weights that already live in external files: keep them
        # external, so saving streams tensors to disk instead of building a 2 GB proto in RAM.
        external_data = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES or _external_bytes(model) > (1 << 20)
    data_name = out.name + ".data"
    with _temporary_dir(out.parent) as tmp:
        tmp_model = tmp / out.name
        try:
            if external_data:
                ir.save(model, tmp_model, external_data=data_name)
            else:
                # A small model comes out self-contained: external tensors are read in.
                ir.external_data.load_to_model(model)
                ir.save(model, tmp_model)
        except OSError as e:
            raise OnnxoptError(f"{out}: cannot write: {e.strerror or e}") from None
        # Data first, model last: the model file appearing is the sign of a complete write.
        if external_data:
            os.replace(tmp / data_name, out.parent / data_name)
        os.replace(tmp_model, out)
    return out


@contextlib.contextmanager
def _temporary_dir(parent: pathlib.Path) -> Iterator[pathlib.Path]:
    # Same folder as the destination, so the final rename is atomic (same file system).
    tmp = tempfile.mkdtemp(prefix=".onnxopt-tmp-", dir=parent)
    try:
        yield pathlib.Path(tmp)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""
