"""hetgraph's FX passes, in the one order they run.

Each pass is `(gm, ctx) -> PassResult`, lives in its own file named after it, and reports per
layer what it changed or refused. `python -m hetgraph passes` prints this list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from hetgraph.passes._graph import ops_per_layer
from hetgraph.passes._types import PassContext, PassResult
from hetgraph.passes.attribute_nodes import attribute_nodes
from hetgraph.passes.eliminate_skipped_blocks import eliminate_skipped_blocks
from hetgraph.passes.group_layer_variants import group_layer_variants
from hetgraph.passes.select_window_masks import select_window_masks
from hetgraph.passes.specialize_shapes import specialize_shapes

PASSES = (
    attribute_nodes,
    eliminate_skipped_blocks,
    select_window_masks,
    specialize_shapes,
    group_layer_variants,
)

__all__ = ["PASSES", "PassContext", "PassResult", "PassRecord", "run_passes", "describe_passes"]


@dataclass
class PassRecord:
    name: str
    changed: bool
    ops_before: dict = field(default_factory=dict)  # layer -> op count
    ops_after: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    refused: dict = field(default_factory=dict)


def run_passes(gm: fx.GraphModule, ctx: PassContext, passes=PASSES) -> tuple[fx.GraphModule, list[PassRecord]]:
    records = []
    for p in passes:
        before = dict(ops_per_layer(gm))
        result = p(gm, ctx)
        gm = result.gm
        records.append(
            PassRecord(p.__name__, result.changed, before, dict(ops_per_layer(gm)), result.report, result.refused)
        )
    return gm, records


def describe_passes() -> str:
    lines = []
    for k, p in enumerate(PASSES, 1):
        doc = (p.__module__ and __import__(p.__module__, fromlist=["_"]).__doc__ or "").strip().splitlines()
        lines.append(f"{k}. {p.__name__}: {doc[0] if doc else ''}")
    return "\n".join(lines)
