"""Run a command in a child process and measure its own peak memory.

Shared by the benchmark scripts. The peak resident set comes from ``os.wait4``'s
``ru_maxrss``, so each measured run has its own peak, not the parent's. But Linux counts
the memory a process had before ``exec`` into its peak, and a child forked (or vforked)
from a benchmark that has already loaded models starts with the parent's whole resident
set (compare_quantizers.py, 1 GB after its MiniLM and det sections, reported 1016 MB for
every calibration run). So the command is started by a small launcher (a bare
``python -S``, ~10 MB) that spawns it, waits for it and reports its ``ru_maxrss``. Output
goes to temporary files, not pipes, so a chatty child cannot block on a full pipe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

# argv: result path, timeout seconds, command...; writes {"status", "maxrss_kb", "timeout"}.
_LAUNCHER = r"""
import json, os, sys, time
out, timeout, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
pid = os.posix_spawnp(argv[0], argv, os.environ)
deadline = time.monotonic() + timeout
timed_out = False
while True:
    got, status, usage = os.wait4(pid, os.WNOHANG)
    if got:
        break
    if time.monotonic() > deadline:
        os.kill(pid, 9)
        got, status, usage = os.wait4(pid, 0)
        timed_out = True
        break
    time.sleep(0.05)
with open(out, "w") as f:
    json.dump({"status": status, "maxrss_kb": usage.ru_maxrss, "timeout": timed_out}, f)
"""


def run_measured(argv: list[str], timeout: float) -> dict:
    """Returns rc (int, or "timeout"), seconds, peak_rss (bytes), stdout, stderr."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxopt-measure-") as tmp:
        result = os.path.join(tmp, "result.json")
        with open(os.path.join(tmp, "out"), "w+") as out, open(os.path.join(tmp, "err"), "w+") as err:
            cmd = [sys.executable, "-S", "-c", _LAUNCHER, result, str(timeout), *argv]
            subprocess.run(cmd, stdout=out, stderr=err, text=True, check=False, timeout=timeout + 60)
            seconds = time.perf_counter() - start
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
        with open(result) as f:
            r = json.load(f)
    rc = "timeout" if r["timeout"] else os.waitstatus_to_exitcode(r["status"])
    return {"rc": rc, "seconds": seconds, "peak_rss": r["maxrss_kb"] * 1024, "stdout": stdout, "stderr": stderr}
