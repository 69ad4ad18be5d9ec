"""Structured channel pruning (see :mod:`.api` for the pipeline, :mod:`.groups` for the channel spaces)."""

from onnxopt.pruning.api import PruneResult, prune, prune_file
from onnxopt.pruning.groups import ChannelSpace, find_channel_spaces

__all__ = ["ChannelSpace", "PruneResult", "find_channel_spaces", "prune", "prune_file"]
