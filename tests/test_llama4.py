"""Llama4 text: per-layer experts, widths (MoE and dense), heads, head_dim, chunks, NoPE and MoE
layer lists and removed blocks, against the plain-PyTorch reference in `reference_llama4.py`;
eager, cached and compiled."""

from __future__ import annotations


import pytest
import torch
import transformers

import hetgraph
from family_checks import (
    assert_compiled_decode,
    assert_compiled_logits,
    assert_exported_decode,
    assert_greedy_matches,
    assert_logits_match,
    assert_save_load_round_trip,
    assert_stateless_layers_hold_dummies,
    assert_uncached_greedy_matches,
    family_fixtures,
    prompts,
)
from hetgraph import HeteroConfigError
from hetgraph.build import SkippedBlock, SkippedNorm
from reference_llama4 import load_reference

VOCAB = 128
PER_LAYER = {
    # Dense layer without attention, its own dense width.
    0: {"skip": ["attention"], "intermediate_size_mlp": 48},
    # MoE layer: 3 experts, top-2, its own expert width; one KV head; its own chunk.
    1: {"num_local_experts": 3, "num_experts_per_tok": 2, "intermediate_size": 24, "num_key_value_heads": 1,
        "attention_chunk_size": 3},
    # Dense layer without MLP; its own head_dim (its own RoPE table); the global chunk 4.
    2: {"skip": ["mlp"], "head_dim": 8, "num_attention_heads": 2, "num_key_value_heads": 2},
    # NoPE layer (global attention, temperature tuning), MoE, 8 heads.
    3: {"num_attention_heads": 8},
}
CONFIG = dict(
    model_type="llama4_text",
    hidden_size=64,
    num_hidden_layers=4,
    vocab_size=VOCAB,
    intermediate_size=32,
    intermediate_size_mlp=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=1,
    attention_chunk_size=4,
    no_rope_layers=[1, 1, 1, 0],
    moe_layers=[1, 3],
    floor_scale=4,  # temperature tuning changes the NoPE queries within a few tokens
    max_position_embeddings=256,
    tie_word_embeddings=False,
    per_layer_config=PER_LAYER,
)


hetero_config, ckpt, model, ref = family_fixtures(CONFIG, load_reference)


# ---- spec and structure -------------------------------------------------------------------------


def test_spec_follows_config(model):
    spec = hetgraph.build.model_spec(model)
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


# ---- forward and generate against the reference -------------------------------------------------


@pytest.mark.parametrize("pad", [(0, 0), (0, 5)])
def test_logits_match_reference(model, ref, pad):
    assert_logits_match(model, ref, *prompts(VOCAB, pad=pad))


@pytest.mark.parametrize("cache", ["default", "make_cache"])
def test_greedy_generate_matches_reference(model, ref, cache):
    ids, mask = prompts(VOCAB, pad=(0, 4))
    out = assert_greedy_matches(model, ref, ids, mask, new=16, cache=cache)  # past every chunk
    assert_stateless_layers_hold_dummies(model, out.past_key_values)


def test_layer0_without_attention_decodes_without_cache(model, ref):
    assert_uncached_greedy_matches(model, ref, VOCAB)


def test_save_load_round_trip(model, ckpt, tmp_path):
    assert_save_load_round_trip(model, ckpt, tmp_path, VOCAB, {0: {"intermediate_size_mlp": 48, "skip": ["attention"]}})


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


# ---- invalid configs ----------------------------------------------------------------------------

BAD = {
    "per_layer_hidden_size": (1, {"hidden_size": 32}, r"layer 1\b.*hidden_size=32\b"),
    "per_layer_vocab_size": (1, {"vocab_size": 64}, r"layer 1\b.*vocab_size=64\b"),
    "per_layer_moe_layers": (1, {"moe_layers": [1]}, r"layer 1\b.*moe_layers.*cannot vary"),
    "per_layer_no_rope_layers": (1, {"no_rope_layers": [1, 1, 1, 1]}, r"layer 1\b.*no_rope_layers.*cannot vary"),
    "chunk_on_nope_layer": (3, {"attention_chunk_size": 2}, r"layer 3\b.*attention_chunk_size=2.*NoPE"),
    "sliding_not_supported": (1, {"sliding_window": 4}, r"layer 1\b.*sliding_window.*not a supported"),
    "top_k_above_experts": (1, {"num_experts_per_tok": 4}, r"layer 1\b.*num_experts_per_tok=4.*num_local_experts=3"),
    "unknown_skip": (1, {"skip": ["feed_forward"]}, r"layer 1\b.*unknown block 'feed_forward'.*'attention', 'mlp'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config(case):
    layer, overrides, pattern = BAD[case]
    d = hetero_config()
    d["per_layer_config"][layer] = {**d["per_layer_config"].get(layer, {}), **overrides}
    with pytest.raises(HeteroConfigError, match=pattern):
        hetgraph.from_config(d)


def test_layer_types_follow_per_layer_chunks():
    """The global chunk None with one layer chunked: the global `layer_types` follow the per-layer value."""
    config = hetero_config(attention_chunk_size=None, per_layer_config={2: {"attention_chunk_size": 5}})
    model = hetgraph.from_config(config)
    assert model.config.layer_types == ["full_attention", "full_attention", "chunked_attention", "full_attention"]
    assert [s.window for s in hetgraph.build.model_spec(model)] == [
        ("full", None), ("full", None), ("chunked", 5), ("full", None)
    ]


# ---- compiled -----------------------------------------------------------------------------------


def test_compiled_greedy_decode_two_graphs_no_recompile(ckpt, ref):
    backend = assert_compiled_decode(ckpt, ref, VOCAB)
    eliminate = next(r for r in backend.reports[0].records if r.name == "eliminate_skipped_blocks")
    assert eliminate.changed and set(eliminate.report) == {0, 2}


@pytest.mark.slow
def test_compiled_logits_equal_reference(ckpt, ref):
    report = assert_compiled_logits(ckpt, ref, VOCAB)
    assert not [n for n in report.gm.graph.nodes if n.target is torch.zeros_like]



def test_shared_rope_variants_with_caches_compile(checkpoint):
    """Layers 4 and 5 repeat layers 2 and 1 (chunked, RoPE, cached): each pair shares one subgraph whose
    inputs include the complex `freqs_cis` and the cache it writes. That combination once left Inductor
    an `auto_functionalized_v2` it refused; the backend now must not fall back, and decode stays exact."""
    config = hetero_config(
        num_hidden_layers=6,
        no_rope_layers=[1, 1, 1, 0, 1, 1],
        moe_layers=[1, 3, 5],
        per_layer_config={**PER_LAYER, 4: PER_LAYER[2], 5: PER_LAYER[1]},
    )
    path = checkpoint(config)
    backend = assert_compiled_decode(path, load_reference(path), VOCAB, new=8)
    for report in backend.reports:
        shared = [r for r in report.records if r.name == "group_layer_variants"][0].report
        assert shared[2] == shared[4] and shared[4].startswith("shares"), shared
        assert shared[1] == shared[5] and shared[5].startswith("shares"), shared


# ---- export -------------------------------------------------------------------------------------


def test_exported_decode_matches_reference(model, ref, tmp_path):
    assert_exported_decode(model, ref, VOCAB, tmp_path)
