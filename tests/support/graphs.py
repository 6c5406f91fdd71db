"""torch.fx helpers for pass and backend tests: capture the graph dynamo hands a backend (without
compiling it), copy and run a graph, and count or assert the ops it holds."""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any, Iterable, Mapping

import torch
from torch import fx

from hetgraph.contract import context_from_inputs
from hetgraph.passes import PassContext

_CALLS = ("call_function", "call_method", "call_module")


# ---- capture, copy, run ---------------------------------------------------------------------------


def capture(model, *args, grad: bool = False, **kwargs) -> tuple[fx.GraphModule, list, PassContext]:
    """The single graph of `model(*args, **kwargs)` (fullgraph), its example inputs, and its pass
    context, as the backend sees them: for inference unless `grad` (then passes keep the backward exact)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs), context_from_inputs(gm, example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        torch.compile(model, backend=backend, fullgraph=True)(*args, **kwargs)
    assert len(graphs) == 1, f"expected one graph, got {len(graphs)}"
    return graphs[0]


def copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    return fx.GraphModule(gm, copy.deepcopy(gm.graph))


def outputs(gm: fx.GraphModule, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        out = gm(*inputs)
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def assert_same_outputs(gm: fx.GraphModule, reference: fx.GraphModule, inputs) -> None:
    """`gm` computes exactly what `reference` (the graph before a pass rewrote it) does."""
    got, want = outputs(gm, inputs), outputs(reference, inputs)
    assert len(got) == len(want), f"{len(got)} outputs, the unrewritten graph has {len(want)}"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---- ops ------------------------------------------------------------------------------------------


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
