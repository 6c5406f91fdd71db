"""hetgraph's FX passes, in the one order they run, and the runner.

Each pass is `(gm, ctx) -> PassResult`, lives in its own file named after it, declares the graphs
it runs on (`@applies_to(DYNAMO, EXPORT)`), and reports per layer what it changed or refused.
`python -m hetgraph passes` prints this list.

The runner owns what every pass would otherwise repeat: it picks the passes for the graph at hand,
runs none without a LayerSpec table, times each pass, and re-raises a failure as `PassError`
naming the pass and those that ran before it (as torch's `fx.passes.infra` pass manager does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable

import torch.fx as fx

from hetgraph.errors import PassError
from hetgraph.passes._graph import ops_per_layer
from hetgraph.passes._types import DYNAMO, EXPORT, PassContext, PassResult, applies_to
from hetgraph.passes.attribute_nodes import attribute_nodes
from hetgraph.passes.eliminate_skipped_blocks import eliminate_skipped_blocks
from hetgraph.passes.group_layer_variants import group_layer_variants
from hetgraph.passes.select_window_masks import select_window_masks
from hetgraph.passes.specialize_attention import specialize_attention
from hetgraph.passes.specialize_experts import specialize_experts
from hetgraph.passes.specialize_shapes import specialize_shapes

PASSES = (
    attribute_nodes,
    eliminate_skipped_blocks,
    select_window_masks,
    specialize_shapes,
    specialize_attention,
    specialize_experts,
    group_layer_variants,
)

__all__ = [
    "PASSES",
    "DYNAMO",
    "EXPORT",
    "PassContext",
    "PassResult",
    "PassRecord",
    "applies_to",
    "passes_for",
    "run_passes",
    "describe_passes",
]

NO_TABLE = "model not built by hetgraph: no LayerSpec table, nothing to specialize"


@dataclass
class PassRecord:
    name: str
    changed: bool
    ops_before: dict = field(default_factory=dict)  # layer -> op count
    ops_after: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    refused: dict = field(default_factory=dict)
    seconds: float = 0.0  # wall time of the pass


def passes_for(graph: str, names: Iterable[str] | None = None) -> tuple:
    """The passes that run on a `graph` (DYNAMO / EXPORT), in PASSES order; `names` narrows them."""
    wanted = None if names is None else set(names)
    return tuple(p for p in PASSES if graph in p.applies_to and (wanted is None or p.__name__ in wanted))


def run_passes(
    gm: fx.GraphModule, ctx: PassContext, *, graph: str = DYNAMO, names: Iterable[str] | None = None
) -> tuple[fx.GraphModule, list[PassRecord]]:
    """Run the passes for `graph` (those in `names`, if given) on `gm`; one record per pass."""
    passes = passes_for(graph, names)
    if ctx.spec is None:
        return gm, [PassRecord(p.__name__, False, refused={None: NO_TABLE}) for p in passes]
    records: list[PassRecord] = []
    for p in passes:
        before = dict(ops_per_layer(gm))
        start = time.perf_counter()
        try:
            result = p(gm, ctx)
        except Exception as e:
            done = [r.name for r in records]
            raise PassError(p.__name__, done, graph, e) from e
        gm = result.gm
        records.append(
            PassRecord(
                p.__name__,
                result.changed,
                before,
                dict(ops_per_layer(gm)),
                result.report,
                result.refused,
                seconds=time.perf_counter() - start,
            )
        )
    return gm, records


def describe_passes() -> str:
    lines = []
    for k, p in enumerate(PASSES, 1):
        doc = (p.__module__ and __import__(p.__module__, fromlist=["_"]).__doc__ or "").strip().splitlines()
        where = "/".join(g for g in (DYNAMO, EXPORT) if g in p.applies_to)
        lines.append(f"{k}. {p.__name__} [{where}]: {doc[0] if doc else ''}")
    return "\n".join(lines)
