"""User passes from their own modules.

``--plugin my_module`` (or ``plugins=["my_module"]`` in the API) imports the module.
A module joins in either way:
- it calls :func:`onnxopt.register_pass` itself (its passes then have its names), or
- it defines ``onnx_ir.passes.PassBase`` subclasses at top level, which are registered
  under their class name in kebab-case (``FoldMyOp`` -> ``fold-my-op``).
Installed packages can also expose passes through the ``onnxopt.passes`` entry-point
group (each entry point names a module or a pass class).
Loading a plugin again (or one imported before) registers nothing new and returns the
names its passes are registered under.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import os
import re
import sys

import onnx_ir as ir

from onnxopt.errors import OnnxoptError


def _kebab(name: str) -> str:
    name = re.sub(r"Pass$", "", name) or name
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", name).lower()


def load_plugin(spec: str) -> list[str]:
    """Import a plugin (module name or path to a .py file); return the names of its passes."""
    from onnxopt.passes import registry

    registry._ensure_loaded()
    before = dict(registry.PASSES)
    try:
        if spec.endswith(".py") or os.path.sep in spec:
            if not os.path.isfile(spec):
                raise OnnxoptError(f"plugin {spec!r}: no such file")
            name = "onnxopt_plugin_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(spec))[0])
            mod_spec = importlib.util.spec_from_file_location(name, spec)
            if mod_spec is None or mod_spec.loader is None:
                raise OnnxoptError(f"plugin {spec!r}: not a Python file (expected a .py module)")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            _run_plugin_code(spec, lambda: mod_spec.loader.exec_module(module))
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())  # `--plugin my_module` finds ./my_module.py
            module = _run_plugin_code(spec, lambda: importlib.import_module(spec))
    except OnnxoptError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise OnnxoptError(f"plugin {spec!r} failed to import: {type(e).__name__}: {msg}") from None
    added = {n for n, info in registry.PASSES.items() if before.get(n) is not info}
    for n in added:  # a plugin's own register_pass calls: say where they came from
        if registry.PASSES[n].source == "onnxopt":
            registry.PASSES[n] = dataclasses.replace(registry.PASSES[n], source=spec)
    added |= _run_plugin_code(spec, lambda: _register_classes(module, spec))
    # A cached module (imported before) registers nothing new: its passes are those
    # whose factory it defines.
    names = [
        n for n, info in registry.PASSES.items()
        if n in added or getattr(info.factory, "__module__", None) == module.__name__
    ]
    if not names:
        raise OnnxoptError(f"plugin {spec!r} defines no pass (no onnx_ir.passes.PassBase subclass, no register_pass call)")
    return names


def _run_plugin_code(spec: str, fn):
    """Run a plugin's code: a name clash or a ``sys.exit`` in it becomes one error naming it."""
    try:
        return fn()
    except OnnxoptError as e:
        raise OnnxoptError(f"plugin {spec!r}: {e}") from None
    except SystemExit as e:
        raise OnnxoptError(f"plugin {spec!r} called sys.exit({e.code!r}) while loading") from None


def _register_classes(module, source: str) -> set[str]:
    """Register the module's own top-level pass classes not registered yet, in kebab-case."""
    from onnxopt.passes import registry

    added = set()
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if (
            issubclass(obj, ir.passes.PassBase)
            and obj.__module__ == module.__name__
            and not inspect.isabstract(obj)
            and not any(p.factory is obj for p in registry.PASSES.values())
        ):
            name = _kebab(obj.__name__)
            doc = (obj.__doc__ or "").strip().splitlines()
            registry.register_pass(name, doc[0] if doc else f"plugin pass from {source}", source=source)(obj)
            added.add(name)
    return added


def load_entry_point_plugins() -> None:
    from importlib.metadata import entry_points

    for ep in entry_points(group="onnxopt.passes"):
        try:
            obj = ep.load()
        except Exception as e:  # a broken third-party package must not break onnxopt
            import logging

            logging.getLogger("onnxopt").warning("entry point %s failed to load: %s", ep.name, e)
            continue
        import logging

        log = logging.getLogger("onnxopt")
        try:
            if inspect.ismodule(obj):
                # A module that calls register_pass did so on import; one that only defines
                # pass classes gets them registered as --plugin would.
                _register_classes(obj, ep.value)
            elif isinstance(obj, type) and issubclass(obj, ir.passes.PassBase):
                from onnxopt.passes.registry import register_pass

                doc = (obj.__doc__ or "").strip().splitlines()
                register_pass(ep.name, doc[0] if doc else "plugin pass", source=ep.value)(obj)
            else:
                log.warning("entry point %s (%s) is neither a module nor a pass class; ignored", ep.name, ep.value)
        except OnnxoptError as e:  # a clash with a built-in name: said, not silently dropped
            log.warning("entry point %s (%s) not registered: %s", ep.name, ep.value, e)
