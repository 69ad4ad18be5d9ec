"""The registry of named passes and presets.

A pass is an ``onnx_ir.passes`` pass (``call(model) -> PassResult``), so passes from
onnx-ir and onnxscript plug into our pipelines and ours into theirs. Registering one
gives it a name and a one-line description for ``onnxopt passes``, ``--passes`` and
the statistics table::

    @register_pass("fuse-foo", "Fuse Foo into Bar", preset_order=300)
    class FuseFoo(ir.passes.InPlacePass):
        def call(self, model):
            ...
            self.rewrites = count          # optional: shown in the statistics
            return ir.passes.PassResult(model, modified=count > 0)

``preset_order`` puts the pass in the ``default`` preset at that position (lower runs
first), so a pass module needs no edit anywhere else to join the pipeline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import onnx_ir as ir

from onnxopt.errors import OnnxoptError

PassFactory = Callable[[], ir.passes.PassBase]


@dataclasses.dataclass(frozen=True)
class PassInfo:
    name: str
    description: str
    factory: PassFactory
    fixed_point: bool = False  # re-run until it changes nothing (capped)
    preset_order: float | None = None  # position in the `default` preset, None = not in it
    source: str = "onnxopt"  # "onnxopt", "onnx-ir", or the plugin module


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    passes: tuple[str, ...] | None  # None: computed from preset_order (the default preset)
    iterate: bool = True  # repeat the whole pipeline until nothing changes (capped)


PASSES: dict[str, PassInfo] = {}
PRESETS: dict[str, Preset] = {}


def register_pass(
    name: str,
    description: str,
    *,
    fixed_point: bool = False,
    preset_order: float | None = None,
    source: str = "onnxopt",
    factory: PassFactory | None = None,
):
    """Register a pass class (used as a decorator) or a factory under ``name``."""

    def wrap(cls):
        if factory is None and not (isinstance(cls, type) and issubclass(cls, ir.passes.PassBase)):
            # A plain function failed later with "missing argument 'model'", far from here.
            raise OnnxoptError(
                f"register_pass({name!r}) decorates an onnx_ir.passes.PassBase subclass, not {cls!r}; "
                "for a function that builds a pass use register_pass(name, description, factory=...)"
            )
        new = factory or cls
        if not getattr(new, "__module__", "").startswith("onnxopt.passes."):
            # Built-ins first: a user pass registered before them must meet the name clash
            # here, not break their import later (leaving the registry half loaded).
            _ensure_loaded()
        taken = PASSES.get(name)
        # Re-importing the same plugin file (a new module object of the same name)
        # re-registers the same class; anything else under a taken name is a clash.
        if taken is not None and taken.factory is not new and _origin(taken.factory) != _origin(new):
            module = getattr(taken.factory, "__module__", "?")
            owner = "a built-in pass" if module.startswith("onnxopt.passes.") else f"a pass from {taken.source}"
            raise OnnxoptError(
                f"pass name {name!r} is taken by {owner} ({module}); register yours under another name"
            )
        PASSES[name] = PassInfo(name, description, factory or cls, fixed_point, preset_order, source)
        return cls

    if factory is not None:
        wrap(factory)
        return factory
    return wrap


def _origin(obj) -> tuple[str, str]:
    """(defining file, qualified name): equal for the same class imported again from the
    same file, under the same module name or another (``--plugin x.py`` and ``import x``)."""
    import os
    import sys

    module = getattr(obj, "__module__", None)
    code = getattr(obj, "__code__", None)  # a factory function or lambda
    where = code.co_filename if code is not None else getattr(sys.modules.get(module), "__file__", None)
    if where is None and isinstance(obj, type):
        # A module executed without joining sys.modules: the class's own methods know the file.
        where = next((v.__code__.co_filename for v in vars(obj).values() if hasattr(v, "__code__")), None)
    where = os.path.realpath(where) if where else (module or "?")
    return where, getattr(obj, "__qualname__", type(obj).__name__)


def register_preset(name: str, description: str, passes: list[str] | None, *, iterate: bool = True) -> None:
    PRESETS[name] = Preset(name, description, tuple(passes) if passes is not None else None, iterate)


def preset_passes(name: str) -> list[str]:
    _ensure_loaded()
    if name not in PRESETS:
        raise OnnxoptError(f"unknown preset {name!r} (presets: {', '.join(sorted(PRESETS))})")
    preset = PRESETS[name]
    if preset.passes is not None:
        return list(preset.passes)
    ordered = sorted((p for p in PASSES.values() if p.preset_order is not None), key=lambda p: p.preset_order)
    return [p.name for p in ordered]


def preset_iterates(name: str) -> bool:
    """Whether the preset's pipeline is repeated until nothing changes (``iterate``)."""
    preset_passes(name)  # the unknown-preset error
    return PRESETS[name].iterate


def get_pass(name: str) -> PassInfo:
    _ensure_loaded()
    if name not in PASSES:
        raise OnnxoptError(f"unknown pass {name!r}; run 'onnxopt passes' to list them")
    return PASSES[name]


def find_registered(cls: type) -> PassInfo | None:
    """The registry entry whose factory is the class ``cls`` itself, if any."""
    return next((p for p in PASSES.values() if p.factory is cls), None)


def all_passes() -> list[PassInfo]:
    _ensure_loaded()
    return sorted(PASSES.values(), key=lambda p: (p.preset_order is None, p.preset_order or 0, p.name))


def all_presets() -> list[Preset]:
    _ensure_loaded()
    return [PRESETS[k] for k in sorted(PRESETS)]


_LOADED = False
_LOADING = False


def _ensure_loaded() -> None:
    """Import every module in onnxopt.passes (they register themselves) and entry points."""
    global _LOADED, _LOADING
    if _LOADED or _LOADING:  # (the built-in modules' own register_pass calls come back here)
        return
    _LOADING = True
    try:
        import importlib
        import pkgutil

        import onnxopt.passes as pkg

        for mod in pkgutil.iter_modules(pkg.__path__):
            if not mod.name.startswith("_") and mod.name not in ("registry", "manager"):
                importlib.import_module(f"onnxopt.passes.{mod.name}")
        from onnxopt.plugins import load_entry_point_plugins

        load_entry_point_plugins()
        _LOADED = True
    finally:
        _LOADING = False
