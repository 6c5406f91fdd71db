"""Llama4 text (`Llama4ForCausalLM`): attention (RoPE or NoPE) + a dense MLP or a mixture of experts.

Which layers are NoPE (`no_rope_layers`, 1 = RoPE) and MoE (`moe_layers`) are global lists. A MoE
layer's width is `intermediate_size` (experts and shared expert), a dense layer's is
`intermediate_size_mlp`. The MoE returns `(output, router_logits)` and the dense MLP a tensor; the
layer says which through `is_moe_layer`. Chunked attention is typed in the global `layer_types`,
which hetgraph rewrites from the per-layer `attention_chunk_size` values.
"""

from __future__ import annotations

from hetgraph.arch.types import Block, FamilyAdapter

LLAMA4_TEXT = FamilyAdapter(
    name="llama4",
    model_types=("llama4_text",),
    causal_lm="Llama4ForCausalLM",
    base_model_attr="model",
    decoder_layer="Llama4TextDecoderLayer",
    blocks=(
        Block("attention", module="self_attn", norm="input_layernorm", returns_tuple=True, linear_weight=None),
        # The MoE returns (output, router_logits), the dense MLP a tensor: the layer's `is_moe_layer` says which.
        Block("mlp", module="feed_forward", norm="post_attention_layernorm", returns_tuple="is_moe_layer",
              linear_weight=None),
    ),
    per_layer_attributes=frozenset(
        {
            "intermediate_size",  # MoE layers: experts and shared expert
            "intermediate_size_mlp",  # dense layers
            "num_local_experts",
            "num_experts_per_tok",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "attention_chunk_size",
        }
    ),
    optional_globals=(),
    has_layer_types=True,
    accepts_mask_mapping=True,
    rope_layers="no_rope_layers",
    moe_layers="moe_layers",
    moe_attributes=("num_local_experts", "num_experts_per_tok"),
    mlp_width="intermediate_size_mlp",
)
