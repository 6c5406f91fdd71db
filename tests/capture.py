"""Capture the FX graph dynamo hands a backend, without compiling it."""

from __future__ import annotations

import torch
import torch.fx as fx

from hetgraph.backend import context_from_inputs
from hetgraph.passes import PassContext


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
    import copy

    return fx.GraphModule(gm, copy.deepcopy(gm.graph))


def outputs(gm: fx.GraphModule, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        out = gm(*inputs)
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
