"""The LayerSpec table: one frozen, validated description per decoder layer.

Everything downstream (build, caches, masks, passes, inspect) reads this table instead of the
config. Every validation error is a `HeteroConfigError` naming the layer, the attribute, the value
and what is allowed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

from transformers import CONFIG_MAPPING, PreTrainedConfig

from hetgraph.arch import FamilyAdapter, adapter_for

FULL, SKIP, LINEAR = "full", "skip", "linear"
BLOCK_KINDS = (FULL, SKIP, LINEAR)
# Per-layer keys that name blocks rather than attributes.
BLOCK_LIST_KEYS = ("skip", "linear")
# A residual stream has one width and one vocabulary: these can never vary per layer.
_GLOBAL_ONLY = ("hidden_size", "vocab_size", "num_hidden_layers", "rope_parameters", "tie_word_embeddings")


class HeteroConfigError(ValueError):
    """An invalid heterogeneous configuration or checkpoint; the message says where and what is allowed."""


@dataclass(frozen=True)
class LayerSpec:
    index: int
    attention: str  # FULL / SKIP / LINEAR
    mlp: str
    num_attention_heads: int | None = None  # None unless attention is FULL
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None  # None unless mlp is FULL
    sliding_window: int | None = None
    attention_chunk_size: int | None = None

    @property
    def has_attention(self) -> bool:
        return self.attention == FULL

    @property
    def window(self) -> tuple[str, int | None] | None:
        """("full", None) / ("sliding", W) / ("chunked", C); None for a layer without attention."""
        if not self.has_attention:
            return None
        if self.sliding_window is not None:
            return ("sliding", self.sliding_window)
        if self.attention_chunk_size is not None:
            return ("chunked", self.attention_chunk_size)
        return ("full", None)

    @property
    def variant_key(self) -> tuple:
        """Everything that changes this layer's compiled code, and nothing else (not its index)."""
        return (
            self.attention,
            self.mlp,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
            self.intermediate_size,
            self.window,
        )

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        if not self.has_attention:
            return 0
        return 2 * self.num_key_value_heads * self.head_dim * dtype_bytes

    def describe(self) -> str:
        parts = [f"attn={self.attention}", f"mlp={self.mlp}"]
        if self.has_attention:
            parts.append(f"heads={self.num_attention_heads}/{self.num_key_value_heads}x{self.head_dim}")
            kind, size = self.window
            if size is not None:
                parts.append(f"{kind}={size}")
        if self.intermediate_size is not None:
            parts.append(f"ffn={self.intermediate_size}")
        return " ".join(parts)


@dataclass(frozen=True)
class ModelSpec:
    adapter: FamilyAdapter
    hidden_size: int
    vocab_size: int
    layers: tuple[LayerSpec, ...]

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerSpec:
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    @property
    def attention_layers(self) -> list[int]:
        return [s.index for s in self.layers if s.has_attention]

    def variants(self) -> dict[tuple, list[int]]:
        """Distinct layer variants, each with the layers that share it, in first-seen order."""
        groups: dict[tuple, list[int]] = {}
        for s in self.layers:
            groups.setdefault(s.variant_key, []).append(s.index)
        return groups

    def window_groups(self) -> dict[tuple, list[int]]:
        """Attention-bearing layers grouped by window; the first of each group is its representative."""
        groups: dict[tuple, list[int]] = {}
        for s in self.layers:
            if s.has_attention:
                groups.setdefault(s.window, []).append(s.index)
        return groups

    @classmethod
    def from_config(cls, config: PreTrainedConfig) -> "ModelSpec":
        adapter = adapter_for(config.model_type)
        if config.is_heterogeneous:
            _validate_overrides(adapter, config, config._heterogeneity_spec.per_layer_overrides)
        hidden = _global(config, "hidden_size")
        layers = tuple(
            _layer_spec(adapter, config, i, config.per_layer_config[i], hidden) for i in range(config.num_hidden_layers)
        )
        return cls(adapter=adapter, hidden_size=hidden, vocab_size=_global(config, "vocab_size"), layers=layers)


def _global(config: PreTrainedConfig, name: str) -> int:
    value = config._getattr_without_heterogeneous_validation(name, None)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise HeteroConfigError(f"global config: {name}={value!r} must be a positive integer")
    return value


def _layer_where(i: int, attr: str, value: Any) -> str:
    return f"layer {i}: {attr}={value!r}"


def _positive(i: int, attr: str, value: Any, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        allowed = "a positive integer or None" if optional else "a positive integer"
        raise HeteroConfigError(f"{_layer_where(i, attr, value)} is invalid; allowed: {allowed}")
    return value


def _block_kinds(adapter: FamilyAdapter, i: int, layer_config: PreTrainedConfig) -> dict[str, str]:
    kinds = {name: FULL for name in adapter.block_names}
    for key, kind in (("skip", SKIP), ("linear", LINEAR)):
        for name in getattr(layer_config, key, None) or []:
            if kinds[name] != FULL:
                raise HeteroConfigError(
                    f"layer {i}: block {name!r} is listed in both 'skip' and 'linear'; a block is one of {BLOCK_KINDS}"
                )
            kinds[name] = kind
    return kinds


def _window(adapter: FamilyAdapter, config: PreTrainedConfig, i: int, lc: PreTrainedConfig) -> tuple:
    sliding = getattr(lc, "sliding_window", None)
    chunk = getattr(lc, "attention_chunk_size", None)
    if adapter.has_layer_types:
        # Qwen keeps a global `sliding_window` that only the layers typed "sliding_attention" use.
        layer_type = (getattr(config, "layer_types", None) or ["full_attention"] * len(config.per_layer_config))[i]
        if layer_type != "sliding_attention":
            sliding = None
        if layer_type != "chunked_attention":
            chunk = None
    sliding = _positive(i, "sliding_window", sliding, optional=True)
    chunk = _positive(i, "attention_chunk_size", chunk, optional=True)
    if sliding is not None and chunk is not None:
        raise HeteroConfigError(
            f"layer {i}: sliding_window={sliding} and attention_chunk_size={chunk} are both set; "
            "a layer has at most one of them"
        )
    return sliding, chunk


def _layer_spec(adapter: FamilyAdapter, config, i: int, lc: PreTrainedConfig, hidden: int) -> LayerSpec:
    kinds = _block_kinds(adapter, i, lc)
    fields: dict[str, Any] = {"index": i, "attention": kinds["attention"], "mlp": kinds["mlp"]}
    if kinds["attention"] == FULL:
        heads = _positive(i, "num_attention_heads", lc.num_attention_heads)
        kv = _positive(i, "num_key_value_heads", getattr(lc, "num_key_value_heads", None) or heads)
        if heads % kv:
            raise HeteroConfigError(
                f"layer {i}: num_attention_heads={heads} is not divisible by num_key_value_heads={kv}; "
                "allowed: a divisor of num_attention_heads"
            )
        head_dim = _positive(i, "head_dim", getattr(lc, "head_dim", None) or hidden // heads)
        sliding, chunk = _window(adapter, config, i, lc)
        fields.update(
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            sliding_window=sliding,
            attention_chunk_size=chunk,
        )
    if kinds["mlp"] == FULL:
        fields["intermediate_size"] = _positive(i, "intermediate_size", lc.intermediate_size)
    return LayerSpec(**fields)


def _validate_overrides(adapter: FamilyAdapter, config_or_none, overrides: Mapping) -> dict[int, dict]:
    """Check raw `per_layer_config` entries; returns them with int keys and canonical attribute names."""
    if not isinstance(overrides, Mapping):
        raise HeteroConfigError(f"per_layer_config must be a mapping of layer index to overrides, got {overrides!r}")
    num_layers = (
        config_or_none
        if isinstance(config_or_none, int)
        else config_or_none._getattr_without_heterogeneous_validation("num_hidden_layers")
    )
    attribute_map = (
        {} if isinstance(config_or_none, int) else config_or_none._getattr_without_heterogeneous_validation("attribute_map")
    )
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
                    f"{_layer_where(i, attr, value)}: {attr} cannot vary per layer (the residual stream and "
                    f"vocabulary are shared); per-layer attributes allowed: {allowed}"
                )
            elif attr not in adapter.per_layer_attributes:
                raise HeteroConfigError(
                    f"{_layer_where(i, attr, value)}: {attr!r} is not a supported per-layer attribute for "
                    f"{adapter.name}; allowed: {allowed}"
                )
            else:
                optional = attr in ("sliding_window", "attention_chunk_size", "head_dim", "num_key_value_heads")
                _positive(i, attr, value, optional=optional)
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
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise HeteroConfigError(
            f"{_layer_where(i, key, value)} must be a list of block names; allowed: {list(adapter.block_names)}"
        )
    for name in value:
        if name not in adapter.block_names:
            raise HeteroConfigError(
                f"{_layer_where(i, key, value)}: unknown block {name!r}; allowed: {list(adapter.block_names)}"
            )
    return sorted(set(value))


def config_from_dict(config_dict: Mapping[str, Any]) -> PreTrainedConfig:
    """A transformers config object from a config.json-style dict with `per_layer_config`.

    Fills the globals a layer may override but the family's config lacks (e.g. Llama's
    `sliding_window`), and applies `per_layer_config` after construction, because some configs
    (Llama) read per-layer attributes such as `num_attention_heads` globally while validating.
    """
    d = copy.deepcopy(dict(config_dict))
    model_type = d.get("model_type")
    if model_type is None:
        raise HeteroConfigError("config has no 'model_type'; hetgraph needs it to pick the model family")
    adapter = adapter_for(model_type)
    num_layers = d.get("num_hidden_layers")
    if not isinstance(num_layers, int) or num_layers <= 0:
        raise HeteroConfigError(f"global config: num_hidden_layers={num_layers!r} must be a positive integer")
    raw = d.pop("per_layer_config", None) or {}
    overrides = _validate_overrides(adapter, num_layers, raw)
    overridden = {attr for o in overrides.values() for attr in o}
    for name in adapter.optional_globals:
        if name in overridden and d.get(name) is None:
            # transformers wants each per-layer attribute globally too; head_dim has a natural default.
            d[name] = _default_head_dim(d) if name == "head_dim" else None
    if "linear" in overridden:
        d.setdefault("linear", [])
    if adapter.has_layer_types:
        _set_layer_types(d, num_layers, overrides)
    d.pop("transformers_version", None)
    d.pop("allow_global_per_layer_attribute_access", None)  # see build._allow_global_reads
    try:
        config = CONFIG_MAPPING[model_type](**d)
        config.per_layer_config = overrides
    except HeteroConfigError:
        raise
    except (ValueError, TypeError, RuntimeError) as e:
        raise HeteroConfigError(f"{model_type} config rejected by transformers: {e}") from e
    return config


def _default_head_dim(d: dict) -> int:
    try:
        return d["hidden_size"] // d["num_attention_heads"]
    except (KeyError, TypeError, ZeroDivisionError):
        raise HeteroConfigError(
            "global config: hidden_size and num_attention_heads must be set to derive the global head_dim"
        ) from None


def _set_layer_types(d: dict, num_layers: int, overrides: dict[int, dict]) -> None:
    """Qwen: a layer with its own window is typed accordingly in the global `layer_types`."""
    if not any("sliding_window" in o or "attention_chunk_size" in o for o in overrides.values()):
        return
    layer_types = list(d.get("layer_types") or [])
    if not layer_types:
        sliding = d.get("sliding_window") if d.get("use_sliding_window") else None
        start = d.get("max_window_layers", num_layers)
        layer_types = [
            "sliding_attention" if sliding is not None and i >= start else "full_attention" for i in range(num_layers)
        ]
    for i, o in overrides.items():
        if o.get("sliding_window") is not None:
            layer_types[i] = "sliding_attention"
        elif o.get("attention_chunk_size") is not None:
            layer_types[i] = "chunked_attention"
        elif "sliding_window" in o or "attention_chunk_size" in o:
            layer_types[i] = "full_attention"
    d["layer_types"] = layer_types
