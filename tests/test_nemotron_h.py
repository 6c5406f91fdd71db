"""NemotronH only: its spec and structure (per-layer attention heads, MLP and MoE widths, expert counts,
mamba dims), its caches (mamba states per layer), removed mixers of every type (the block becomes the
identity). The checks every family shares (reference, cache, compiled, export) are in
tests/test_families.py."""

from __future__ import annotations

import functools

import torch
import transformers
from transformers.cache_utils import DummyLayer, LinearAttentionLayer

import hetgraph
from hetgraph.attention import NoKVLayer
from hetgraph.build import SkippedLayer
from hetgraph.cache import StaticFullLayer
from hetgraph.contract import model_spec
from references.nemotron_h import load_reference
from support.checks import assert_greedy_matches, assert_logits_match, prompts, read_config
from support.fixtures import model_fixtures
from support.models import VOCAB
from support.models import hetero_config as _hetero_config

hetero_config = functools.partial(_hetero_config, "nemotron_h")

family, ckpt, model, ref = model_fixtures("nemotron_h")


# ---- spec and structure -------------------------------------------------------------------------


def test_spec_follows_config(model):
    spec = model_spec(model)
    assert [s.mixer_type for s in spec] == ["attention", "mamba", "moe", "attention", "mlp", "mamba"]
    assert [s.mixer for s in spec] == ["skip", "full", "full", "full", "full", "full"]
    assert [s.window for s in spec] == [None, None, None, ("full", None), None, None]
    assert dict(spec[1].extra) == {"mamba_num_heads": 4, "mamba_head_dim": 8, "ssm_state_size": 8, "n_groups": 1,
                                   "conv_kernel": 3}
    assert dict(spec[2].extra)["n_routed_experts"] == 6 and spec[2].intermediate_size is None
    assert spec[4].intermediate_size == 48


def test_structure(model, ckpt):
    layers = model.model.layers
    assert type(model) is transformers.NemotronHForCausalLM
    assert isinstance(layers[0], SkippedLayer) and layers[0].block_type == "full_attention"
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert not [k for k in shapes if k.startswith("model.layers.0.")]
    # Mamba dims per layer: inner = heads * head_dim, conv = inner + 2 * groups * state.
    for i, (heads, state, kernel, groups) in {1: (4, 8, 3, 1), 5: (8, 16, 4, 2)}.items():
        inner, conv = heads * 8, heads * 8 + 2 * groups * state
        p = f"model.layers.{i}.mixer."
        assert shapes[p + "in_proj.weight"] == (inner + conv + heads, 64)
        assert shapes[p + "conv1d.weight"] == (conv, 1, kernel)
        assert shapes[p + "A_log"] == (heads,)
        # Initialised per layer, as the stock `_init_weights` does for the global head count.
        torch.testing.assert_close(layers[i].mixer.A_log.data, torch.log(torch.arange(1, heads + 1).float()))
    assert shapes["model.layers.2.mixer.experts.up_proj"] == (6, 24, 64)
    assert shapes["model.layers.2.mixer.shared_experts.up_proj.weight"] == (40, 64)
    assert shapes["model.layers.3.mixer.q_proj.weight"] == (16, 64)
    assert shapes["model.layers.4.mixer.up_proj.weight"] == (48, 64)
    assert read_config(ckpt)["per_layer_config"]["2"]["n_routed_experts"] == 6  # the alias, normalised


def test_make_cache_layers(model):
    cache = hetgraph.make_cache(model, batch_size=2, max_cache_len=16)
    kinds = [type(layer) for layer in cache.layers]
    assert kinds == [NoKVLayer, LinearAttentionLayer, NoKVLayer, StaticFullLayer, NoKVLayer, LinearAttentionLayer]
    assert all(isinstance(cache.layers[i], DummyLayer) for i in (0, 2, 4))  # transformers' own "nothing stored"
    # The cache's length is its attention layer's (layer 3), whatever layers 0 and 1 hold (transformers
    # 5.25's `get_seq_length` asks layer 0).
    with torch.no_grad():
        model(torch.zeros(2, 5, dtype=torch.long), cache=cache)
    assert cache.get_seq_length() == 5 == cache.layers[0].get_seq_length()
    # Mamba states allocated now, with each layer's own dims: conv [B, conv_dim, kernel], ssm [B, heads, dim, state].
    assert cache.layers[1].conv_states[0].shape == (2, 32 + 16, 3)
    assert cache.layers[1].recurrent_states[0].shape == (2, 4, 8, 8)
    assert cache.layers[5].conv_states[0].shape == (2, 64 + 64, 4)
    assert cache.layers[3].keys.shape == (2, 1, 16, 8)


def test_generate_with_transformers_cache_when_layer_0_is_moe(checkpoint):
    """transformers 5.25 builds `generate`'s cache with a bare `DummyLayer` for a "moe" layer and asks
    layer 0 for the length before the first forward; a MoE layer 0 gets a `NoKVLayer` in time."""
    blocks = ["moe", "linear_attention", "full_attention", "mlp"]
    path = checkpoint(hetero_config(layers_block_type=blocks, per_layer_config={}), seed=2)
    model, ref = hetgraph.from_pretrained(path), load_reference(path)
    ids, mask = prompts(VOCAB, pad=(0, 2))
    out = assert_greedy_matches(model, ref, ids, mask, new=5, cache="default")
    assert [type(layer) for layer in out.past_key_values.layers][::3] == [NoKVLayer, NoKVLayer]


def test_removed_mixers_of_every_type(checkpoint):
    """`mixer` and the type's own name remove mamba, MoE and MLP mixers too: those blocks become the identity."""
    per_layer = {1: {"skip": ["mixer"]}, 2: {"skip": ["mlp"]}, 4: {"skip": ["mlp"]}, 5: {"skip": ["mamba"]}}
    path = checkpoint(hetero_config(per_layer_config=per_layer), seed=1)
    model, ref = hetgraph.from_pretrained(path), load_reference(path)
    assert [type(layer).__name__ for layer in model.model.layers] == [
        "NemotronHBlock", "SkippedLayer", "SkippedLayer", "NemotronHBlock", "SkippedLayer", "SkippedLayer"
    ]
    ids, mask = prompts(VOCAB, pad=(0, 3))
    assert_logits_match(model, ref, ids, mask)
    assert_greedy_matches(model, ref, ids, mask, new=8, cache="make_cache")
