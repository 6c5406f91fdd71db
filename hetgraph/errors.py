"""The errors every floor of hetgraph raises; this module imports nothing of hetgraph's."""

from __future__ import annotations


class HeteroConfigError(ValueError):
    """An invalid heterogeneous configuration or checkpoint; the message says where and what is allowed."""


class CheckpointError(HeteroConfigError):
    """A checkpoint whose files or tensors do not match the model its config describes."""
