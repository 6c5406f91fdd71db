"""Llama, Mistral, Qwen2 and Qwen3: one decoder-layer shape, one adapter definition."""

from __future__ import annotations

from hetgraph.arch.types import Block, FamilyAdapter, ParamLayout

_BLOCKS = (
    Block("attention", module="self_attn", norm="input_layernorm", returns_tuple=True, linear_weight="linear_attn"),
    Block("mlp", module="mlp", norm="post_attention_layernorm", returns_tuple=False, linear_weight="linear_mlp"),
)

_ATTRIBUTES = frozenset(
    {
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "sliding_window",
        "attention_chunk_size",
    }
)


def _family(
    name: str,
    causal_lm: str,
    decoder_layer: str,
    optional_globals,
    has_layer_types: bool,
    param_layout: ParamLayout,
    validate_reads=(),
    forward_reads=(),
) -> FamilyAdapter:
    return FamilyAdapter(
        name=name,
        model_types=(name,),
        causal_lm=causal_lm,
        base_model_attr="model",
        decoder_layer=decoder_layer,
        blocks=_BLOCKS,
        per_layer_attributes=_ATTRIBUTES,
        optional_globals=optional_globals,
        has_layer_types=has_layer_types,
        accepts_mask_mapping=has_layer_types,
        validate_reads=validate_reads,
        forward_reads=forward_reads,
        param_layout=param_layout,
    )


LLAMA_FAMILY = (
    # LlamaConfig.validate() reads num_attention_heads; MistralModel.forward reads sliding_window.
    _family(
        "llama",
        "LlamaForCausalLM",
        "LlamaDecoderLayer",
        ("sliding_window", "attention_chunk_size"),
        False,
        ParamLayout(qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias", qk_norm=False),
        validate_reads=("num_attention_heads",),
    ),
    _family(
        "mistral",
        "MistralForCausalLM",
        "MistralDecoderLayer",
        ("attention_chunk_size",),
        False,
        ParamLayout(qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=False),
        forward_reads=("sliding_window",),
    ),
    _family(
        "qwen2",
        "Qwen2ForCausalLM",
        "Qwen2DecoderLayer",
        ("attention_chunk_size", "head_dim"),
        True,
        ParamLayout(qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False),
    ),
    _family(
        "qwen3",
        "Qwen3ForCausalLM",
        "Qwen3DecoderLayer",
        ("attention_chunk_size",),
        True,
        ParamLayout(qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias=False, qk_norm=True),
    ),
)
