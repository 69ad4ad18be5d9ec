"""fold-constants against the ONNX operator test cases, with every input made constant.

    python benchmarks/fold_node_conformance.py            # counts and every mismatch/crash
    python benchmarks/fold_node_conformance.py --only Conv

Each single-node case from ``onnx.backend.test.case.node`` (generated from the onnx
wheel, about 1900) gets its inputs turned into initializers; ``fold-constants`` then
either folds the node (its outputs become Constant nodes, being graph outputs) or
leaves it. Folded outputs are compared with the case's expected outputs (dtype, shape,
values with rtol 1e-3 / atol 1e-5, NaN = NaN). Target: zero mismatches, zero crashes;
"not folded" is fine (ops the evaluator does not cover, sequence outputs, ...).
Exit status 1 on any mismatch or crash.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _same(got: np.ndarray, exp: np.ndarray) -> bool:
    if got.shape != exp.shape or got.dtype != exp.dtype:
        return False
    if exp.dtype.kind in "OSU":
        return np.array_equal(got.astype(str), exp.astype(str))
    try:
        a, b = got.astype(np.float64), exp.astype(np.float64)
    except (TypeError, ValueError):
        a, b = got.astype(np.float32).astype(np.float64), exp.astype(np.float32).astype(np.float64)
    return bool(np.allclose(a, b, rtol=1e-3, atol=1e-5, equal_nan=True))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="substring filter on the case name")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import onnx
    import onnx_ir as ir
    from onnx import numpy_helper
    from onnx.backend.test.case.node import collect_testcases

    from onnxopt.passes.constant_folding import fold_constants

    cases = [c for c in collect_testcases(None) if not args.only or args.only.lower() in c.name.lower()]
    start = time.perf_counter()
    folded = not_folded = 0
    problems: list[str] = []
    for case in cases:
        if len(case.model.graph.node) != 1 or not case.data_sets:
            continue
        inputs, expected = case.data_sets[0]
        if len(inputs) != len(case.model.graph.input) or not all(isinstance(x, np.ndarray) for x in inputs):
            continue
        proto = onnx.ModelProto.FromString(case.model.SerializeToString())
        try:
            tensors = [numpy_helper.from_array(x, v.name) for x, v in zip(inputs, proto.graph.input)]
        except Exception:
            continue
        del proto.graph.input[:]
        proto.graph.initializer.extend(tensors)
        try:
            model = ir.serde.deserialize_model(proto)
            n = fold_constants(model)
        except Exception as e:  # a crash is a bug to report, not to hide
            problems.append(f"{case.name}: crashed: {type(e).__name__}: {str(e)[:200]}")
            continue
        if not n:
            not_folded += 1
            continue
        folded += 1
        for out, exp in zip(model.graph.outputs, expected):
            producer = out.producer()
            if not isinstance(exp, np.ndarray) or producer is None or producer.op_type != "Constant":
                continue
            got = producer.attributes["value"].value.numpy()
            if not _same(got, exp):
                problems.append(f"{case.name}: output {out.name}: got {got.dtype}{got.shape}, expected {exp.dtype}{exp.shape}")
    print(
        f"{len(cases)} operator test cases: folded {folded}, not folded {not_folded}, "
        f"mismatches/crashes {len(problems)} ({time.perf_counter() - start:.1f} s)"
    )
    for p in problems:
        print("  " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
