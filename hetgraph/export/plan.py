"""What to trace: the request checked, and per program the wrapper, example inputs and dynamic shapes."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from hetgraph.contract import model_spec
from hetgraph.export.wrappers import _Decode, _Logits, _Prefill


class Job(NamedTuple):
    """One program to trace: `torch.export.export(wrapper, args, dynamic_shapes=dynamic_shapes)`."""

    name: str  # "prefill" / "decode": the program's file stem and its metadata's "program"
    wrapper: nn.Module
    args: tuple
    dynamic_shapes: tuple | None


def _example_ids(input_ids, batch_size: int, max_len: int, device) -> torch.Tensor:
    """A contiguous prompt of at least 2 tokens: export specializes a dimension traced at size 1."""
    if input_ids is None or input_ids.shape[1] < 2:
        return torch.zeros((batch_size, min(2, max_len)), dtype=torch.long, device=device)
    return input_ids.to(device).contiguous()


def _check_request(input_ids, decode, batch_size, max_cache_len, max_positions) -> tuple[int, int]:
    """(batch_size, longest prompt) the programs will serve, or a ValueError saying why not."""
    if input_ids is not None and (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2):
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"export: input_ids must be a [batch, prompt_len] tensor, got {shape}")
    if decode and max_cache_len is None:
        raise ValueError("export: decode=True needs max_cache_len (the positions each full-attention layer holds)")
    for name, value in (("batch_size", batch_size), ("max_cache_len", max_cache_len)):
        if value is not None and value <= 0:
            raise ValueError(f"export: {name}={value} must be positive")
    given_batch = None if input_ids is None else input_ids.shape[0]
    if batch_size is not None and given_batch is not None and batch_size != given_batch:
        shape = tuple(input_ids.shape)
        raise ValueError(f"export: input_ids has batch {given_batch} (shape {shape}), batch_size={batch_size}")
    max_len = min(max_cache_len or max_positions, max_positions)
    if input_ids is not None and input_ids.shape[1] > max_len:
        limit = f"max_cache_len={max_cache_len}" if max_cache_len else f"max_position_embeddings={max_positions}"
        raise ValueError(
            f"export: input_ids has {input_ids.shape[1]} tokens (shape {tuple(input_ids.shape)}); "
            f"{limit} serves at most {max_len}"
        )
    return batch_size or given_batch or 1, max_len


def _plan(model, input_ids, decode, batch_size, max_cache_len) -> tuple[list[Job], dict]:
    """The programs to trace, and what they serve (the metadata shared by every program)."""
    spec = model_spec(model)
    max_positions = model.config._getattr_without_heterogeneous_validation("max_position_embeddings")
    batch, max_len = _check_request(input_ids, decode, batch_size, max_cache_len, max_positions)
    example = _example_ids(input_ids, batch, max_len, model.device)
    prompt_dims = ({1: torch.export.Dim.AUTO(min=1, max=max_len)},)
    mamba = [s.index for s in spec if s.has_mamba]
    if mamba:
        # The stock chunked scan guards on the number of chunks, which export's range constraints
        # do not record (a program traced at one chunk claims longer prompts, then fails on them):
        # the prefill serves exactly the example's prompt length.
        if input_ids is None:
            raise ValueError(
                f"export: layers {mamba} are mamba mixers, whose prefill serves one prompt length: "
                f"pass input_ids of that length"
            )
        prompt_dims = None
    meta = {"batch_size": batch, "max_prompt_len": max_len, "max_cache_len": max_cache_len}
    meta["vocab_size"] = spec.vocab_size
    if not decode:
        return [Job("prefill", _Logits(model), (example,), prompt_dims)], meta
    prefill = _Prefill(model, batch, max_cache_len)
    meta["state"] = {name: list(shape) for name, (shape, _) in prefill.state_layout().items()}
    step_ids = torch.zeros((batch, 1), dtype=torch.long, device=model.device)
    decode_step = _Decode(model, batch, max_cache_len)
    state = prefill.new_state()
    return [Job("prefill", prefill, (example,), prompt_dims), Job("decode", decode_step, (step_ids, state), None)], meta
