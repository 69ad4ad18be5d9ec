"""``optimize``: the graph-rewrite pipeline with the safety net, as one function.

The CLI command ``onnxopt optimize`` is a thin wrapper over :func:`optimize_file`.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.errors import OnnxoptError
from onnxopt.inputs import load_npz_inputs, make_sample_inputs, validate_feeds
from onnxopt.model_io import check_output_path, load_model, save_model
from onnxopt.passes.manager import PassManager, PassSpec, PipelineResult
from onnxopt.passes.registry import preset_iterates, preset_passes
from onnxopt.plugins import load_plugin
from onnxopt.verify import Verifier, check_model, default_tolerances

ModelLike = ir.Model | str | os.PathLike


def sample_feeds(
    model: ir.Model,
    *,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    inputs: str | os.PathLike | Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
    count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """Feeds for verification: the user's (.npz path, a dict, or a list of dicts) or generated."""
    if inputs is None:
        return [make_sample_inputs(model, shapes, seed=i) for i in range(count)]
    if isinstance(inputs, (str, os.PathLike)):
        return [load_npz_inputs(inputs, model)]
    if isinstance(inputs, Mapping):
        feeds = [dict(inputs)]
    elif isinstance(inputs, Sequence) and all(isinstance(f, Mapping) for f in inputs):
        feeds = [dict(f) for f in inputs]
    else:
        raise OnnxoptError(f"inputs: expected an .npz path, a feed dict {{input name: array}} or a list of them, "
                           f"got {type(inputs).__name__}")
    for f in feeds:
        validate_feeds(model, f)
    return feeds


def _as_model(model: ModelLike) -> ir.Model:
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    if not isinstance(model, (str, os.PathLike)):
        raise OnnxoptError(f"model: expected a path or an onnx_ir.Model, got {type(model).__name__}")
    return load_model(model)


def optimize(
    model: ModelLike,
    *,
    preset: str = "default",
    passes: Sequence[PassSpec] | None = None,
    verify: str = "final",
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    inputs=None,
    plugins: Sequence[str] = (),
    rtol: float | None = None,
    atol: float | None = None,
    progress: Callable[[str], None] | None = None,
    target_opset: int | None = None,
) -> PipelineResult:
    """Optimize a model (path, ``onnx_ir.Model`` or ``onnx.ModelProto``); the input is never modified.

    ``passes`` (names, pass instances or classes) replaces the preset when given.
    ``target_opset``: first convert the default-domain opset up to this version (the
    ``upgrade-opset`` pass), so fusions into newer ops (LayerNormalization, Gelu) can apply.
    ``verify``: "final" (check the result, bisect and roll back a breaking pass),
    "each" (check after every pass), or "off". ``rtol``/``atol``: the safety net's
    tolerances, by default 1e-4/1e-5, or 2e-3/1e-3 for a float16 output (bfloat16: 1.6e-2/8e-3).
    Returns a :class:`PipelineResult` with ``.model`` and per-pass ``.stats``.
    """
    from onnxopt import arguments as arg

    arg.choice("verify", verify, ("final", "each", "off"))
    rtol = arg.number("rtol", rtol, optional=True)
    atol = arg.number("atol", atol, optional=True)
    if not ((rtol is None or rtol >= 0) and (atol is None or atol >= 0)):
        raise OnnxoptError(f"tolerances must be >= 0 (got rtol {rtol}, atol {atol})")
    target_opset = arg.number("target_opset", target_opset, low=1, integer=True, optional=True)
    shapes = arg.shapes("shapes", shapes)
    passes = None if passes is None else arg.names("passes", [passes] if isinstance(passes, (ir.passes.PassBase, type)) else passes)
    for plugin in arg.names("plugins", plugins):
        load_plugin(plugin)
    ir_model = _as_model(model)
    rtol, atol, loosened_for = default_tolerances(ir_model, rtol, atol)
    specs = list(passes) if passes is not None else preset_passes(preset)
    # A preset registered with iterate=False runs once (its passes may not be idempotent);
    # a preset or --passes list otherwise repeats until nothing changes (capped).
    iterate = True if passes is not None else preset_iterates(preset)
    if not specs:
        raise OnnxoptError("no passes to run")
    if target_opset is not None:
        from onnxopt.passes.upgrade_opset import check_target_opset, upgrade_pass_info

        check_target_opset(ir_model, target_opset)
        specs = [upgrade_pass_info(target_opset), *specs]
    verifier = None
    if verify != "off":
        feeds = sample_feeds(ir_model, shapes=shapes, inputs=inputs)
        verifier = Verifier.from_model(ir_model, feeds, rtol=rtol, atol=atol)
    elif shapes:
        from onnxopt.inputs import check_input_names

        check_input_names(ir_model, list(shapes))
    from onnxopt.graph import annotated_intermediates, drop_new_annotations

    annotated = annotated_intermediates(ir_model)
    manager = PassManager(specs, verifier=verifier, verify=verify, iterate=iterate, progress=progress)
    result = manager.run(ir_model)
    drop_new_annotations(result.model, annotated)
    check_model(result.model)
    if verify == "off":
        from onnxopt.errors import VerificationError
        from onnxopt.verify import check_loads

        try:
            check_loads(result.model, ir_model)
        except VerificationError as e:
            raise OnnxoptError(f"the optimized model is broken, not written: {e} (--verify finds the pass)") from None
    result.rtol, result.atol = rtol, atol
    if verifier is not None:
        for name, peak in verifier.unseen_outputs():
            result.warnings.append(
                f"output {name!r} stays below {peak:.2g} on the sample inputs, within atol {atol:g}: the check "
                "cannot see a change in it; verify on real inputs (--inputs FILE.npz) or at the sizes the model "
                "is used at (--shape)"
            )
        for name, bad, size in verifier.nonfinite_outputs():
            result.warnings.append(
                f"output {name!r}: {bad} of {size} values are NaN or inf on the sample inputs, so they are "
                "not checked; verify on real inputs (--inputs)"
            )
    if loosened_for and verify != "off":
        result.warnings.append(f"verified within rtol {rtol:g}, atol {atol:g}: the {loosened_for} rounds at "
                               "half precision (--rtol/--atol to set them)")
    return result


def optimize_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    **kwargs,
) -> PipelineResult:
    """Load, optimize and atomically save; options as in :func:`optimize`."""
    check_output_path(output_path, input_path)
    model = load_model(input_path)
    result = optimize(model, **kwargs)
    save_model(result.model, pathlib.Path(output_path))
    return result
