"""Conformance run: every model test shipped in the onnx wheel through ``onnxopt optimize``.

    python benchmarks/conformance.py                  # all kinds, prints counts and every non-pass
    python benchmarks/conformance.py --quantize       # also quantize each optimized float model (random calibration)
    python benchmarks/conformance.py --json out.json  # per-case results

For each test (``onnx/backend/test/data/{pytorch-converted,pytorch-operator,simple,light}``)
the shipped inputs are the safety net's verification inputs, and the optimized model is
then checked independently from the saved file against the shipped expected outputs with
the test's tolerance (see ``onnxopt/testing/conformance.py``). Counts:

- optimized and matching (how many changed the graph, how many had a pass rolled back
  by the safety net: those rollbacks are pass bugs to fix even though the output is right),
- unchanged, with the reason (neither ORT nor onnx's reference evaluator runs the original;
  onnxopt refuses the file). Where only the reference evaluator runs it, the model is
  optimized without the safety net and checked with the evaluator,
- failed (the optimized model is wrong, does not load, or onnxopt crashed): target zero.

Exit status 1 if any case failed.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from onnxopt.testing.conformance import DEFAULT_KINDS, discover_cases, run_case  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kinds", default=",".join(DEFAULT_KINDS), help="comma-separated test kinds")
    ap.add_argument("--only", help="substring filter on the case name")
    ap.add_argument("--quantize", action="store_true", help="also quantize every optimized model with random calibration")
    ap.add_argument("--json", help="write per-case results here")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)  # onnx-ir logs every skipped dedup; the table is the report
    import onnxruntime

    onnxruntime.set_default_logger_severity(4)  # ORT's own errors are in the table, once

    cases = discover_cases(args.kinds.split(","))
    if args.only:
        cases = [c for c in cases if args.only in c.id]
    results = []
    start = time.perf_counter()
    for case in cases:
        r = run_case(case, quantize=args.quantize)
        results.append(r)
        mark = {"optimized": ".", "unchanged": "u", "failed": "F"}[r.status]
        print(mark, end="", flush=True)
    print()
    elapsed = time.perf_counter() - start

    by_status = collections.Counter(r.status for r in results)
    ok = [r for r in results if r.status == "optimized"]
    changed = sum(1 for r in ok if r.nodes_after != r.nodes_before)
    rolled = [r for r in ok if r.rolled_back]
    by_reference = [r for r in ok if r.note.startswith("checked with onnx's reference")]
    noted = [r for r in ok if r.note.startswith("ORT differs")]
    print(f"\n{len(results)} model tests from the onnx {__import__('onnx').__version__} wheel ({args.kinds}) in {elapsed:.1f} s")
    print(f"  optimized and matching the expected outputs: {by_status['optimized']:4d}"
          f"  ({changed} with fewer/different nodes, {len(rolled)} with a pass rolled back, "
          f"{len(noted)} where ORT itself differs from the shipped outputs)")
    print(f"    of which checked with onnx's reference evaluator because ORT cannot run them: {len(by_reference)}")
    print(f"  left unchanged (with a reason):              {by_status['unchanged']:4d}")
    print(f"  failed:                                      {by_status['failed']:4d}")
    nodes_b = sum(r.nodes_before or 0 for r in ok)
    nodes_a = sum(r.nodes_after or 0 for r in ok)
    print(f"  nodes over the optimized tests: {nodes_b} -> {nodes_a}")

    reasons = collections.defaultdict(list)
    for r in results:
        if r.status == "unchanged":
            key = re.sub(r"Load model from \S+ failed:", "", r.reason.split(" node with name")[0])
            key = key if len(key) < 160 else key[:90] + " ... " + key[-65:]
            reasons[key].append(r.case.split("/", 1)[1])
    if reasons:
        print("\nunchanged, by reason:")
        for key, names in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
            print(f"  {len(names):3d}  {key}")
            print(f"       {', '.join(names)}")
    if rolled:
        print("\npasses rolled back by the safety net (a pass bug; the output is still right):")
        for r in rolled:
            for name, why in r.rolled_back.items():
                print(f"  {r.case}: {name}: {why}")
    if noted:
        print("\nORT differs from the shipped outputs on the original (compared with ORT instead):")
        for r in noted:
            print(f"  {r.case}")
    failed = [r for r in results if r.status == "failed"]
    if failed:
        print("\nFAILED:")
        for r in failed:
            print(f"  {r.case}: {r.reason}")
    if args.quantize:
        q = collections.Counter(r.quantize.split(":")[0] for r in ok)
        print(f"\nquantize (random calibration) of the {len(ok)} optimized models: {dict(q)}")
        for r in ok:
            if r.quantize.startswith(("failed", "refused")):
                print(f"  {r.case}: {r.quantize}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_dict() for r in results], f, indent=2)
    bad_quant = args.quantize and any(r.quantize.startswith("failed") for r in ok)
    return 1 if failed or bad_quant else 0


if __name__ == "__main__":
    sys.exit(main())
