"""Llama4 text only: its spec and structure (per-layer experts, MoE and dense widths, heads, head_dim,
chunks, NoPE and MoE layer lists, removed blocks), removed MoE and chunked blocks, layer_types
following per-layer chunks, shared RoPE variants compiled. The checks every family shares
(reference, cache, compiled, export) are in tests/test_families.py."""

from __future__ import annotations

import functools

import transformers

import hetgraph
from hetgraph.build import SkippedBlock, SkippedNorm
from hetgraph.contract import model_spec
from references.llama4 import load_reference
from support.checks import assert_compiled_decode, assert_greedy_matches, assert_logits_match, prompts
from support.fixtures import model_fixtures
from support.models import VOCAB
from support.models import hetero_config as _hetero_config

hetero_config = functools.partial(_hetero_config, "llama4_text")

family, ckpt, model, ref = model_fixtures("llama4_text")


# ---- spec and structure -------------------------------------------------------------------------


def test_spec_follows_config(model):
    spec = model_spec(model)
    assert [s.window for s in spec] == [None, ("chunked", 3), ("chunked", 4), ("full", None)]
    assert model.config.layer_types == ["chunked_attention", "chunked_attention", "chunked_attention", "full_attention"]
    assert [s.intermediate_size for s in spec] == [48, 24, None, 32]
    assert [dict(s.extra).get("num_local_experts") for s in spec] == [None, 3, None, 4]
    assert [dict(s.extra).get("nope", False) for s in spec] == [False, False, False, True]


def test_structure(model):
    layers = model.model.layers
    assert type(model) is transformers.Llama4ForCausalLM
    assert isinstance(layers[0].self_attn, SkippedBlock) and isinstance(layers[0].input_layernorm, SkippedNorm)
    assert isinstance(layers[2].feed_forward, SkippedBlock) and not layers[2].feed_forward.returns_tuple
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert not [k for k in shapes if k.startswith(("model.layers.0.self_attn.", "model.layers.0.input_layernorm."))]
    assert not [k for k in shapes if k.startswith(("model.layers.2.feed_forward.", "model.layers.2.post_attention"))]
    assert shapes["model.layers.0.feed_forward.gate_proj.weight"] == (48, 64)
    for i, (experts, width) in {1: (3, 24), 3: (4, 32)}.items():
        p = f"model.layers.{i}.feed_forward."
        assert shapes[p + "router.weight"] == (experts, 64)
        assert shapes[p + "experts.gate_up_proj"] == (experts, 64, 2 * width)
        assert shapes[p + "shared_expert.gate_proj.weight"] == (width, 64)
    for i, (heads, kv, dim) in {1: (4, 1, 16), 2: (2, 2, 8), 3: (8, 2, 16)}.items():
        assert shapes[f"model.layers.{i}.self_attn.q_proj.weight"] == (heads * dim, 64)
        assert shapes[f"model.layers.{i}.self_attn.k_proj.weight"] == (kv * dim, 64)


def test_removed_moe_and_chunked_layer0(checkpoint):
    """A removed MoE feed-forward (the marker returns a pair) and a removed chunked attention at layer 0."""
    per_layer = {0: {"skip": ["attention"]}, 1: {"skip": ["mlp"], "attention_chunk_size": None}, 3: {"skip": ["mlp"]}}
    path = checkpoint(hetero_config(per_layer_config=per_layer), seed=1)
    model, ref = hetgraph.from_pretrained(path), load_reference(path)
    assert model.model.layers[1].feed_forward.returns_tuple and model.model.layers[1].is_moe_layer
    assert model.config.layer_types[1] == "full_attention"
    ids, mask = prompts(VOCAB, pad=(0, 3))
    assert_logits_match(model, ref, ids, mask)
    assert_greedy_matches(model, ref, ids, mask, new=10, cache="make_cache")


# ---- config rules -------------------------------------------------------------------------------


def test_layer_types_follow_per_layer_chunks():
    """The global chunk None with one layer chunked: the global `layer_types` follow the per-layer value."""
    config = hetero_config(attention_chunk_size=None, per_layer_config={2: {"attention_chunk_size": 5}})
    model = hetgraph.from_config(config)
    assert model.config.layer_types == ["full_attention", "full_attention", "chunked_attention", "full_attention"]
    assert [s.window for s in model_spec(model)] == [
        ("full", None), ("full", None), ("chunked", 5), ("full", None)
    ]


# ---- compiled -----------------------------------------------------------------------------------


def test_shared_rope_variants_with_caches_compile(checkpoint):
    """Layers 4 and 5 repeat layers 2 and 1 (chunked, RoPE, cached): each pair shares one subgraph whose
    inputs include the complex `freqs_cis` and the cache it writes. That combination once left Inductor
    an `auto_functionalized_v2` it refused; the backend now must not fall back, and decode stays exact."""
    per_layer = hetero_config()["per_layer_config"]
    config = hetero_config(
        num_hidden_layers=6,
        no_rope_layers=[1, 1, 1, 0, 1, 1],
        moe_layers=[1, 3, 5],
        per_layer_config={**per_layer, 4: per_layer[2], 5: per_layer[1]},
    )
    path = checkpoint(config)
    backend = assert_compiled_decode(path, load_reference(path), VOCAB, new=8)
    for report in backend.reports:
        shared = [r for r in report.records if r.name == "group_layer_variants"][0].report
        assert shared[2] == shared[4] and shared[4].startswith("shares"), shared
        assert shared[1] == shared[5] and shared[5].startswith("shares"), shared
