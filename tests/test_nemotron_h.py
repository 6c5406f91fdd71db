"""NemotronH: per-layer attention heads, MLP and MoE widths, expert counts and mamba dims, and removed
mixers (the block becomes the identity), against the plain-PyTorch reference in
`reference_nemotron_h.py`; eager, cached and compiled."""

from __future__ import annotations


import pytest
import torch
import transformers
from transformers.cache_utils import DummyLayer, LinearAttentionLayer, StaticLayer

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
    read_config,
)
from hetgraph import HeteroConfigError
from hetgraph.build import SkippedLayer
from hetgraph.export import generate_with_exported, read_metadata
from reference_nemotron_h import load_reference

VOCAB = 128
BLOCKS = ["full_attention", "linear_attention", "moe", "full_attention", "mlp", "linear_attention"]
PER_LAYER = {
    # Layer 0 holds no attention: its block is the identity.
    0: {"skip": ["attention"]},
    # Mamba with its own heads, state, conv kernel and groups.
    1: {"mamba_num_heads": 4, "ssm_state_size": 8, "conv_kernel": 3, "n_groups": 1},
    # MoE with 6 experts (under the alias `num_local_experts`), top-1, its own widths.
    2: {"num_local_experts": 6, "num_experts_per_tok": 1, "moe_intermediate_size": 24,
        "moe_shared_expert_intermediate_size": 40},
    # Attention with its own heads, KV heads and head_dim.
    3: {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8},
    # MLP with its own width.
    4: {"intermediate_size": 48},
}
CONFIG = dict(
    model_type="nemotron_h",
    hidden_size=64,
    vocab_size=VOCAB,
    layers_block_type=BLOCKS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=96,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    moe_shared_expert_intermediate_size=48,
    mamba_num_heads=8,
    mamba_head_dim=8,
    ssm_state_size=16,
    n_groups=2,
    conv_kernel=4,
    chunk_size=8,  # prefill scans span several chunks
    time_step_floor=0.01,  # keeps softplus(dt) above time_step_min: the stock decode step does not clamp it
    max_position_embeddings=256,
    tie_word_embeddings=False,
    per_layer_config=PER_LAYER,
)


hetero_config, ckpt, model, ref = family_fixtures(CONFIG, load_reference)


# ---- spec and structure -------------------------------------------------------------------------


def test_spec_follows_config(model):
    spec = hetgraph.build.model_spec(model)
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
    assert kinds == [DummyLayer, LinearAttentionLayer, DummyLayer, StaticLayer, DummyLayer, LinearAttentionLayer]
    # Mamba states allocated now, with each layer's own dims: conv [B, conv_dim, kernel], ssm [B, heads, dim, state].
    assert cache.layers[1].conv_states[0].shape == (2, 32 + 16, 3)
    assert cache.layers[1].recurrent_states[0].shape == (2, 4, 8, 8)
    assert cache.layers[5].conv_states[0].shape == (2, 64 + 64, 4)
    assert cache.layers[3].keys.shape == (2, 1, 16, 8)


# ---- forward and generate against the reference -------------------------------------------------


@pytest.mark.parametrize("pad", [(0, 0), (0, 5)])
def test_logits_match_reference(model, ref, pad):
    assert_logits_match(model, ref, *prompts(VOCAB, pad=pad))


@pytest.mark.parametrize("cache", ["default", "make_cache"])
def test_greedy_generate_matches_reference(model, ref, cache):
    ids, mask = prompts(VOCAB, pad=(0, 4))
    out = assert_greedy_matches(model, ref, ids, mask, new=16, cache=cache)
    assert_stateless_layers_hold_dummies(model, out.past_key_values)


def test_layer0_without_attention_decodes_without_cache(model, ref):
    assert_uncached_greedy_matches(model, ref, VOCAB)


def test_save_load_round_trip(model, ckpt, tmp_path):
    expected = {0: {"skip": ["attention"]}, 4: {"intermediate_size": 48}}
    assert_save_load_round_trip(model, ckpt, tmp_path, VOCAB, expected)


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


# ---- invalid configs ----------------------------------------------------------------------------

BAD = {
    "mismatched_skip_name": (1, {"skip": ["attention"]},
                             r"layer 1: skip 'attention' does not match.*mamba.*'mixer', 'mamba'"),
    "mlp_skip_on_attention": (3, {"skip": ["mlp"]}, r"layer 3: skip 'mlp' does not match.*attention"),
    "unknown_skip": (3, {"skip": ["self_attn"]}, r"layer 3\b.*unknown block 'self_attn'.*'mixer'"),
    "per_layer_block_types": (1, {"layer_types": ["mlp"] * 6}, r"layer 1\b.*layers_block_type.*cannot vary"),
    "per_layer_hidden_size": (1, {"hidden_size": 32}, r"layer 1\b.*hidden_size=32\b"),
    "per_layer_vocab_size": (1, {"vocab_size": 64}, r"layer 1\b.*vocab_size=64\b"),
    "mamba_heads_not_grouped": (5, {"mamba_num_heads": 7}, r"layer 5\b.*mamba_num_heads=7.*n_groups=2"),
    "top_k_above_experts": (2, {"num_experts_per_tok": 7}, r"layer 2\b.*num_experts_per_tok=7.*n_routed_experts=6"),
    "zero_state": (1, {"ssm_state_size": 0}, r"layer 1\b.*ssm_state_size=0\b.*positive"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config(case):
    layer, overrides, pattern = BAD[case]
    d = hetero_config()
    d["per_layer_config"][layer] = {**d["per_layer_config"].get(layer, {}), **overrides}
    with pytest.raises(HeteroConfigError, match=pattern):
        hetgraph.from_config(d)


# ---- compiled -----------------------------------------------------------------------------------


def test_compiled_greedy_decode_two_graphs_no_recompile(ckpt, ref):
    backend = assert_compiled_decode(ckpt, ref, VOCAB)
    # The experts run the default implementation (grouped_mm; its fp32 CPU fallback op) inside the graph.
    graphs = [g for g in backend.reports[1].gm.modules() if isinstance(g, torch.fx.GraphModule)]
    assert any("grouped_mm" in str(n.target) for g in graphs for n in g.graph.nodes)


@pytest.mark.slow
def test_compiled_logits_equal_reference(ckpt, ref):
    assert_compiled_logits(ckpt, ref, VOCAB)


# ---- export -------------------------------------------------------------------------------------


def test_exported_decode_matches_reference(model, ref, tmp_path):
    exported = assert_exported_decode(model, ref, VOCAB, tmp_path)
    # The stock chunked scan makes export specialize the prompt length (6, one chunk): the metadata
    # says so, and a prompt of another length is refused before it reaches the program.
    meta = read_metadata(exported.prefill)
    assert (meta["min_prompt_len"], meta["max_prompt_len"]) == (6, 6)
    with pytest.raises(ValueError, match=r"serve prompts of 6 tokens, input_ids has shape \(2, 5\)"):
        generate_with_exported(exported.prefill, exported.decode, torch.ones(2, 5, dtype=torch.long), 3)
