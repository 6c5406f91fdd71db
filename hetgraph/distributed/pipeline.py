"""Pipeline stages of a heterogeneous model on `torch.distributed.pipelining`, and greedy / sampled
generation through them.

A stage is the model with every layer outside its range removed (`skip: [attention, mlp]`: no
weights, no KV cache), so the stock forward, hetgraph's mask and RoPE hooks and its global layer
indices stay as they are; the first stage embeds, the last applies the final norm and the head.
From a checkpoint path only the stage's layers are read (`from_pretrained` with that plan).
Pitfalls this module avoids (`../shared/notes/distributed.md` 1.3): every `PipelineStage` gets its
example inputs and outputs (without them the stage runs an extra forward that writes the cache),
and each input shape gets its own `PipelineStage` (the prefill's reused for decode silently gives
wrong tokens).
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import torch.distributed as dist

from hetgraph.cache import make_cache
from hetgraph.configs import model_config_dict
from hetgraph.contract import model_spec
from hetgraph.distributed.split import layer_costs, parameter_bytes, split_layers

REMOVED = {"skip": ["attention", "mlp"]}


def stage_ranges(num_layers: int, num_stages: int, split="balanced", costs: Sequence[float] | None = None):
    """Layer ranges per stage: "even" (by count, the remainder to the first stages), "balanced"
    (`split_layers` on `costs`), or explicit layer counts per stage (e.g. [4, 4, 2])."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"num_stages={num_stages}: a model of {num_layers} layers has 1 to {num_layers} "
                         "pipeline stages (each holds at least one layer)")  # fmt: skip
    if split == "even":
        base, extra = divmod(num_layers, num_stages)
        counts = [base + (s < extra) for s in range(num_stages)]
    elif split == "balanced":
        if costs is None:
            raise ValueError("stage_ranges: split='balanced' needs per-layer costs")
        return split_layers(costs, num_stages)
    else:
        counts = list(split)
        if len(counts) != num_stages or sum(counts) != num_layers or min(counts) < 1:
            raise ValueError(f"split={counts}: {num_stages} positive layer counts summing to {num_layers} are needed")
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def stage_config(config: dict, layers: range) -> dict:
    """`config` (a config.json dict) with every layer outside `layers` removed."""
    d = dict(config)
    entries = {int(k): v for k, v in (d.get("per_layer_config") or {}).items()}
    d["per_layer_config"] = {i: entries[i] if i in layers else dict(REMOVED)
                             for i in range(d["num_hidden_layers"]) if i not in layers or entries.get(i)}  # fmt: skip
    return d


class StageModule(torch.nn.Module):
    """One pipeline stage: token ids (first stage) or hidden states in, hidden states or the last
    position's logits (last stage) out; it owns its layers' KV cache (`reset_cache` between prompts)."""

    def __init__(self, model, layers: range, stage_index: int, num_stages: int):
        super().__init__()
        self.model, self.layers = model, layers
        self.stage_index, self.num_stages = stage_index, num_stages
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self._base_attr = model_spec(model).adapter.base_model_attr
        if not self.is_last:
            self.base.norm = torch.nn.Identity()  # the next stage continues from the un-normed residual stream
        self.cache = None

    @property
    def base(self) -> torch.nn.Module:
        """The decoder stack (e.g. `LlamaModel`), the part a stage runs before the head."""
        return getattr(self.model, self._base_attr)

    def reset_cache(self, batch_size: int, max_cache_len: int) -> None:
        self.cache = make_cache(self.model, batch_size=batch_size, max_cache_len=max_cache_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = {"input_ids": x} if self.is_first else {"inputs_embeds": x}
        hidden = self.base(**inputs, past_key_values=self.cache, use_cache=True).last_hidden_state
        return self.model.lm_head(hidden[:, -1:]) if self.is_last else hidden


def pipeline_stage(model_or_path, stage_index: int, num_stages: int, *, split="balanced",
                   costs: Sequence[float] | None = None, dtype=None, device=None) -> StageModule:  # fmt: skip
    """Stage `stage_index` of `num_stages`: a hetgraph model (every rank passes the same one) or a
    checkpoint path, of which only this stage's layers are read. `split`: "balanced" (by `costs`,
    default each layer's parameter bytes; pass `layer_costs(model, table)` for measured ones), "even",
    or layer counts per stage."""
    from hetgraph.build import from_config, from_pretrained
    from hetgraph.loading import open_checkpoint

    if not 0 <= stage_index < num_stages:
        raise ValueError(f"pipeline_stage: stage_index={stage_index}; allowed: 0 to {num_stages - 1}")
    if isinstance(model_or_path, (str, os.PathLike)):
        config = model_config_dict(open_checkpoint(os.fspath(model_or_path), weights=False).config)
        if split == "balanced" and costs is None:
            from hetgraph.build import build_skeleton

            skeleton, spec = build_skeleton(config)  # meta tensors: the shapes, nothing read
            costs = parameter_bytes(getattr(skeleton, spec.adapter.base_model_attr).layers)
        ranges = stage_ranges(config["num_hidden_layers"], num_stages, split, costs)
        # merged over the checkpoint's own entries: a removed layer's "linear" list is emptied too
        others = (i for i in range(config["num_hidden_layers"]) if i not in ranges[stage_index])
        plan = {i: {**REMOVED, "linear": []} for i in others}
        model = from_pretrained(os.fspath(model_or_path), per_layer_config=plan, dtype=dtype, device=device)
    else:
        full = model_or_path
        config = model_config_dict(full.config)
        costs = layer_costs(full) if split == "balanced" and costs is None else costs
        ranges = stage_ranges(config["num_hidden_layers"], num_stages, split, costs)
        model = from_config(stage_config(config, ranges[stage_index]), dtype=dtype or full.dtype,
                            device=device or full.device)  # fmt: skip
        own = full.state_dict()
        missing, unexpected = model.load_state_dict({k: v for k, v in own.items() if k in model.state_dict()},
                                                    strict=False)  # fmt: skip
        if missing:
            raise RuntimeError(f"pipeline_stage: the model lacks {missing[:3]}")
    return StageModule(model.eval(), ranges[stage_index], stage_index, num_stages)


@torch.no_grad()
def generate(stage: StageModule, input_ids: torch.Tensor, max_new_tokens: int, *, max_cache_len: int | None = None,
             do_sample: bool = False, temperature: float = 1.0, generator: torch.Generator | None = None,
             group=None) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Generate through the pipeline: every rank calls this with its stage and the same prompt.

    Returns (token ids [B, prompt + new] on every rank, the logits of each new token [new, B, V] on
    the last stage, else None). Greedy by default; with `do_sample`, softmax sampling at
    `temperature` on the last stage (its `generator`), the token broadcast from there.
    """
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be at least 1")
    model = stage.model
    device = next(model.parameters()).device
    b, t = input_ids.shape
    hidden, vocab = model.config.get_text_config().hidden_size, model.config.get_text_config().vocab_size
    stage.reset_cache(b, max_cache_len or t + max_new_tokens)
    last_rank = dist.get_world_size(group) - 1 if group is None else dist.get_process_group_ranks(group)[-1]

    def example_in(n: int) -> torch.Tensor:
        if stage.is_first:
            return torch.zeros((b, n), dtype=torch.long, device=device)
        return torch.zeros((b, n, hidden), dtype=model.dtype, device=device)

    def example_out(n: int) -> torch.Tensor:
        shape = (b, 1, vocab) if stage.is_last else (b, n, hidden)
        return torch.zeros(shape, dtype=model.dtype, device=device)

    def schedule(n: int) -> ScheduleGPipe:
        ps = PipelineStage(stage, stage.stage_index, stage.num_stages, device, input_args=(example_in(n),),
                           output_args=(example_out(n),), group=group)  # fmt: skip
        return ScheduleGPipe(ps, n_microbatches=1)

    tokens, logits = input_ids.to(device), []
    step, x = schedule(t), input_ids.to(device)
    decode = schedule(1) if max_new_tokens > 1 else None
    for i in range(max_new_tokens):
        out = step.eval(x) if stage.is_first else step.eval()
        token = torch.zeros((b, 1), dtype=torch.long, device=device)
        if stage.is_last:
            last = out[:, -1].float()
            logits.append(last)
            if do_sample:
                token = torch.multinomial((last / temperature).softmax(-1), 1, generator=generator)
            else:
                token = last.argmax(-1, keepdim=True)
        dist.broadcast(token, src=last_rank, group=group)
        tokens = torch.cat([tokens, token], dim=1)
        step, x = decode, token
    return tokens, torch.stack(logits) if stage.is_last else None
