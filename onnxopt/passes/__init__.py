"""Graph passes. Each module registers its passes with :func:`register_pass`."""

from onnxopt.passes.manager import PassManager, PassStat, PipelineResult
from onnxopt.passes.registry import (
    PassInfo,
    all_passes,
    all_presets,
    get_pass,
    preset_passes,
    register_pass,
    register_preset,
)

register_preset(
    "default",
    "Safe everywhere: folding, cleanup and exact fusions into standard ONNX ops; keeps opset and dynamic dims",
    None,
)
register_preset(
    "cleanup",
    "Only remove what is unused or redundant (Identity, dead nodes, duplicates); no arithmetic changes",
    ["lift-constants", "identity-elimination", "cse", "dedup-initializers", "remove-unused", "topological-sort"],
)

__all__ = [
    "PassInfo",
    "PassManager",
    "PassStat",
    "PipelineResult",
    "all_passes",
    "all_presets",
    "get_pass",
    "preset_passes",
    "register_pass",
    "register_preset",
]
