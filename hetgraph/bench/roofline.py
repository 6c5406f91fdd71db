"""The decode roofline: the bandwidth roof, and the bytes a batch-1 decode step must move.

Weight bytes come from the model's own parameters, placed by its LayerSpec table: which layer each
tensor belongs to and how many of its experts a token is routed to.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from transformers import StaticCache

from hetgraph.bench.presets import Preset
from hetgraph.build import build_skeleton
from hetgraph.cache import ideal_kv_bytes
from hetgraph.contract import model_spec


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def memory_bandwidth_gbs(device: str = "cpu", mbytes: int = 256, repeats: int = 7) -> float:
    """Copy bandwidth (read + write) of a buffer far larger than the caches, median of repeats."""
    n = mbytes * 2**20 // 4
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        b.copy_(a)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * a.nbytes / statistics.median(times) / 1e9


def achieved_gbs(bytes_per_token: int, ms_per_token: float) -> float:
    return bytes_per_token / (ms_per_token / 1e3) / 1e9


def cache_kv_bytes(cache) -> int:
    """Bytes of the KV tensors a cache holds (hetgraph's or transformers')."""
    return sum(l.keys.nbytes + l.values.nbytes for l in cache.layers if getattr(l, "keys", None) is not None)


def _routed_fractions(model: nn.Module) -> dict[int, tuple[int, int]]:
    """id(parameter) -> (top-k, experts) for each MoE layer's merged routed-expert tensors."""
    spec = model_spec(model)
    layers = getattr(model, spec.adapter.base_model_attr).layers
    fractions = {}
    for s, layer in zip(spec, layers):
        sizes = dict(s.extra)
        top_k = sizes.get("num_experts_per_tok")
        if top_k is None:
            continue
        experts = sizes[spec.adapter.moe_attributes[0]]
        routed = spec.adapter.routed_experts
        module = next((m for name, m in layer.named_modules() if name.rpartition(".")[2] == routed), None)
        params = list(module.named_parameters()) if module is not None else []
        if not params or any(p.shape[0] != experts for _, p in params):
            shapes = {name: tuple(p.shape) for name, p in params}
            raise ValueError(
                f"layer {s.index}: expected a '{routed}' submodule of [{experts}, ...] tensors "
                f"({spec.adapter.moe_attributes[0]}={experts}); found {shapes or 'none'}"
            )
        fractions.update({id(p): (top_k, experts) for _, p in params})
    return fractions


def streamed_weight_bytes(model: nn.Module) -> int:
    """Weight bytes one batch-1 decode step must read: every weight but the input embedding table
    (one row of it; read in full when tied to the LM head), and of each MoE layer's routed experts
    only the k experts a token is routed to (k / E of each merged expert tensor)."""
    output = model.get_output_embeddings()
    head = {id(p) for p in output.parameters()} if output is not None else set()
    embedding = {id(p) for p in model.get_input_embeddings().parameters()} - head
    routed = _routed_fractions(model)
    total = 0
    for p in model.parameters():  # each shared tensor once
        if id(p) in embedding:
            continue
        top_k, experts = routed.get(id(p), (1, 1))
        total += p.nbytes * top_k // experts
    return total


def ideal_and_static_kv(preset: Preset, dtype: str) -> dict:
    """KV bytes: hetgraph's ideal, and what transformers' StaticCache allocates when initialised up front."""
    max_len = preset.long_prompt + preset.decode_tokens
    model, spec = build_skeleton(preset.config)
    torch_dtype = getattr(torch, dtype)
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    lc = model.config.per_layer_config
    heads = [getattr(c, "num_key_value_heads", None) or c.num_attention_heads for c in lc]
    dims = [getattr(c, "head_dim", None) or spec.hidden_size // c.num_attention_heads for c in lc]
    cache.early_initialization(batch_size=1, num_heads=heads, head_dim=dims, dtype=torch_dtype, device="meta")
    static = cache_kv_bytes(cache)
    return {"ideal_kv_bytes": ideal_kv_bytes(spec, 1, max_len, torch_dtype), "static_cache_kv_bytes": static}
