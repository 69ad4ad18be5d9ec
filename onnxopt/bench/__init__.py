"""Latency you can trust: ``onnxopt bench`` as a Python API.

    from onnxopt.bench import benchmark
    report = benchmark(["model.onnx", "model.int8.onnx"], ep="cpu", runs=200)
    print(report.comparisons[0]["speedup"], report.comparisons[0]["speedup_interval"])
    report.write_json("bench.json")

See ``docs/bench.md`` for what is measured, how, and the JSON layout.
"""

from onnxopt.bench.core import benchmark, parse_batch_sizes, session_options
from onnxopt.bench.report import SCHEMA_VERSION, BenchReport
from onnxopt.bench.schema import load_schema, validate_report

__all__ = ["SCHEMA_VERSION", "BenchReport", "benchmark", "load_schema", "parse_batch_sizes", "session_options", "validate_report"]
