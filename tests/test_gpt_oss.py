"""GptOss: per-layer experts, heads (with sinks), head_dim, windows and removed blocks, against
the plain-PyTorch reference in `reference_gpt_oss.py`; eager, cached and compiled."""

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
    read_config,
)
from hetgraph import HeteroConfigError
from hetgraph.build import SkippedBlock, SkippedNorm
from reference import per_layer_entries
from reference_gpt_oss import load_reference

VOCAB = 128
# The default `layer_types` alternate sliding (even layers) / full (odd layers).
PER_LAYER = {
    # No attention at layer 0; 3 experts, given under the alias `num_experts`.
    0: {"skip": ["attention"], "num_experts": 3, "intermediate_size": 48},
    # A window on a layer the global layer_types calls full; one KV head; top-1 routing.
    1: {"sliding_window": 3, "num_key_value_heads": 1, "num_experts_per_tok": 1},
    # Its own head_dim (its own RoPE table) and 2 heads (2 sinks); no MLP; the global window 5.
    2: {"skip": ["mlp"], "head_dim": 8, "num_attention_heads": 2, "num_key_value_heads": 2},
    # Full attention, 8 heads, 6 experts.
    3: {"num_attention_heads": 8, "num_local_experts": 6, "intermediate_size": 24},
}
CONFIG = dict(
    model_type="gpt_oss",
    hidden_size=64,
    num_hidden_layers=4,
    vocab_size=VOCAB,
    intermediate_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=2,
    sliding_window=5,
    max_position_embeddings=256,
    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                     "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64},
    tie_word_embeddings=False,
    per_layer_config=PER_LAYER,
)


hetero_config, ckpt, model, ref = family_fixtures(CONFIG, load_reference)


# ---- spec and structure -------------------------------------------------------------------------


def test_spec_follows_config(model):
    spec = hetgraph.build.model_spec(model)
    assert [s.window for s in spec] == [None, ("sliding", 3), ("sliding", 5), ("full", None)]
    # The global layer_types follow the per-layer windows, so the stock layers and caches agree.
    assert model.config.layer_types == ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]
    assert [dict(s.extra).get("num_local_experts") for s in spec] == [3, 4, None, 6]
    assert [dict(s.extra).get("num_experts_per_tok") for s in spec] == [2, 1, None, 2]
    assert model.config._attn_implementation == "eager"  # GptOss has no SDPA path (sinks)


def test_structure(model, ckpt):
    config = read_config(ckpt)
    layers = model.model.layers
    assert type(model) is transformers.GptOssForCausalLM
    for i, (block, norm) in ((0, ("self_attn", "input_layernorm")), (2, ("mlp", "post_attention_layernorm"))):
        assert isinstance(getattr(layers[i], block), SkippedBlock) and isinstance(getattr(layers[i], norm), SkippedNorm)
        assert not [k for k in model.state_dict() if k.startswith(f"model.layers.{i}.{block}.")]
        assert not [k for k in model.state_dict() if k.startswith(f"model.layers.{i}.{norm}.")]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # Per layer, from the config alone: (experts, width) and (heads, kv heads, head_dim).
    for i, (experts, width) in {0: (3, 48), 1: (4, 32), 3: (6, 24)}.items():
        p = f"model.layers.{i}.mlp."
        assert shapes[p + "router.weight"] == (experts, 64)
        assert shapes[p + "experts.gate_up_proj"] == (experts, 64, 2 * width)
        assert shapes[p + "experts.down_proj"] == (experts, width, 64)
        assert shapes[p + "experts.down_proj_bias"] == (experts, 64)
    for i, (heads, kv, dim) in {1: (4, 1, 16), 2: (2, 2, 8), 3: (8, 2, 16)}.items():
        p = f"model.layers.{i}.self_attn."
        assert shapes[p + "q_proj.weight"] == (heads * dim, 64)
        assert shapes[p + "k_proj.weight"] == (kv * dim, 64)
        assert shapes[p + "sinks"] == (heads,)
    assert per_layer_entries(config)[0] == {"num_local_experts": 3, "intermediate_size": 48, "skip": ["attention"]}


# ---- forward and generate against the reference -------------------------------------------------


@pytest.mark.parametrize("pad", [(0, 0), (0, 5)])
def test_logits_match_reference(model, ref, pad):
    assert_logits_match(model, ref, *prompts(VOCAB, pad=pad))


@pytest.mark.parametrize("cache", ["default", "make_cache"])
def test_greedy_generate_matches_reference(model, ref, cache):
    ids, mask = prompts(VOCAB, pad=(0, 4))
    out = assert_greedy_matches(model, ref, ids, mask, new=16, cache=cache)  # past every window
    assert_stateless_layers_hold_dummies(model, out.past_key_values)


def test_layer0_without_attention_decodes_without_cache(model, ref):
    assert_uncached_greedy_matches(model, ref, VOCAB)


def test_save_load_round_trip(model, ckpt, tmp_path):
    assert_save_load_round_trip(
        model, ckpt, tmp_path, VOCAB, {0: {"num_local_experts": 3, "intermediate_size": 48, "skip": ["attention"]}}
    )


def test_config_object_with_alias(ref):
    """A transformers config object whose per-layer key is an alias is normalised, not left ambiguous."""
    d = hetero_config(layer_types=["sliding_attention"] * 3 + ["full_attention"])  # layer 1 has its own window
    per_layer = d.pop("per_layer_config")
    d.pop("model_type")
    config = transformers.GptOssConfig(**d)
    config.per_layer_config = per_layer
    model = hetgraph.from_config(config)
    assert model.model.layers[0].mlp.router.weight.shape == (3, 64)
    assert "num_experts" not in config._heterogeneity_spec.per_layer_overrides[0]


# ---- invalid configs ----------------------------------------------------------------------------

BAD = {
    "per_layer_hidden_size": (1, {"hidden_size": 32}, r"layer 1\b.*hidden_size=32\b"),
    "per_layer_vocab_size": (1, {"vocab_size": 64}, r"layer 1\b.*vocab_size=64\b"),
    "per_layer_layer_types": (1, {"layer_types": ["full_attention"] * 4}, r"layer 1\b.*layer_types.*cannot vary"),
    "unknown_skip": (1, {"skip": ["mixer"]}, r"layer 1\b.*unknown block 'mixer'.*'attention', 'mlp'"),
    "linear_not_supported": (1, {"linear": ["mlp"]}, r"layer 1\b.*linear.*unknown block 'mlp'; allowed: \[\]"),
    "chunk_not_supported": (1, {"attention_chunk_size": 4}, r"layer 1\b.*attention_chunk_size.*not a supported"),
    "top_k_above_experts": (3, {"num_experts_per_tok": 7}, r"layer 3\b.*num_experts_per_tok=7.*num_local_experts=6"),
    "zero_experts": (1, {"num_experts": 0}, r"layer 1\b.*num_local_experts=0\b.*positive"),
    "zero_window": (1, {"sliding_window": 0}, r"layer 1\b.*sliding_window=0\b.*positive"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config(case):
    layer, overrides, pattern = BAD[case]
    d = hetero_config()
    d["per_layer_config"][layer] = {**d["per_layer_config"].get(layer, {}), **overrides}
    with pytest.raises(HeteroConfigError, match=pattern):
        hetgraph.from_config(d)


def test_sdpa_is_refused():
    with pytest.raises(HeteroConfigError, match=r"attn_implementation='sdpa'.*gpt_oss.*allowed: \['eager'\]"):
        hetgraph.from_config(hetero_config(), attn_implementation="sdpa")


def test_window_on_full_typed_layer_of_a_config_object_is_an_error():
    d = hetero_config(per_layer_config={1: {"sliding_window": 3}})
    d.pop("model_type")
    per_layer = d.pop("per_layer_config")
    config = transformers.GptOssConfig(**d)
    config.per_layer_config = per_layer
    with pytest.raises(HeteroConfigError, match=r"layer 1: sliding_window=3.*layer_types\[1\]='full_attention'"):
        hetgraph.from_config(config)


def test_layer_types_follow_per_layer_windows():
    d = hetero_config(per_layer_config={0: {"sliding_window": None}, 3: {"sliding_window": 2}})
    model = hetgraph.from_config(d)
    assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    assert [s.window for s in hetgraph.build.model_spec(model)] == [
        ("full", None), ("full", None), ("sliding", 5), ("sliding", 2)
    ]


# ---- compiled -----------------------------------------------------------------------------------


def test_compiled_greedy_decode_two_graphs_no_recompile(ckpt, ref):
    backend = assert_compiled_decode(ckpt, ref, VOCAB)
    eliminate = next(r for r in backend.reports[0].records if r.name == "eliminate_skipped_blocks")
    assert eliminate.changed and set(eliminate.report) == {0, 2}  # the removed attention and MLP left no ops
    # The experts run the default implementation (grouped_mm; its fp32 CPU fallback op) inside the graph.
    graphs = [g for g in backend.reports[1].gm.modules() if isinstance(g, torch.fx.GraphModule)]
    assert any("grouped_mm" in str(n.target) for g in graphs for n in g.graph.nodes)


@pytest.mark.slow
def test_compiled_logits_equal_reference(ckpt, ref):
    report = assert_compiled_logits(ckpt, ref, VOCAB)
    assert not [n for n in report.gm.graph.nodes if n.target is torch.zeros_like]


# ---- export -------------------------------------------------------------------------------------


def test_exported_decode_matches_reference(model, ref, tmp_path):
    assert_exported_decode(model, ref, VOCAB, tmp_path)
