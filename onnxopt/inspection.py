"""``inspect``: what is in a model, without running it."""

from __future__ import annotations

import os
import pathlib

import onnx_ir as ir

from onnxopt.graph import count_nodes, op_histogram, parameter_stats
from onnxopt.inputs import model_inputs
from onnxopt.model_io import load_model


def _type_str(value: ir.Value) -> str:
    dtype = value.dtype.name.lower() if value.dtype is not None else "?"
    if value.shape is None:
        return f"{dtype}[?]"
    dims = [str(d) if isinstance(d, int) else (d.value or "?") for d in value.shape]
    return f"{dtype}[{','.join(dims)}]"


def inspect_model(model: ir.Model | str | os.PathLike) -> dict:
    """Opsets, inputs/outputs, op histogram, parameters and external data of a model."""
    path = None
    if not isinstance(model, ir.Model):
        path = pathlib.Path(model)
        model = load_model(path)
    params, nbytes = parameter_stats(model)
    external: dict[str, int] = {}
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                loc = value.const_value.location
                external[loc] = external.get(loc, 0) + value.const_value.nbytes
    return {
        "path": str(path) if path else None,
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
        "parameters": params,
        "parameter_bytes": nbytes,
        "external_data": external,
    }
