"""Assertions on torch.fx graphs, for pass and backend tests."""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping

import torch
from torch import fx

_CALLS = ("call_function", "call_method", "call_module")


def _graph(gm: fx.GraphModule | fx.Graph) -> fx.Graph:
    return gm if isinstance(gm, fx.Graph) else gm.graph


def _matches(node: fx.Node, target: Any) -> bool:
    """A string matches `str(node.target)` exactly; an op packet (`aten.mm`) matches each of its overloads."""
    if isinstance(target, str):
        return str(node.target) == target
    if isinstance(target, torch._ops.OpOverloadPacket):
        return getattr(node.target, "overloadpacket", None) is target
    return node.target is target or node.target == target


def count_ops(gm: fx.GraphModule | fx.Graph, target: Any) -> int:
    """How many call nodes of `gm` have `target` (an op, a function, or a string; see `_matches`)."""
    return sum(1 for node in _graph(gm).nodes if node.op in _CALLS and _matches(node, target))


def _found(gm) -> str:
    counts = Counter(str(node.target) for node in _graph(gm).nodes if node.op in _CALLS)
    return "\n".join(f"  {n} x {name}" for name, n in sorted(counts.items())) or "  (no call nodes)"


def assert_ops(gm: fx.GraphModule | fx.Graph, present: Mapping | Iterable = (), absent: Iterable = ()) -> None:
    """Assert each op of `present` appears (exactly `present[op]` times if a mapping) and none of `absent` does."""
    expected = present.items() if isinstance(present, Mapping) else ((op, None) for op in present)
    problems = []
    for op, want in expected:
        n = count_ops(gm, op)
        if (want is None and n == 0) or (want is not None and n != want):
            problems.append(f"{op}: expected {'at least 1' if want is None else want}, found {n}")
    for op in absent:
        n = count_ops(gm, op)
        if n:
            problems.append(f"{op}: expected absent, found {n}")
    if problems:
        raise AssertionError("graph ops mismatch:\n  " + "\n  ".join(problems) + "\nops found:\n" + _found(gm))
