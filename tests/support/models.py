"""The tiny heterogeneous case models, one table for every family, and the greedy `generate` kwargs.

Llama, Mistral, Qwen2 and Qwen3 share one per-layer table that exercises every per-layer feature;
GptOss, Llama4 text and NemotronH each have their own. No hetgraph import here (see `support`).
"""

from __future__ import annotations

import copy

VOCAB = 128

# The references never stop at EOS; neither may generate.
GREEDY = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

LLAMA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

# ---- Llama, Mistral, Qwen2, Qwen3 -----------------------------------------------------------------

# Layer 0 has no attention: naive sequence-length bookkeeping reads layer 0 and goes wrong.
_PER_LAYER = {
    0: {"skip": ["attention"], "intermediate_size": 96},
    1: {"num_key_value_heads": 1, "sliding_window": 3},
    2: {"skip": ["mlp"], "head_dim": 8, "attention_chunk_size": 4},
    3: {"num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 48},
    4: {"sliding_window": 5, "skip": ["attention", "mlp"]},
    5: {"sliding_window": 5},
}

_GLOBAL = dict(
    hidden_size=64,
    num_hidden_layers=6,
    vocab_size=VOCAB,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

# ---- GptOss: per-layer experts, heads (with sinks), head_dim, windows and removed blocks -----------

# The default `layer_types` alternate sliding (even layers) / full (odd layers).
_GPT_OSS_PER_LAYER = {
    # No attention at layer 0; 3 experts, given under the alias `num_experts`.
    0: {"skip": ["attention"], "num_experts": 3, "intermediate_size": 48},
    # A window on a layer the global layer_types calls full; one KV head; top-1 routing.
    1: {"sliding_window": 3, "num_key_value_heads": 1, "num_experts_per_tok": 1},
    # Its own head_dim (its own RoPE table) and 2 heads (2 sinks); no MLP; the global window 5.
    2: {"skip": ["mlp"], "head_dim": 8, "num_attention_heads": 2, "num_key_value_heads": 2},
    # Full attention, 8 heads, 6 experts.
    3: {"num_attention_heads": 8, "num_local_experts": 6, "intermediate_size": 24},
}
GPT_OSS = dict(
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
    per_layer_config=_GPT_OSS_PER_LAYER,
)

# ---- Llama4 text: per-layer experts, widths (MoE and dense), heads, head_dim, chunks, NoPE and MoE
# layer lists and removed blocks ----------------------------------------------------------------------

_LLAMA4_PER_LAYER = {
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
LLAMA4_TEXT = dict(
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
    per_layer_config=_LLAMA4_PER_LAYER,
)

# ---- NemotronH: per-layer attention heads, MLP and MoE widths, expert counts and mamba dims, and
# removed mixers (the block becomes the identity) ------------------------------------------------------

_NEMOTRON_H_PER_LAYER = {
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
NEMOTRON_H = dict(
    model_type="nemotron_h",
    hidden_size=64,
    vocab_size=VOCAB,
    layers_block_type=["full_attention", "linear_attention", "moe", "full_attention", "mlp", "linear_attention"],
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
    per_layer_config=_NEMOTRON_H_PER_LAYER,
)

# The families with a config of their own, by model_type.
OTHER_FAMILIES = {"gpt_oss": GPT_OSS, "llama4_text": LLAMA4_TEXT, "nemotron_h": NEMOTRON_H}


def hetero_config(family: str = "llama", **overrides) -> dict:
    """The case config.json-style dict of `family` (a model_type above), a fresh copy, with `overrides`."""
    if family in OTHER_FAMILIES:
        d = copy.deepcopy(OTHER_FAMILIES[family])
    else:
        d = dict(_GLOBAL, model_type=family, per_layer_config=copy.deepcopy(_PER_LAYER))
        if family == "mistral":
            d["sliding_window"] = None  # Mistral's default is a global 4096 window
    d.update(overrides)
    return d


def homogeneous_config(family: str = "llama", **overrides) -> dict:
    """A Llama-family config without per-layer overrides, the case's global sizes."""
    d = dict(_GLOBAL, model_type=family)
    d.update(overrides)
    return d
