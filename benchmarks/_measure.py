"""Run a command in a child process and measure its own peak memory.

Shared by the benchmark scripts: the child's peak resident set comes from ``os.wait4``'s
``ru_maxrss``, so each measured run has its own peak, not the parent's. Output goes to
temporary files, not pipes, so a chatty child cannot block on a full pipe while we wait.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time


def run_measured(argv: list[str], timeout: float) -> dict:
    """Returns rc (int, or "timeout"), seconds, peak_rss (bytes), stdout, stderr."""
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as out, tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                status = None
                break
            time.sleep(0.2)
        proc.returncode = 0  # reaped by wait4 already
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    rc = os.waitstatus_to_exitcode(status) if status is not None else "timeout"
    return {"rc": rc, "seconds": seconds, "peak_rss": usage.ru_maxrss * 1024, "stdout": stdout, "stderr": stderr}
