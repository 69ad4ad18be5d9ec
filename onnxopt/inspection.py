"""``inspect``: what is in a model, without running it."""

from __future__ import annotations

import os
import pathlib

import onnx_ir as ir
from rich.markup import escape
from rich.table import Table

from onnxopt.errors import OnnxoptError
from onnxopt.graph import all_nodes, count_nodes, op_histogram, parameter_stats
from onnxopt.inputs import model_inputs
from onnxopt.model_io import checker_problem, load_proto, model_from_proto


def _type_str(value: ir.Value) -> str:
    dtype = value.dtype.name.lower() if value.dtype is not None else "?"
    if value.shape is None:
        return f"{dtype}[?]"
    dims = [str(d) if isinstance(d, int) else (d.value or "?") for d in value.shape]
    return f"{dtype}[{','.join(dims)}]"


# Constant attributes that hold one scalar or a list (value_float, value_ints, ...): bytes per element.
_LIST_ATTR_BYTES = {"value_float": 4, "value_floats": 4, "value_int": 8, "value_ints": 8}


def constant_node_stats(model: ir.Model) -> tuple[int, int]:
    """(number of parameters, bytes) held by Constant nodes in every graph.

    Exporters such as paddle2onnx put all the weights in Constant nodes instead of
    initializers: counting initializers alone says 0 for a model full of weights.
    (``sparse_value`` is not counted: onnx-ir cannot load such a model at all.)
    """
    count = nbytes = 0
    for node in all_nodes(model):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        for name, attr in node.attributes.items():
            if name == "value" and attr.type == ir.AttributeType.TENSOR:
                count += attr.value.size
                nbytes += attr.value.nbytes
            elif name in _LIST_ATTR_BYTES:
                n = len(attr.value) if isinstance(attr.value, (list, tuple)) else 1
                count += n
                nbytes += n * _LIST_ATTR_BYTES[name]
    return count, nbytes


def inspect_model(model: ir.Model | str | os.PathLike) -> dict:
    """Opsets, inputs/outputs, op histogram, parameters and external data of a model.

    ``parameters``/``parameter_bytes`` count initializers and Constant-node tensors;
    ``constant_parameters``/``constant_parameter_bytes`` are the Constant-node part.
    """
    if isinstance(model, ir.Model):
        return _inspect(model, None, None)
    path = pathlib.Path(model)
    # A model that parses but fails the checker is exactly one a user wants to look
    # inside: show it, and say what the checker said.
    proto = load_proto(path, check=False)
    problem = checker_problem(proto, path)
    try:
        return _inspect(model_from_proto(proto, path), path, problem)
    except Exception:
        if problem is None:
            raise
        # Too broken to describe (bad dtypes, ...): the checker's word stands.
        raise OnnxoptError(f"{path}: fails the ONNX checker: {problem}") from None


def _inspect(model: ir.Model, path: pathlib.Path | None, checker: str | None) -> dict:
    params, nbytes = parameter_stats(model)
    const_params, const_bytes = constant_node_stats(model)
    external: dict[str, int] = {}
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                loc = value.const_value.location
                external[loc] = external.get(loc, 0) + value.const_value.nbytes
    return {
        "path": str(path) if path else None,
        "checker_error": checker,
        "file_bytes": path.stat().st_size if path else None,
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name or ''} {model.producer_version or ''}".strip(),
        "opset_imports": dict(model.opset_imports),
        "inputs": [{"name": v.name, "type": _type_str(v)} for v in model_inputs(model)],
        "outputs": [{"name": v.name, "type": _type_str(v)} for v in model.graph.outputs],
        "nodes": count_nodes(model),
        "subgraphs": sum(1 for _ in model.graph.subgraphs()),
        "functions": len(model.functions),
        "op_histogram": op_histogram(model),
        "parameters": params + const_params,
        "parameter_bytes": nbytes + const_bytes,
        "constant_parameters": const_params,
        "constant_parameter_bytes": const_bytes,
        "external_data": external,
    }


def header_line(info: dict) -> str:
    """'model.onnx  (4,745,517 bytes, IR v8, producer)' as rich markup; empty parts left out."""
    parts = [f"{info['file_bytes']:,} bytes" if info.get("file_bytes") is not None else "",
             f"IR v{info['ir_version']}" if info.get("ir_version") is not None else "",
             info.get("producer") or ""]
    details = ", ".join(escape(p) for p in parts if p)
    name = escape(info["path"] or "(in-memory model)")
    return f"[bold]{name}[/bold]" + (f"  ({details})" if details else "")


def parameters_line(info: dict) -> str:
    """'parameters: N (X MB)', saying how many live in Constant nodes when some do."""
    line = f"parameters: {info['parameters']:,} ({info['parameter_bytes'] / 1e6:.2f} MB"
    if info.get("constant_parameters"):
        line += f"; {info['constant_parameters']:,} in Constant nodes"
    return line + ")"


def print_inspect(console, info: dict) -> None:
    """The tables of ``onnxopt inspect`` on a rich console.

    Every model-derived string is escaped: rich reads ``[...]`` as markup, and shapes
    (``float[batch,3]``) and names would otherwise lose their brackets.
    """
    console.print(header_line(info))
    if info.get("checker_error"):
        console.print(f"[yellow]fails the ONNX checker:[/yellow] {escape(info['checker_error'])} (other commands refuse it)")
    console.print("opsets: " + ", ".join(f"{escape(d or 'ai.onnx')} {v}" for d, v in info["opset_imports"].items()))
    io = Table(title="inputs and outputs")
    io.add_column("kind")
    io.add_column("name")
    io.add_column("type")
    for kind in ("input", "output"):
        for v in info[kind + "s"]:
            io.add_row(kind, escape(v["name"]), escape(v["type"]))
    console.print(io)
    ops = Table(title=f"{info['nodes']} nodes ({info['subgraphs']} subgraphs, {info['functions']} functions)")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, n in info["op_histogram"].items():
        ops.add_row(escape(op), str(n))
    console.print(ops)
    console.print(parameters_line(info))
    files = info["external_data"]
    if len(files) > 4:  # torch writes one file per tensor: a count, not a page of lines
        biggest = max(files, key=files.get)
        console.print(f"external data: {len(files)} files, {sum(files.values()) / 1e6:.2f} MB "
                      f"(largest {escape(biggest)}, {files[biggest] / 1e6:.2f} MB; --json lists them)")
    else:
        for loc, nbytes in files.items():
            console.print(f"external data: {escape(loc)} ({nbytes / 1e6:.2f} MB)")
