"""GptOss: every layer is attention (with per-head sinks) + a mixture of experts.

The stock MoE (`GptOssMLP`) returns `(output, router_scores)`, so a removed MLP's marker returns a
pair too. GptOss has no SDPA path (the sinks need eager attention), so hetgraph's masks are
additive. Sliding windows are typed in the global `layer_types`; a layer given its own window is
retyped there (see `spec.config_from_dict`).
"""

from __future__ import annotations

from hetgraph.arch.types import Block, FamilyAdapter

GPT_OSS = FamilyAdapter(
    name="gpt_oss",
    model_types=("gpt_oss",),
    causal_lm="GptOssForCausalLM",
    base_model_attr="model",
    decoder_layer="GptOssDecoderLayer",
    blocks=(
        Block("attention", module="self_attn", norm="input_layernorm", returns_tuple=True, linear_weight=None),
        Block("mlp", module="mlp", norm="post_attention_layernorm", returns_tuple=True, linear_weight=None),
    ),
    per_layer_attributes=frozenset(
        {
            "intermediate_size",  # expert width
            "num_local_experts",  # alias `num_experts`
            "num_experts_per_tok",
            "num_attention_heads",  # with the per-head `sinks`
            "num_key_value_heads",
            "head_dim",
            "sliding_window",
        }
    ),
    optional_globals=(),
    has_layer_types=True,
    accepts_mask_mapping=True,
    # `_supports_sdpa = False`: the sinks are an extra softmax column only the eager path adds.
    attn_implementations=("eager",),
    moe_layers="*",
    moe_attributes=("num_local_experts", "num_experts_per_tok"),
)
