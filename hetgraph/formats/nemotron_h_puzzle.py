"""NemotronH-Puzzle checkpoints (`model_type` "nemotron_h_puzzle", `NemotronHPuzzleForCausalLM`,
e.g. NVIDIA-Nemotron-Labs-3-Puzzle-75B-A9B) onto the stock NemotronH.

One `block_configs` entry per layer: `block_type` ("mamba", "attention", "moe", "mlp") and the
fields that layer overrides (`moe_intermediate_size`, `num_experts_per_tok`, `n_routed_experts`,
`moe_shared_expert_intermediate_size`, `intermediate_size`, head counts, mamba sizes); a field
absent or null takes the global value. The block types become `layers_block_type` (a given one, or
`hybrid_override_pattern`, must agree), the fields `per_layer_config`. Fields that change the
computation and that hetgraph implements only globally (`moe_latent_size`, `routed_scaling_factor`,
`n_group`, `topk_group`, `norm_topk_prob`) must have one value in every block; per-layer sliding
windows or indexers are an error naming the block.

Weights: Puzzle stores `model.*` (stock NemotronH: `backbone.*`); names are otherwise the stock
ones, experts one tensor each (stacked by the family's stored layout). The multi-token-prediction
head (`mtp_block_configs`, `mtp.*` tensors), a draft for speculative decoding, is not built and
its tensors are not read.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

from hetgraph.errors import HeteroConfigError
from hetgraph.formats._blocks import block_list, per_layer_fields

NAME = "nemotron_h_puzzle"
MODEL_TYPE = "nemotron_h_puzzle"
ARCHITECTURE = "NemotronHPuzzleForCausalLM"
_BLOCK_TYPES = {"mamba": "linear_attention", "attention": "full_attention", "moe": "moe", "mlp": "mlp",
                "linear_attention": "linear_attention", "full_attention": "full_attention"}  # fmt: skip
_PATTERN = {"M": "linear_attention", "*": "full_attention", "E": "moe", "-": "mlp"}
_PER_LAYER = {name: name for name in (
    "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "n_routed_experts",
    "num_experts_per_tok", "moe_intermediate_size", "moe_shared_expert_intermediate_size", "mamba_num_heads",
    "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel")}  # fmt: skip
_PER_LAYER["num_local_experts"] = "n_routed_experts"
_FIXED = ("moe_latent_size", "routed_scaling_factor", "n_group", "topk_group", "norm_topk_prob")
_MTP = ("mtp_block_configs", "mtp_layers_block_type", "mtp_hybrid_override_pattern")


def detect(config_dict: Mapping[str, Any]) -> bool:
    return config_dict.get("model_type") == MODEL_TYPE or ARCHITECTURE in (config_dict.get("architectures") or ())


def to_per_layer(config_dict: Mapping[str, Any]) -> dict:
    """A NemotronH config dict with `layers_block_type` and `per_layer_config`; pure, raises HeteroConfigError."""
    blocks = block_list(NAME, config_dict)
    d = copy.deepcopy(dict(config_dict))
    if d.get("per_layer_config"):
        raise HeteroConfigError(f"{NAME}: a config has either block_configs or per_layer_config, not both")
    types = []
    for i, block in enumerate(blocks):
        kind = block.get("block_type")
        if kind not in _BLOCK_TYPES:
            raise HeteroConfigError(
                f"{NAME} block_configs[{i}]: block_type={kind!r} is not a NemotronH block; allowed: "
                f"{sorted(_BLOCK_TYPES)}"
            )
        types.append(_BLOCK_TYPES[kind])
    given = _given_types(d)
    if given is not None and given != types:
        raise HeteroConfigError(
            f"{NAME}: layers_block_type / hybrid_override_pattern {given} disagrees with block_configs' block types "
            f"{types}"
        )
    d["per_layer_config"] = per_layer_fields(NAME, d, blocks, _PER_LAYER, _FIXED)
    for key in ("block_configs", "hybrid_override_pattern", "num_hidden_layers", "blockwise_members", "auto_map",
                "num_nextn_predict_layers", *_MTP):  # fmt: skip
        d.pop(key, None)
    d["layers_block_type"] = types
    d["model_type"] = "nemotron_h"
    d["architectures"] = ["NemotronHForCausalLM"]
    return d


def weight_name(config_dict: Mapping[str, Any], stored_name: str) -> str | None:
    """None for the MTP head's tensors (not built); stored names are otherwise the model's."""
    return None if stored_name.startswith("mtp.") else stored_name


def _given_types(d: Mapping[str, Any]) -> list[str] | None:
    if d.get("layers_block_type") is not None:
        return [_BLOCK_TYPES.get(t, t) for t in d["layers_block_type"]]
    pattern = d.get("hybrid_override_pattern")
    if pattern is not None:
        return [_PATTERN.get(c, c) for c in pattern]
    return None
