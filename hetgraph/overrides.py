"""The `per_layer_config` entries as written: checked, keyed by int, under canonical attribute names.

Both readers of a configuration go through here: `ModelSpec.from_config` (a config object) and
`hetgraph.configs.config_from_dict` (a config.json dict), so both refuse the same entries with
the same message.
"""

from __future__ import annotations

from typing import Any, Mapping

from hetgraph.arch import FamilyAdapter
from hetgraph.errors import HeteroConfigError

# Per-layer keys that name blocks rather than attributes.
BLOCK_LIST_KEYS = ("skip", "linear")
# A residual stream has one width and one vocabulary: these can never vary per layer.
# Nor can the per-model lists that say what each layer is (they are indexed by layer already).
_GLOBAL_ONLY = (
    "hidden_size",
    "vocab_size",
    "num_hidden_layers",
    "rope_parameters",
    "tie_word_embeddings",
    "layer_types",
    "layers_block_type",
    "no_rope_layers",
    "moe_layers",
)


def layer_where(i: int, attr: str, value: Any) -> str:
    return f"layer {i}: {attr}={value!r}"


def positive(i: int, attr: str, value: Any, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        allowed = "a positive integer or None" if optional else "a positive integer"
        raise HeteroConfigError(f"{layer_where(i, attr, value)} is invalid; allowed: {allowed}")
    return value


def validate_overrides(adapter: FamilyAdapter, config_or_none, overrides: Mapping) -> dict[int, dict]:
    """Check raw `per_layer_config` entries; returns them with int keys and canonical attribute names."""
    if not isinstance(overrides, Mapping):
        raise HeteroConfigError(f"per_layer_config must be a mapping of layer index to overrides, got {overrides!r}")
    num_layers = (
        config_or_none
        if isinstance(config_or_none, int)
        else config_or_none._getattr_without_heterogeneous_validation("num_hidden_layers")
    )
    # Aliases (GptOss `num_experts`, NemotronH `num_local_experts`, `layer_types`) bypass transformers'
    # ambiguity check: validate, and hand on, the real names.
    attribute_map = dict(getattr(adapter.config_class, "attribute_map", None) or {})
    allowed = sorted(adapter.per_layer_attributes | set(BLOCK_LIST_KEYS))
    result: dict[int, dict] = {}
    for key, layer_overrides in overrides.items():
        try:
            i = int(key)
        except (TypeError, ValueError):
            raise HeteroConfigError(f"per_layer_config key {key!r} is not a layer index") from None
        if not 0 <= i < num_layers:
            raise HeteroConfigError(
                f"per_layer_config: layer index {i} is out of range; allowed: 0 to {num_layers - 1}"
            )
        if not isinstance(layer_overrides, Mapping):
            raise HeteroConfigError(f"layer {i}: overrides must be a mapping, got {layer_overrides!r}")
        clean: dict[str, Any] = {}
        for attr, value in layer_overrides.items():
            attr = attribute_map.get(attr, attr)
            if attr in BLOCK_LIST_KEYS:
                value = _block_list(adapter, i, attr, value)
            elif attr in _GLOBAL_ONLY:
                raise HeteroConfigError(
                    f"{layer_where(i, attr, value)}: {attr} cannot vary per layer (the residual stream and "
                    f"vocabulary are shared); per-layer attributes allowed: {allowed}"
                )
            elif attr not in adapter.per_layer_attributes:
                raise HeteroConfigError(
                    f"{layer_where(i, attr, value)}: {attr!r} is not a supported per-layer attribute for "
                    f"{adapter.name}; allowed: {allowed}"
                )
            else:
                optional = attr in ("sliding_window", "attention_chunk_size", "head_dim", "num_key_value_heads")
                positive(i, attr, value, optional=optional)
            clean[attr] = value
        if "sliding_window" in clean and "attention_chunk_size" in clean:
            if clean["sliding_window"] is not None and clean["attention_chunk_size"] is not None:
                raise HeteroConfigError(
                    f"layer {i}: sliding_window={clean['sliding_window']} and "
                    f"attention_chunk_size={clean['attention_chunk_size']} are both set; a layer has at most one"
                )
        result[i] = clean
    return result


def _block_list(adapter: FamilyAdapter, i: int, key: str, value: Any) -> list[str]:
    if key == "skip":
        allowed = list(adapter.skip_names)
    else:  # "linear": blocks that have a one-Linear form
        allowed = [b.name for b in adapter.blocks if b.linear_weight is not None]
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise HeteroConfigError(f"{layer_where(i, key, value)} must be a list of block names; allowed: {allowed}")
    for name in value:
        if name not in allowed:
            raise HeteroConfigError(f"{layer_where(i, key, value)}: unknown block {name!r}; allowed: {allowed}")
    return sorted(set(value))
