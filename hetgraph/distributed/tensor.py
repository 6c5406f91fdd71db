"""Tensor parallel for heterogeneous layers: a per-layer plan that never splits a head.

transformers' stock plan shards every layer's q/k/v/o the same way, and crashes mid-forward where a
layer has fewer KV heads than ranks (transformers issue 48307). `tp_plan` decides per layer, from
the LayerSpec table, with transformers' own styles (`colwise`, `rowwise`, applied by
`apply_tensor_parallelism`, all DTensor underneath):

* attention with query and KV heads both divisible by the TP size: q/k/v colwise, o rowwise (whole
  heads per rank);
* one KV head, query heads divisible: q colwise, o rowwise, k/v replicated (every rank's query heads
  read the one KV head; the layer's local `num_key_value_groups` becomes its local query heads);
* any other head counts (e.g. 3 heads on 2 ranks): the attention is replicated (computed on every
  rank, no collective);
* MLP of any width: gate/up colwise, down rowwise (a width that does not divide leaves the last rank
  a shorter slice; transformers' styles allow that);
* removed blocks and linear-replaced blocks: no entry, no collective; the embedding and head stay
  replicated.

`tensor_parallel(model, device_mesh)` applies it in place and records each layer's local KV heads,
which `make_cache` then allocates (each rank holds its own KV heads only). Llama-family models
(`arch.llama.LLAMA_FAMILY`); other families are refused by name.
"""

from __future__ import annotations

import logging

import torch

from hetgraph import regions
from hetgraph.arch.llama import LLAMA_FAMILY
from hetgraph.cache import TENSOR_PARALLEL_ATTR
from hetgraph.contract import model_spec
from hetgraph.errors import HeteroConfigError
from hetgraph.spec import FULL, LayerSpec

log = logging.getLogger(__name__)

#: the families whose layers this plan splits: the Llama family's (one attention with q/k/v/o_proj, one
#: gated MLP); GptOss's sinks and experts, Llama4's experts and NemotronH's mamba need their own styles.
FAMILIES = tuple(adapter.name for adapter in LLAMA_FAMILY)


def attention_split(s: LayerSpec, tp_size: int) -> str:
    """How layer s's attention is split: "none" (no attention block), "sharded", "kv-replicated" or "replicated"."""
    if s.attention != FULL:
        return "none"
    q, kv = s.num_attention_heads, s.num_key_value_heads
    if q % tp_size == 0 and kv % tp_size == 0:
        return "sharded"
    if q % tp_size == 0 and kv == 1:
        return "kv-replicated"
    return "replicated"


def tp_plan(model: torch.nn.Module, tp_size: int, *, replicate: bool = True) -> dict[str, str]:
    """transformers-style TP plan, one entry per module and parameter it shards, for this model's layers.
    `replicate=False` refuses (before any process group work) a layer whose attention would be replicated."""
    spec = _checked_spec(model, tp_size, replicate)
    prefix = f"{spec.adapter.base_model_attr}.layers"
    plan: dict[str, str] = {}
    layers = getattr(model, spec.adapter.base_model_attr).layers
    for s, layer in zip(spec, layers):
        split = attention_split(s, tp_size)
        shard = {"sharded": (("q_proj", "colwise"), ("k_proj", "colwise"), ("v_proj", "colwise"),
                             ("o_proj", "rowwise")),
                 "kv-replicated": (("q_proj", "colwise"), ("o_proj", "rowwise"))}.get(split, ())  # fmt: skip
        for name, style in shard:
            _add(plan, f"{prefix}.{s.index}.self_attn.{name}", getattr(layer.self_attn, name), style)
        if s.mlp == FULL:
            for name, style in (("gate_proj", "colwise"), ("up_proj", "colwise"), ("down_proj", "rowwise")):
                _add(plan, f"{prefix}.{s.index}.mlp.{name}", getattr(layer.mlp, name), style)
    return plan


def tensor_parallel(model: torch.nn.Module, device_mesh, *, replicate: bool = True) -> torch.nn.Module:
    """Shard `model` in place over the 1-D `device_mesh` with `tp_plan` (`replicate` as there); every
    rank must hold the same full weights (each keeps its slice, nothing is sent). Returns the model."""
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    if device_mesh.ndim != 1:
        raise ValueError(f"tensor_parallel: a 1-D device mesh is needed; got {device_mesh.ndim} dimensions")
    tp_size = device_mesh.size()
    if getattr(model, TENSOR_PARALLEL_ATTR, None) is not None:
        raise ValueError("tensor_parallel: the model is already sharded")
    spec = _checked_spec(model, tp_size, replicate)
    plan = tp_plan(model, tp_size)
    apply_tensor_parallelism(model, device_mesh, plan)
    layers = getattr(model, spec.adapter.base_model_attr).layers
    kv_heads: list[int | None] = []
    for s, layer in zip(spec, layers):
        split = attention_split(s, tp_size)
        log.info("layer %d: attention %s", s.index, split)
        if split == "kv-replicated":
            layer.self_attn.num_key_value_groups = s.num_attention_heads // tp_size
        kv_heads.append({"none": None, "sharded": (s.num_key_value_heads or 0) // tp_size}.get(
            split, s.num_key_value_heads))  # fmt: skip
    setattr(model, TENSOR_PARALLEL_ATTR, {"tp_size": tp_size, "kv_heads": kv_heads})
    regions.disable(layers)  # DTensor weights and collectives: traced layer by layer, as before
    return model


def _add(plan: dict[str, str], name: str, module: torch.nn.Module, style: str) -> None:
    plan[name] = style
    for param, _ in module.named_parameters(recurse=False):
        plan[f"{name}.{param}"] = style


def _checked_spec(model, tp_size: int, replicate: bool = True):
    spec = model_spec(model)
    if spec.adapter.name not in FAMILIES:
        raise HeteroConfigError(f"tensor parallel: family {spec.adapter.name!r} is not supported yet; "
                                f"supported: {', '.join(FAMILIES)}")  # fmt: skip
    if tp_size < 1:
        raise ValueError(f"tensor parallel: tp_size={tp_size} must be >= 1")
    if not replicate:
        for s in spec:
            if attention_split(s, tp_size) == "replicated":
                q, kv = s.num_attention_heads, s.num_key_value_heads
                fits = [t for t in range(1, q + 1) if attention_split(s, t) != "replicated"]
                raise HeteroConfigError(
                    f"tensor parallel: layer {s.index}'s attention ({q} query heads, {kv} KV heads) does not split "
                    f"over tp_size={tp_size}, and replicate=False; tp sizes that split it: {fits}")
    return spec
