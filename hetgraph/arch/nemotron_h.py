"""NemotronH: hybrid blocks, each one norm + ONE mixer (mamba2, attention, MLP or MoE) + residual.

The block type comes from the global `layers_block_type` (alias `layer_types`). Removing a
block's mixer (`skip: ["mixer"]`, or the name of its type: `attention` on attention blocks, `mlp`
on MLP and MoE blocks, `mamba` on mamba blocks) leaves only the residual, so the whole block
becomes the identity, its norm included. Attention is NoPE (no rotary embedding).

The stock `_init_weights` sizes the mamba `A_log` / `dt_bias` from the *global* `mamba_num_heads`,
which raises (or mis-sizes) when it varies per layer: `init_mamba` does the same per layer.
"""

from __future__ import annotations

import math

import torch

from hetgraph.arch.types import Block, FamilyAdapter, StoredLayout


@torch.no_grad()
def init_mamba(layer, layer_config) -> None:
    """Initialise a mamba mixer's A_log, D and dt_bias as the stock `_init_weights` does, from its own config."""
    mixer = getattr(layer, "mixer", None)
    if getattr(layer, "block_type", None) != "linear_attention" or not hasattr(mixer, "A_log"):
        return
    heads = mixer.num_heads
    mixer.A_log.copy_(torch.log(torch.arange(1, heads + 1, dtype=torch.float32)))
    mixer.D.fill_(1.0)
    lo, hi = math.log(layer_config.time_step_min), math.log(layer_config.time_step_max)
    dt = torch.exp(torch.rand(heads) * (hi - lo) + lo).clamp(min=layer_config.time_step_floor)
    mixer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
    for param in (mixer.A_log, mixer.D, mixer.dt_bias):
        param._is_hf_initialized = True


# Real checkpoints, and transformers' own `save_pretrained`, store `backbone.` for `model.` and
# one `mixer.experts.{e}.{up,down}_proj.weight` per expert; the model holds
# `mixer.experts.{up,down}_proj` of shape [experts, ...] (transformers merges them the same way).
STORED_LAYOUT = StoredLayout(
    prefixes=(("backbone.", "model."),),
    stacked=((r"(?P<module>.*\.mixer\.experts)\.(?P<index>\d+)\.(?P<proj>up_proj|down_proj)\.weight", "{module}.{proj}"),),
)


NEMOTRON_H = FamilyAdapter(
    name="nemotron_h",
    model_types=("nemotron_h",),
    causal_lm="NemotronHForCausalLM",
    base_model_attr="model",
    decoder_layer="NemotronHBlock",
    blocks=(Block("mixer", module="mixer", norm="norm", returns_tuple=False, linear_weight=None, whole_layer=True),),
    per_layer_attributes=frozenset(
        {
            # attention blocks
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            # MLP blocks
            "intermediate_size",
            # MoE blocks
            "n_routed_experts",  # alias `num_local_experts`
            "num_experts_per_tok",
            "moe_intermediate_size",
            "moe_shared_expert_intermediate_size",
            # mamba blocks
            "mamba_num_heads",
            "mamba_head_dim",
            "ssm_state_size",
            "n_groups",
            "conv_kernel",
        }
    ),
    optional_globals=(),
    has_layer_types=False,
    accepts_mask_mapping=True,
    rotary=None,
    moe_attributes=(
        "n_routed_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "moe_shared_expert_intermediate_size",
    ),
    moe_width=None,
    mixer_list="layers_block_type",
    mixer_types={
        "full_attention": ("attention", "attention"),
        "linear_attention": ("mamba", "mamba"),
        "mlp": ("mlp", "mlp"),
        "moe": ("moe", "mlp"),
    },
    mamba_attributes=("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel"),
    init_layer=init_mamba,
    stored_layout=STORED_LAYOUT,
)
