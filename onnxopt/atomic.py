"""Atomic writes for reports (JSON, CSV): temporary file in the same folder, then rename."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile

from onnxopt.errors import OnnxoptError


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    p = pathlib.Path(path)
    if not p.parent.exists():
        raise OnnxoptError(f"{p.parent}: output folder does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp creates 0600; a report should get the usual permissions (0666 - umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def _json_default(obj):
    """numpy scalars and arrays as JSON numbers and lists; anything else as its text."""
    import numpy as np

    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """``data`` as indented JSON (the reports of optimize, quantize and prune)."""
    write_text_atomic(path, json.dumps(data, indent=2, default=_json_default) + "\n")
