"""gpt-oss-puzzle checkpoints (`model_type` "gpt_oss_puzzle", `GptOssPuzzleForCausalLM`, e.g.
nvidia/gpt-oss-puzzle-88B) onto the stock GptOss.

One flat `block_configs` entry per layer, `{"num_local_experts": E, "sliding_window": W | null}`:
null is full attention, a number a sliding window of that size (so a layer may have its own
window, 128 or 8192). `layer_types` follows the entries (a given one must agree); the expert
counts and windows become `per_layer_config`.

Weights: the stock GptOss names. MXFP4 expert weights (`*_blocks` / `*_scales`, a
`quantization_config` with `quant_method: mxfp4`, as NVIDIA ships the model) are not read:
hetgraph loads floating-point weights only, so such a checkpoint is refused with what to do. The
FP8 KV-cache calibration scales (`*.k_scale`, `*.v_scale`, `*.q_scale`), which NVIDIA's own
modeling ignores too, are not read.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Mapping

from hetgraph.errors import HeteroConfigError
from hetgraph.formats._blocks import block_list, per_layer_fields

NAME = "gpt_oss_puzzle"
MODEL_TYPE = "gpt_oss_puzzle"
ARCHITECTURE = "GptOssPuzzleForCausalLM"
_FIELDS = ("num_local_experts", "sliding_window")  # what a block entry may set
_KV_SCALE = re.compile(r"\.(k|v|q)_scale$")


def detect(config_dict: Mapping[str, Any]) -> bool:
    return config_dict.get("model_type") == MODEL_TYPE or ARCHITECTURE in (config_dict.get("architectures") or ())


def to_per_layer(config_dict: Mapping[str, Any]) -> dict:
    """A GptOss config dict with `layer_types` and `per_layer_config`; pure, raises HeteroConfigError."""
    blocks = block_list(NAME, config_dict)
    d = copy.deepcopy(dict(config_dict))
    quant = d.pop("quantization_config", None)
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, Mapping) else quant
        raise HeteroConfigError(
            f"{NAME}: quantization_config {method!r}: hetgraph reads floating-point weights only, and the MXFP4 "
            "expert weights (*_blocks / *_scales) are not dequantized on load; dequantize them first (e.g. "
            "transformers' Mxfp4Config(dequantize=True) with the remote code, then save_pretrained)"
        )
    if d.get("per_layer_config"):
        raise HeteroConfigError(f"{NAME}: a config has either block_configs or per_layer_config, not both")
    windows = [b.get("sliding_window") for b in blocks]
    types = ["full_attention" if w is None else "sliding_attention" for w in windows]
    if d.get("layer_types") is not None and list(d["layer_types"]) != types:
        raise HeteroConfigError(
            f"{NAME}: layer_types {d['layer_types']} disagrees with block_configs' windows {windows} "
            "(null: full attention)"
        )
    per_layer_fields(NAME, d, [{k: v for k, v in b.items() if k not in _FIELDS} for b in blocks], {}, ())  # others
    common = max(set(w for w in windows if w is not None), key=windows.count, default=None)
    d["sliding_window"] = d.get("sliding_window") or common
    experts = [b.get("num_local_experts") or d.get("num_local_experts") for b in blocks]
    if None in experts:
        raise HeteroConfigError(f"{NAME} block_configs[{experts.index(None)}]: no num_local_experts, and no global one")
    d["num_local_experts"] = max(experts)  # the parent: the most experts
    overrides: dict[int, dict] = {}
    for i, (e, w) in enumerate(zip(experts, windows)):
        if e != d["num_local_experts"]:
            overrides.setdefault(i, {})["num_local_experts"] = e
        if w is not None and w != d["sliding_window"]:
            overrides.setdefault(i, {})["sliding_window"] = w
    d["per_layer_config"] = overrides
    d["layer_types"] = types
    d["num_hidden_layers"] = len(blocks)
    for key in ("block_configs", "auto_map"):
        d.pop(key, None)
    d["model_type"] = "gpt_oss"
    d["architectures"] = ["GptOssForCausalLM"]
    return d


def weight_name(config_dict: Mapping[str, Any], stored_name: str) -> str | None:
    """None for FP8 KV-cache calibration scales (not read); stored names are otherwise the model's."""
    return None if _KV_SCALE.search(stored_name) else stored_name
