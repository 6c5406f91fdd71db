"""The errors every floor of hetgraph raises; this module imports nothing of hetgraph's."""

from __future__ import annotations


class HeteroConfigError(ValueError):
    """An invalid heterogeneous configuration or checkpoint; the message says where and what is allowed."""


class CheckpointError(HeteroConfigError):
    """A checkpoint whose files or tensors do not match the model its config describes."""


class PassError(RuntimeError):
    """A hetgraph pass raised: names the pass, the graph kind, and the passes that ran before it."""

    def __init__(self, pass_name: str, before: list[str], graph: str, cause: BaseException):
        self.pass_name = pass_name
        first = str(cause).splitlines()[0] if str(cause) else ""
        after = f" (after {', '.join(before)})" if before else " (the first pass)"
        super().__init__(f"pass {pass_name} failed on a {graph} graph{after}: {type(cause).__name__}: {first}")
