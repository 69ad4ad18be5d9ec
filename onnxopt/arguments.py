"""Checks for the Python API's arguments: a wrong type or value is an ``OnnxoptError``.

The CLI's option types already reject these; from Python, ``rtol="1e-3"`` or
``exclude="conv1"`` would otherwise surface as a TypeError deep inside, or worse be taken
apart letter by letter. Each check names the argument and what it expects.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable, Mapping

from onnxopt.errors import OnnxoptError


def number(name: str, value, *, low=None, high=None, low_open=False, high_open=False, integer=False,
           optional=False):
    """A real (or integer) number within [low, high] (open ends as asked); None if optional."""
    if value is None and optional:
        return None
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    if not ok_type:
        raise OnnxoptError(f"{name}={value!r}: expected {kind}")
    if value != value and (low is not None or high is not None):  # NaN passes every comparison
        raise OnnxoptError(f"{name}={value!r}: expected {kind}, not NaN")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        raise OnnxoptError(f"{name}={value!r}: must be {' and '.join(x for x in (lo, hi) if x)}")
    return int(value) if integer else value


def flag(name: str, value) -> bool:
    """A real boolean: "no" or "off" must not quietly mean True (or False)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise OnnxoptError(f"{name}={value!r}: expected True or False")


def choice(name: str, value, options: Iterable) -> object:
    options = list(options)
    if value not in options:
        raise OnnxoptError(f"{name}={value!r}: choose from {', '.join(repr(o) for o in options)}")
    return value


def names(name: str, value) -> list:
    """A list of names; one string is one name (not its letters)."""
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [value]
    if isinstance(value, Mapping) or not isinstance(value, Iterable):
        raise OnnxoptError(f"{name}={value!r}: expected a list of names")
    return list(value)


def shapes(name: str, value) -> dict | None:
    """{input: dims}; the CLI's "x:1x3x224x224" strings are accepted too."""
    if value is None:
        return None
    if isinstance(value, str) or (not isinstance(value, Mapping) and isinstance(value, Iterable)
                                  and all(isinstance(v, str) for v in value)):
        from onnxopt.inputs import parse_shape_specs

        return parse_shape_specs([value] if isinstance(value, str) else list(value))
    if not isinstance(value, Mapping):
        raise OnnxoptError(f"{name}={value!r}: expected {{input name: (dims...)}}")
    out = {}
    for key, dims in value.items():
        if isinstance(dims, str) or not isinstance(dims, Iterable):
            raise OnnxoptError(f"{name}[{key!r}]={dims!r}: expected a tuple of dimensions such as (1, 3, 224, 224)")
        dims = tuple(dims)
        if not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 0 for d in dims):
            raise OnnxoptError(f"{name}[{key!r}]={dims!r}: dimensions must be integers >= 0")
        out[key] = tuple(int(d) for d in dims)
    return out
