"""Routed mixture-of-experts in plain ops: each token through only the experts its router chose.

Some stock MoE blocks (Llama4's) compute every expert on every token, each token's input scaled by
its router score, which is zero outside the top k: `experts(repeat(x, E) * scores)`, summed over the
experts. `hetgraph.passes.specialize_experts` proves that shape of graph and gives it these
functions instead: the chosen (token, expert) rows sorted by expert, one grouped matmul per
projection over the experts' stacked weights (`expert_matmul`), and the rows added back to their
tokens. Each row is the same product `x[t] * score[t, e]` the dense form computes, and what the
dense form adds for the other experts is exactly zero, so only the matmuls' rounding may differ.
Static shapes (T * k rows), so one graph serves every routing.
"""

from __future__ import annotations

import torch
import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers.grouped_mm_fallback)


def routed_rows(x: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor, num_experts: int):
    """The rows the chosen experts see, sorted by expert: (rows [T*k, H], token of each row, offsets).

    `x` [T, H]; `indices` [T, k] the router's top-k experts (distinct per token); `scores` [T, E] the
    dense router scores. `offsets` [E] (int32) ends each expert's rows, as `torch._grouped_mm` takes them.
    """
    k = indices.shape[1]
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = torch.div(order, k, rounding_mode="floor")
    score = scores.gather(1, indices).reshape(-1)[order]
    rows = x[token] * score[:, None]
    counts = torch.zeros(num_experts, dtype=flat.dtype, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    return rows, token, torch.cumsum(counts, 0).to(torch.int32)


def expert_matmul(rows: torch.Tensor, weight: torch.Tensor):
    """The op that multiplies each expert's rows by its own weight [E, in, out] (the dense form's
    `bmm`, per group), called `(rows, weight, offs=offsets)`: `torch._grouped_mm` where it compiles
    (CUDA, compute capability 9.0+, bfloat16; its meta function takes nothing else), else
    transformers' own opaque `grouped_mm_fallback` (one `mm` per expert that has rows)."""
    if rows.device.type == "cuda" and rows.dtype == weight.dtype == torch.bfloat16:
        if torch.cuda.get_device_capability(rows.device) >= (9, 0):
            return torch._grouped_mm
    return _fallback


def _fallback(rows: torch.Tensor, weight: torch.Tensor, *, offs: torch.Tensor) -> torch.Tensor:
    return torch.ops.transformers.grouped_mm_fallback(rows, weight, offs)


def add_rows(x: torch.Tensor, token: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The routed rows added back to their tokens, [T, H] (the dense form's sum over the experts)."""
    return rows.new_zeros((x.shape[0], rows.shape[1])).index_add_(0, token, rows)
