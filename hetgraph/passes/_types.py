"""What every pass takes and returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from hetgraph.spec import ModelSpec


@dataclass
class PassContext:
    """Read-only facts a pass may use: the LayerSpec table (None for a model hetgraph did not build)
    and the layer of each graph input that is a layer's parameter."""

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
