"""User-facing errors.

Anything the user can cause (a bad path, a broken model, a wrong option) raises
:class:`OnnxoptError`; the CLI prints its message as one line on stderr and exits
with status 2. Any other exception is a bug in onnxopt.
"""

from __future__ import annotations


class OnnxoptError(Exception):
    """An error caused by the input or the options, with a one-line message."""


class VerificationError(OnnxoptError):
    """A model failed the safety net (checker, runtime load, or numeric comparison)."""
