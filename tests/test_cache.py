"""`make_cache`: exactly the KV each layer needs, and decoding with it equals the reference."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers.cache_utils import DummyLayer

import hetgraph
from support.checks import prompts
from support.fixtures import model_fixtures
from support.models import GREEDY, LLAMA_FAMILIES, VOCAB

family, ckpt, model, ref = model_fixtures(LLAMA_FAMILIES)


@pytest.fixture(scope="module")
def layers(ckpt):
    """Per layer, from config.json alone: None without attention, else (kv_heads, head_dim, window or None)."""
    with open(os.path.join(ckpt, "config.json")) as f:
        config = json.load(f)
    heads = config["num_attention_heads"]
    glob = {
        "num_key_value_heads": config.get("num_key_value_heads") or heads,
        "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
    }
    result = []
    for i in range(config["num_hidden_layers"]):
        over = config.get("per_layer_config", {}).get(str(i), {})
        if "attention" in over.get("skip", []):
            result.append(None)
            continue
        window = over.get("sliding_window", config.get("sliding_window"))
        chunk = over.get("attention_chunk_size", config.get("attention_chunk_size"))
        result.append(
            (
                over.get("num_key_value_heads", glob["num_key_value_heads"]),
                over.get("head_dim", glob["head_dim"]),
                window or chunk,
            )
        )
    return result


def ids_and_mask(batch=2, length=6, pad=(0, 2), seed=1):
    return prompts(VOCAB, batch=batch, length=length, pad=pad, seed=seed)


@pytest.mark.parametrize("max_cache_len", [4, 40])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_kv_bytes_equal_ideal(model, layers, max_cache_len, dtype):
    batch = 3
    cache = hetgraph.make_cache(model, batch_size=batch, max_cache_len=max_cache_len, dtype=dtype)
    itemsize = (dtype or torch.float32).itemsize
    ideal = 0
    for layer in layers:
        if layer is not None:
            kv_heads, head_dim, window = layer
            ideal += batch * min(window or max_cache_len, max_cache_len) * kv_heads * head_dim * 2 * itemsize
    held = sum(
        layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if getattr(layer, "keys", None) is not None
    )
    assert held == ideal


def test_cache_layers_follow_each_layer(model, layers):
    batch, max_len = 2, 16
    cache = hetgraph.make_cache(model, batch_size=batch, max_cache_len=max_len)
    assert len(cache.layers) == len(layers)
    for i, (layer, want) in enumerate(zip(cache.layers, layers)):
        if want is None:
            assert isinstance(layer, DummyLayer), f"layer {i} has no attention but a {type(layer).__name__}"
            continue
        kv_heads, head_dim, window = want
        shape = (batch, kv_heads, min(window or max_len, max_len), head_dim)
        assert tuple(layer.keys.shape) == shape, f"layer {i} keys"
        assert tuple(layer.values.shape) == shape, f"layer {i} values"
    full = [i for i, w in enumerate(layers) if w is not None and w[2] is None]
    assert full, "the case needs a full-attention layer"
    for i in full:  # [B, kv_heads, max_cache_len, head_dim]
        assert cache.layers[i].keys.shape[2] == max_len


def test_sliding_decode_wraps(model, ref, layers):
    """Decode well past every window and chunk: the windowed layers' buffers wrap many times."""
    new = 42
    assert max(w[2] for w in layers if w is not None and w[2]) < new
    ids, mask = ids_and_mask()
    cache = hetgraph.make_cache(model, batch_size=2, max_cache_len=ids.shape[1] + new)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, **GREEDY, cache=cache)
    want = ref.greedy(ids, new, mask)
    assert torch.equal(out, want), f"\ngenerated {out.tolist()}\nreference {want.tolist()}"


@torch.no_grad()
def test_prefill_then_token_by_token(model, ref):
    ids, _ = ids_and_mask(batch=2, length=24, pad=(0, 0))
    prefill = 7
    full = ref.logits(ids)  # [B, T, V]
    cache = hetgraph.make_cache(model, batch_size=2, max_cache_len=ids.shape[1])
    logits = model(ids[:, :prefill], cache=cache).logits
    torch.testing.assert_close(logits, full[:, :prefill], atol=1e-4, rtol=0)
    for t in range(prefill, ids.shape[1]):
        logits = model(ids[:, t : t + 1], cache=cache).logits
        torch.testing.assert_close(logits[:, -1], full[:, t], atol=1e-4, rtol=0, msg=lambda m: f"position {t}: {m}")
