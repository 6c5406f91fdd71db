"""What the Puzzle layouts share: one flat `block_configs` entry per layer whose non-null fields
override the global config for that layer (NVIDIA's `get_*_config_for_layer`, TensorRT-LLM's and
SGLang's readers all apply this rule)."""

from __future__ import annotations

from typing import Any, Mapping

from hetgraph.errors import HeteroConfigError


def block_list(layout: str, config_dict: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    blocks = config_dict.get("block_configs")
    if not isinstance(blocks, list) or not blocks or not all(isinstance(b, Mapping) for b in blocks):
        raise HeteroConfigError(f"{layout}: block_configs must be a non-empty list of mappings, one per layer")
    layers = config_dict.get("num_hidden_layers")
    if layers is not None and layers != len(blocks):
        raise HeteroConfigError(
            f"{layout}: block_configs has {len(blocks)} entries but num_hidden_layers={layers}; allowed: one per layer"
        )
    return blocks


def per_layer_fields(layout: str, d: dict, blocks, per_layer: Mapping[str, str], fixed: tuple[str, ...]) -> dict:
    """Layer -> {hetgraph attribute: value} for the fields that differ from the global one.

    `per_layer`: block field -> the per-layer attribute hetgraph implements. `fixed`: fields
    hetgraph accepts only with one value for every layer (it becomes the global; a field set
    per layer with two values is an error naming the layer). Any other non-null field is an error.
    `d` (the config dict being built) gets a global for a field the blocks set and it lacks: the
    first block's value, as TensorRT-LLM fills missing globals.
    """
    overrides: dict[int, dict] = {}
    for i, block in enumerate(blocks):
        for field, value in block.items():
            if field == "block_type" or value is None:
                continue
            where = f"{layout} block_configs[{i}]"
            if field in fixed:
                if d.setdefault(field, value) != value:
                    raise HeteroConfigError(
                        f"{where}: {field}={value!r} differs from {d[field]!r} (the global value or an earlier "
                        f"block's); hetgraph implements one {field} for every layer"
                    )
            elif field in per_layer:
                attr = per_layer[field]
                if d.get(attr) is None:
                    d[attr] = value
                if value != d[attr]:
                    overrides.setdefault(i, {})[attr] = value
            else:
                raise HeteroConfigError(
                    f"{where}: field {field}={value!r} is not supported; hetgraph reads "
                    f"{sorted([*per_layer, *fixed])} per block"
                )
    return overrides
