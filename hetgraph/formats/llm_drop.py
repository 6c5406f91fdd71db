"""LLM-Drop checkpoints ("What Matters in Transformers? Not All Attention is Needed").

A stock Llama / Mistral config plus `drop_attn_list` / `drop_mlp_list`: the layers whose attention
or MLP block is removed, norm included. LLM-Drop writes either layer indices (`[25, 26]`) or, once
its config class has saved them, one bool per layer (`[false, ..., true]`); both are read. The
blocks go into each layer's "skip" list.

Weight names are the family's own. A checkpoint may still hold the tensors of the dropped blocks
(LLM-Drop's recipe adds the lists to the unpruned model's config.json, and its loader ignores the
extra tensors): the weight-name map drops exactly those, and nothing else.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Mapping

from hetgraph.arch import adapter_for
from hetgraph.errors import HeteroConfigError

NAME = "llm-drop"
LISTS = {"drop_attn_list": "attention", "drop_mlp_list": "mlp"}
_LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.([A-Za-z_]+)\.")


def detect(config_dict: Mapping[str, Any]) -> bool:
    return any(key in config_dict for key in LISTS)


def dropped_blocks(config_dict: Mapping[str, Any]) -> dict[int, list[str]]:
    """Layer index -> the blocks LLM-Drop removed there, e.g. {3: ["attention"], 5: ["attention", "mlp"]}."""
    num_layers = config_dict.get("num_hidden_layers")
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers <= 0:
        raise HeteroConfigError(f"llm-drop: global num_hidden_layers={num_layers!r} must be a positive integer")
    dropped: dict[int, list[str]] = {}
    for key, block in LISTS.items():
        for i in _indices(key, config_dict.get(key), num_layers):
            if block not in dropped.setdefault(i, []):
                dropped[i].append(block)
    return dict(sorted(dropped.items()))


def to_per_layer(config_dict: Mapping[str, Any]) -> dict:
    """The config with the drop lists moved into `per_layer_config[i]["skip"]`; pure, raises HeteroConfigError."""
    dropped = dropped_blocks(config_dict)
    d = copy.deepcopy(dict(config_dict))
    for key in LISTS:
        d.pop(key, None)
    d.pop("auto_map", None)  # LLM-Drop's remote code; the stock class replaces it
    per_layer = {int(k): dict(v) for k, v in (d.get("per_layer_config") or {}).items()}
    for i, blocks in dropped.items():
        layer = per_layer.setdefault(i, {})
        layer["skip"] = sorted(set(layer.get("skip", [])) | set(blocks))
    d["per_layer_config"] = per_layer
    return d


def weight_name(config_dict: Mapping[str, Any], stored_name: str) -> str | None:
    """None for a tensor of a dropped block (module or its norm), the name unchanged otherwise."""
    match = _LAYER_TENSOR.match(stored_name)
    if match is None:
        return stored_name
    i, attr = int(match.group(1)), match.group(2)
    adapter = adapter_for(config_dict.get("model_type"))
    for block_name in dropped_blocks(config_dict).get(i, ()):
        block = adapter.block(block_name)
        if attr in (block.module, block.norm):
            return None
    return stored_name


def _indices(key: str, value: Any, num_layers: int) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise HeteroConfigError(
            f"llm-drop: {key}={value!r} must be a list of layer indices or one bool per layer"
        )
    if value and all(isinstance(v, bool) for v in value):
        if len(value) != num_layers:
            raise HeteroConfigError(
                f"llm-drop: {key} has {len(value)} bools but num_hidden_layers={num_layers}; "
                "allowed: one bool per layer, or a list of layer indices"
            )
        return [i for i, v in enumerate(value) if v]
    for position, v in enumerate(value):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < num_layers:
            raise HeteroConfigError(
                f"llm-drop: {key}[{position}]={v!r} is not a layer index; allowed: integers 0 to {num_layers - 1} "
                "(or one bool per layer for the whole list)"
            )
    return sorted(set(value))
