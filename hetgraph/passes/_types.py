"""What every pass takes and returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from hetgraph.spec import ModelSpec

# The graphs a pass may run on: the torch-level graph dynamo hands the backend, and torch.export's
# aten graph. Each pass declares which (`applies_to`); the runner picks the passes for a graph.
DYNAMO, EXPORT = "dynamo", "export"
GRAPHS = (DYNAMO, EXPORT)


def applies_to(*graphs: str):
    """Declare the graphs a pass runs on: `@applies_to(DYNAMO, EXPORT)` above the pass function."""
    unknown = [g for g in graphs if g not in GRAPHS]
    if unknown or not graphs:
        raise ValueError(f"applies_to{graphs}: allowed graphs are {list(GRAPHS)}")

    def mark(fn):
        fn.applies_to = frozenset(graphs)
        return fn

    return mark


@dataclass
class PassContext:
    """Read-only facts a pass may use: the LayerSpec table and the layer of each graph input that is
    a layer's parameter. `spec` is None for a model hetgraph did not build; the runner then runs no
    pass at all, so a pass may rely on it."""

    spec: ModelSpec | None
    input_layers: dict[str, int] = field(default_factory=dict)  # placeholder name -> layer index
    # Whether the compiled graph will be differentiated (grad mode on and an input requires grad):
    # AOT autograd then builds a joint graph, and a pass must keep the backward exact too.
    needs_grad: bool = False


@dataclass
class PassResult:
    gm: fx.GraphModule
    changed: bool
    # Per layer (None: outside layers) what the pass did, in a few words.
    report: dict[int | None, str] = field(default_factory=dict)
    # Per layer (None: whole graph) what the pass would not do, and why.
    refused: dict[int | None, str] = field(default_factory=dict)
