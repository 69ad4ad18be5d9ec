"""Peak host memory of one model's session, measured in a fresh child process.

Measured in the benchmarking process itself, a model's peak depended on what ran
before it: memory freed by an earlier session stays in the allocator and is reused, so
of two identical models the first read 9.4 MB and the second 0.16 MB, and a second
``benchmark()`` call read about 0. A fresh process per model has no such history.

The child (this file run as a script, :func:`child_main`) imports only the standard
library, numpy and onnxruntime (never onnxopt), loads the feeds, reads its resident set
(``VmRSS``) as the baseline and resets its high-water mark (``VmHWM``, by writing ``5``
to ``/proc/self/clear_refs``, Linux >= 4.0); it then creates the session with the
benchmark's session options, provider and provider options, runs it once on the same
feeds (IO binding as the benchmark binds them), and reports ``VmHWM - baseline``.
Device memory is not counted. Where this cannot be measured the peak is ``None`` with a
note saying why, never a guess and never an error that stops the benchmark.

The session options and the IO binding are built by the functions below for both the
benchmark (``core.session_options``, ``core._Runner``) and the child, so the two cannot
drift apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

METHOD = (
    "peak resident-set growth (VmHWM - VmRSS baseline) of a fresh child process (sys.executable) that imports "
    "onnxruntime and loads the feeds (baseline), then creates the session with the same options and provider and "
    "runs it once on the same feeds; device memory not counted"
)


# --- shared with the benchmark -----------------------------------------------------------

def make_session_options(ort, spec: dict):
    """``ort.SessionOptions`` from a JSON-able spec (see ``core.session_spec``)."""
    so = ort.SessionOptions()
    for key, value in spec["config"].items():
        so.add_session_config_entry(key, value)
    so.log_severity_level = spec["log_severity"]
    so.intra_op_num_threads = spec["intra_op"]
    so.inter_op_num_threads = spec["inter_op"]
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


def bind_io(ort, session, feeds: dict, device: str, device_id: int, include_copies: bool):
    """An IO binding of ``feeds`` (on ``device`` unless ``include_copies``) and the arrays it points into."""
    import numpy as np

    keep: list = []
    io = session.io_binding()
    for name, arr in feeds.items():
        arr = np.ascontiguousarray(arr)
        keep.append(arr)
        if include_copies:
            io.bind_cpu_input(name, arr)  # host memory: copied to the device inside every run
        else:
            ov = ort.OrtValue.ortvalue_from_numpy(arr, device, device_id)
            keep.append(ov)
            io.bind_ortvalue_input(name, ov)
    out_device = "cpu" if include_copies else device
    for out in session.get_outputs():
        io.bind_output(out.name, out_device, device_id)
    io.synchronize_inputs()
    return io, keep


# --- the child ----------------------------------------------------------------------------

def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1])
    return None


def _measure(spec: dict) -> dict:
    import numpy as np
    import onnxruntime as ort

    with np.load(spec["feeds"], allow_pickle=False) as data:
        feeds = {k: np.ascontiguousarray(data[k]) for k in data.files}
    base = _status_kb("VmRSS")
    if base is None:
        return {"error": "/proc/self/status is not readable here (peak memory needs Linux)"}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS, so the peak below is the session's own
    except OSError as e:
        return {"error": f"cannot reset the memory high-water mark (/proc/self/clear_refs: {e.strerror or e})"}
    so = make_session_options(ort, spec["session"])
    session = ort.InferenceSession(spec["model"], so, providers=spec["providers"], provider_options=spec["provider_options"])
    binding = spec.get("io_binding")
    if binding is None:
        outputs = session.run(None, feeds)
    else:
        io, keep = bind_io(ort, session, feeds, binding["device"], binding["device_id"], binding["include_copies"])
        session.run_with_iobinding(io)
        io.synchronize_outputs()
        outputs = io.get_outputs()
    hwm = _status_kb("VmHWM")
    del outputs
    if hwm is None:
        return {"error": "VmHWM is missing from /proc/self/status"}
    return {"peak_mb": round(max(0, hwm - base) / 1024, 2), "baseline_mb": round(base / 1024, 2)}


def child_main(argv: list[str]) -> int:
    """``python memprobe.py SPEC.json``: print one JSON line, ``{"peak_mb": ...}`` or ``{"error": ...}``."""
    try:
        with open(argv[1], encoding="utf-8") as f:
            spec = json.load(f)
        result = _measure(spec)
    except Exception as e:  # noqa: BLE001 - reported to the parent as a note, never a crash
        text = str(e).strip()
        result = {"error": f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}".rstrip(": ")}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


# --- the parent ---------------------------------------------------------------------------

def probe(spec: dict, spec_path: str, *, timeout_s: float) -> tuple[float | None, str | None]:
    """Run the child on ``spec`` (written to ``spec_path``): ``(peak MB, None)`` or ``(None, why not)``."""
    if not sys.executable:
        return None, "no Python executable to start a child process with (sys.executable is empty)"
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    try:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), spec_path],
            capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return None, f"the memory probe did not finish within {timeout_s:.0f} s"
    except OSError as e:
        return None, f"cannot start the memory probe: {e.strerror or e}"
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except ValueError:
        result = None
    if not isinstance(result, dict):
        err = proc.stderr.strip().splitlines()
        return None, f"the memory probe exited with status {proc.returncode}" + (f": {err[-1][:200]}" if err else "")
    if "error" in result:
        return None, f"the memory probe failed: {result['error']}"
    peak = result.get("peak_mb")
    if not isinstance(peak, (int, float)) or isinstance(peak, bool):
        return None, "the memory probe gave no number"
    return float(peak), None


if __name__ == "__main__":
    # Run as a script: this file's folder is sys.path[0] and holds modules (stats, plot,
    # report...) that must not shadow anything numpy or onnxruntime imports.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.exit(child_main(sys.argv))
