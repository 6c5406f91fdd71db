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


@dataclass
class PassResult:
    gm: fx.GraphModule
    changed: bool
    # Per layer (None: outside layers) what the pass did, in a few words.
    report: dict[int | None, str] = field(default_factory=dict)
    # Per layer (None: whole graph) what the pass would not do, and why.
    refused: dict[int | None, str] = field(default_factory=dict)
