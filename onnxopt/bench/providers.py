"""Execution providers: names, availability, options, and where their tensors live.

Users type short names (``cpu``, ``cuda``, ``tensorrt``); ONNX Runtime wants
``CUDAExecutionProvider``. A provider missing from this onnxruntime build is a user
error with one line naming the package to install, raised before any model is loaded.
A provider that is in the build but fails to initialise (no CUDA libraries, no GPU)
makes ONNX Runtime fall back to CPU silently; :func:`check_session_providers` turns
that into an error too, because a "GPU" number measured on the CPU is worse than none.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import onnxruntime as ort

from onnxopt.errors import OnnxoptError

# short name -> (ORT provider name, package that ships it)
PROVIDERS: dict[str, tuple[str, str]] = {
    "cpu": ("CPUExecutionProvider", "onnxruntime"),
    "cuda": ("CUDAExecutionProvider", "onnxruntime-gpu"),
    "tensorrt": ("TensorrtExecutionProvider", "onnxruntime-gpu (and TensorRT libraries)"),
    "openvino": ("OpenVINOExecutionProvider", "onnxruntime-openvino"),
    "dml": ("DmlExecutionProvider", "onnxruntime-directml"),
    "rocm": ("ROCMExecutionProvider", "onnxruntime-rocm"),
    "migraphx": ("MIGraphXExecutionProvider", "onnxruntime-migraphx"),
    "coreml": ("CoreMLExecutionProvider", "onnxruntime (macOS wheel)"),
    "qnn": ("QNNExecutionProvider", "onnxruntime-qnn"),
    "xnnpack": ("XnnpackExecutionProvider", "an onnxruntime build with XNNPACK"),
    "webgpu": ("WebGpuExecutionProvider", "onnxruntime-webgpu"),
}
ALIASES = {"trt": "tensorrt", "gpu": "cuda", "directml": "dml", "ov": "openvino"}

# Where IO binding places inputs/outputs for each provider (OrtValue device names).
# Providers not listed here work on host memory, so IO binding only saves allocations.
DEVICE_OF = {
    "CUDAExecutionProvider": "cuda",
    "TensorrtExecutionProvider": "cuda",
    "ROCMExecutionProvider": "cuda",  # ORT's Python API names HIP devices "cuda" too
    "MIGraphXExecutionProvider": "cuda",
    "DmlExecutionProvider": "dml",
}

# Providers that ONNX Runtime may fall back to for nodes the main one does not take.
_FALLBACKS = {
    "TensorrtExecutionProvider": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "MIGraphXExecutionProvider": ["ROCMExecutionProvider", "CPUExecutionProvider"],
}


def resolve_ep(name: str) -> tuple[str, str]:
    """``cuda`` or ``CUDAExecutionProvider`` -> (``cuda``, ``CUDAExecutionProvider``)."""
    key = name.strip()
    low = key.lower()
    low = ALIASES.get(low, low)
    if low in PROVIDERS:
        return low, PROVIDERS[low][0]
    for short, (full, _) in PROVIDERS.items():
        if key == full or low == full.lower():
            return short, full
    if key.endswith("ExecutionProvider"):  # a provider we have no short name for
        return key[: -len("ExecutionProvider")].lower(), key
    known = ", ".join(PROVIDERS)
    raise OnnxoptError(f"--ep {name!r}: unknown execution provider (known: {known}, or a full name like CUDAExecutionProvider)")


def check_available(full_name: str) -> None:
    """Raise the one-line install hint if this onnxruntime build lacks the provider."""
    available = ort.get_available_providers()
    if full_name in available:
        return
    package = next((pkg for full, pkg in PROVIDERS.values() if full == full_name), None)
    hint = f"; pip install {package}" if package and not package.startswith(("an ", "onnxruntime (")) else (
        f"; it needs {package}" if package else ""
    )
    raise OnnxoptError(
        f"{full_name} is not available in this onnxruntime build (it has {', '.join(available)}){hint}"
    )


def provider_chain(full_name: str) -> list[str]:
    """The provider list for a session: the requested one first, its usual fallbacks after."""
    available = set(ort.get_available_providers())
    chain = [full_name]
    for fb in _FALLBACKS.get(full_name, ["CPUExecutionProvider"]):
        if fb in available and fb not in chain:
            chain.append(fb)
    return chain


def device_of(full_name: str) -> str:
    return DEVICE_OF.get(full_name, "cpu")


@dataclasses.dataclass
class ProviderConfig:
    """One execution provider and the options its sessions get."""

    short: str
    name: str
    options: dict[str, str]

    @property
    def device(self) -> str:
        return device_of(self.name)

    def session_args(self) -> tuple[list[str], list[dict[str, str]]]:
        chain = provider_chain(self.name)
        # A device fallback (CUDA behind TensorRT) must use the same GPU as the main provider.
        shared = {"device_id": self.options["device_id"]} if "device_id" in self.options else {}
        return chain, [
            dict(self.options) if p == self.name else (dict(shared) if p != "CPUExecutionProvider" else {}) for p in chain
        ]


def make_provider_config(
    ep: str,
    *,
    trt_fp16: bool = False,
    trt_int8: bool = False,
    trt_engine_cache: str | os.PathLike | None = None,
    options: Mapping[str, str] | None = None,
) -> ProviderConfig:
    """Resolve a provider name, check it is installed, and build its options."""
    short, full = resolve_ep(ep)
    check_available(full)
    opts: dict[str, str] = {}
    trt_flags = [f for f, on in (("--trt-fp16", trt_fp16), ("--trt-int8", trt_int8), ("--trt-engine-cache", trt_engine_cache)) if on]
    if full == "TensorrtExecutionProvider":
        if trt_fp16:
            opts["trt_fp16_enable"] = "True"
        if trt_int8:
            # With QDQ nodes in the graph TensorRT uses their scales (explicit quantization),
            # so no calibration table is needed.
            opts["trt_int8_enable"] = "True"
        if trt_engine_cache:
            cache = os.fspath(trt_engine_cache)
            if os.path.exists(cache) and not os.path.isdir(cache):
                raise OnnxoptError(f"--trt-engine-cache {cache}: is a file, not a folder")
            parent = os.path.dirname(os.path.abspath(cache))
            if not os.path.isdir(cache) and not os.path.isdir(parent):
                raise OnnxoptError(f"--trt-engine-cache {cache}: its parent folder does not exist")
            os.makedirs(cache, exist_ok=True)  # a cache folder, created like any cache
            opts["trt_engine_cache_enable"] = "True"
            opts["trt_engine_cache_path"] = cache
    elif trt_flags:
        raise OnnxoptError(f"{trt_flags[0]} applies only to --ep tensorrt, not {short}")
    for key, value in (options or {}).items():
        opts[str(key)] = str(value)
    return ProviderConfig(short, full, opts)


def parse_ep_options(specs: Sequence[str] | None) -> dict[str, str]:
    """``KEY=VALUE`` strings -> dict (provider options passed through to ONNX Runtime)."""
    opts: dict[str, str] = {}
    for spec in specs or ():
        key, sep, value = spec.partition("=")
        if not sep or not key.strip():
            raise OnnxoptError(f"--ep-option {spec!r}: expected KEY=VALUE, for example device_id=1")
        opts[key.strip()] = value.strip()
    return opts


def check_session_providers(session: ort.InferenceSession, config: ProviderConfig, label: str) -> None:
    """ONNX Runtime drops a provider that fails to initialise and runs on CPU; refuse that."""
    if config.name not in session.get_providers():
        raise OnnxoptError(
            f"{label}: {config.name} failed to initialise (onnxruntime fell back to {', '.join(session.get_providers())}); "
            "check the GPU driver and the CUDA/cuDNN/TensorRT libraries onnxruntime needs"
        )
