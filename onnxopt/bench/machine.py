"""What the numbers were measured on: CPU, cores, memory, GPU, package versions.

(Peak memory per model is measured in a child process: see ``memprobe``.)
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def cpu_model() -> str:
    text = _read("/proc/cpuinfo") or ""
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    if m:
        return m.group(1).strip()
    return platform.processor() or platform.machine() or "unknown"


@functools.lru_cache(maxsize=1)
def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings counted once).

    ``/proc/cpuinfo`` pairs (physical id, core id) identify a core; CPUs outside the
    process's affinity mask (taskset, cgroup cpusets) are not counted.
    """
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        allowed = None
    text = _read("/proc/cpuinfo")
    cores: set[tuple[str, str]] = set()
    if text:
        for block in text.strip().split("\n\n"):
            fields = dict(
                (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in block.splitlines()) if k.strip()
            )
            if "processor" not in fields:
                continue
            if allowed is not None and int(fields["processor"]) not in allowed:
                continue
            cores.add((fields.get("physical id", "0"), fields.get("core id", fields["processor"])))
    if cores:
        return len(cores)
    logical = len(allowed) if allowed else (os.cpu_count() or 1)
    return max(1, logical)


def logical_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def memory_total_mb() -> float | None:
    text = _read("/proc/meminfo") or ""
    m = re.search(r"^MemTotal:\s+(\d+) kB", text, re.M)
    return round(int(m.group(1)) / 1024, 1) if m else None


def gpus() -> list[dict]:
    """GPUs as nvidia-smi reports them (name, driver, memory); empty without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        proc = subprocess.run(
            [exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in proc.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3:
            try:
                mem = float(parts[2])
            except ValueError:
                mem = None
            found.append({"name": parts[0], "driver": parts[1], "memory_mb": mem})
    return found


def machine_info() -> dict:
    return {
        "cpu": cpu_model(),
        "physical_cores": physical_cores(),
        "logical_cpus": logical_cpus(),
        "memory_mb": memory_total_mb(),
        "gpus": gpus(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "hostname": platform.node(),
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions() -> dict:
    import numpy
    import onnx
    import onnxruntime

    ort_dist = next(
        (
            d
            for d in ("onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml", "onnxruntime-rocm", "onnxruntime-qnn", "onnxruntime")
            if _version(d)
        ),
        None,
    )
    return {
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_dist": ort_dist,
        "onnx": onnx.__version__,
        "numpy": numpy.__version__,
        "onnxopt": _version("onnxopt"),
        "onnx_ir": _version("onnx-ir"),
    }
