"""Pipeline stages balanced by cost: the exact min-max contiguous split of a layer stack.

Engines split pipeline stages by layer count (vLLM, TensorRT-LLM, transformers' `pp_size`,
torchtitan, Megatron) or by parameters (DeepSpeed); on a heterogeneous stack an even count leaves
the slowest stage 9-40% above the ideal (`../shared/notes/distributed.md` 4.3). `split_layers` (from
`hetgraph.partition`) finds the contiguous split whose most expensive stage is as cheap as possible,
optionally under a per-stage memory cap. `layer_costs` gives the cost vector: measured per-layer
latency from a `LatencyTable` (`hetgraph.profile`) or, without one, each layer's parameter bytes.
"""

from __future__ import annotations

import torch

from hetgraph.contract import model_spec
from hetgraph.errors import HeteroConfigError
from hetgraph.partition import split_layers

__all__ = ["split_layers", "layer_costs", "parameter_bytes"]


def parameter_bytes(layers) -> list[float]:
    """Each layer's parameter bytes (meta tensors count too: only shapes and dtypes are read)."""
    return [float(sum(p.numel() * p.element_size() for p in layer.parameters())) for layer in layers]


def layer_costs(model: torch.nn.Module, table=None, *, phase: str = "decode_ms") -> list[float]:
    """Per-layer cost of a hetgraph-built model: `table`'s measured ms for `phase` ("prefill_ms" or
    "decode_ms") where a `LatencyTable` is given, else each layer's parameter bytes."""
    spec = model_spec(model)
    if table is None:
        return parameter_bytes(getattr(model, spec.adapter.base_model_attr).layers)
    if phase not in ("prefill_ms", "decode_ms"):
        raise ValueError(f"layer_costs: phase={phase!r}; allowed: 'prefill_ms', 'decode_ms'")
    costs = []
    for s in spec:
        row = table.row(s)
        if row is None:
            raise HeteroConfigError(f"layer {s.index}: variant {s.describe()!r} is not in the latency table")
        if getattr(row, phase) < 0:  # a difference of medians below the noise
            raise HeteroConfigError(f"layer {s.index}: the table's {phase} for variant {s.describe()!r} is "
                                    f"{getattr(row, phase):.4f} (< 0: noise); profile again with more repeats")
        costs.append(getattr(row, phase))
    return costs
