"""From config.json to a transformers config object: the one reading of a config dict.

A dict in any layout `hetgraph.formats` reads becomes the stock family's config with
`per_layer_config`; globals a layer overrides but the family lacks are filled, and the global
`layer_types` is set from the per-layer windows, because the stock layers and caches read the
window type there. A config object gets the same retyping, on hetgraph's own copy.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

from transformers import CONFIG_MAPPING, PreTrainedConfig

from hetgraph import formats
from hetgraph.arch import FamilyAdapter, adapter_for
from hetgraph.errors import HeteroConfigError
from hetgraph.overrides import validate_overrides
from hetgraph.spec import ModelSpec, global_list
from hetgraph.stock_guard import strip_guard


def config_from_dict(config_dict: Mapping[str, Any]) -> PreTrainedConfig:
    """A transformers config object from a config.json-style dict with `per_layer_config`.

    Other checkpoint layouts (Nemotron-NAS `block_configs`, LLM-Drop drop lists) are first turned
    into that form by `hetgraph.formats.read`. Fills the globals a layer may override but the
    family's config lacks (e.g. Llama's `sliding_window`), and applies `per_layer_config` after
    construction, because some configs (Llama) read per-layer attributes such as
    `num_attention_heads` globally while validating.
    """
    return config_from_per_layer(formats.read(strip_guard(config_dict)).config)


def config_from_per_layer(config_dict: Mapping[str, Any]) -> PreTrainedConfig:
    """`config_from_dict` of a dict already in the per-layer form (`formats.read(...).config`), the
    stock guard already stripped."""
    # transformers writes inf / nan as {"__float__": "Infinity"} (NemotronH's `time_step_limit`).
    d = PreTrainedConfig._decode_special_floats(copy.deepcopy(dict(config_dict)))
    model_type = d.get("model_type")
    if model_type is None:
        raise HeteroConfigError("config has no 'model_type'; hetgraph needs it to pick the model family")
    adapter = adapter_for(model_type)
    num_layers = d.get("num_hidden_layers")
    if num_layers is None and adapter.mixer_list is not None:
        # NemotronH: the layer count is the length of the block-type list (`num_hidden_layers` is derived).
        stock = _stock_config(adapter, {k: v for k, v in d.items() if k != "per_layer_config"})
        num_layers = len(global_list(stock, adapter.mixer_list))
    if not isinstance(num_layers, int) or num_layers <= 0:
        raise HeteroConfigError(f"global config: num_hidden_layers={num_layers!r} must be a positive integer")
    raw = d.pop("per_layer_config", None) or {}
    overrides = validate_overrides(adapter, num_layers, raw)
    overridden = {attr for o in overrides.values() for attr in o}
    for name in adapter.optional_globals:
        if name in overridden and d.get(name) is None:
            # transformers wants each per-layer attribute globally too.
            d[name] = None
    if _needs_global_head_dim(adapter, overridden, d.get("head_dim")):
        d["head_dim"] = _default_head_dim(d)
    if "linear" in overridden:
        d.setdefault("linear", [])
    if adapter.has_layer_types:
        layer_types = list(d.get("layer_types") or [])
        if not layer_types:
            layer_types = list(_stock_config(adapter, {k: v for k, v in d.items() if k != "layer_types"}).layer_types)
        retyped = _retyped_layer_types(adapter, layer_types, num_layers, overrides, d.get)
        if retyped != layer_types or "layer_types" in d:
            d["layer_types"] = retyped
    d.pop("transformers_version", None)
    try:
        config = CONFIG_MAPPING[model_type](**d)
        config.per_layer_config = overrides
    except HeteroConfigError:
        raise
    except (ValueError, TypeError, RuntimeError) as e:
        raise HeteroConfigError(f"{model_type} config rejected by transformers: {e}") from e
    return config


def _needs_global_head_dim(adapter: FamilyAdapter, overridden: set, head_dim) -> bool:
    """Whether a config lacking a global head_dim (Qwen2) must get its natural one pinned.

    A layer's head count does not change its head_dim. Without a global head_dim, a layer with
    fewer heads would derive a wider one (its attention class reads `hidden_size //
    num_attention_heads` on the layer's view) and the model's one RoPE table would not fit it.
    """
    return "head_dim" in adapter.optional_globals and head_dim is None and bool(
        overridden & {"head_dim", "num_attention_heads"}
    )


def _default_head_dim(d: dict) -> int:
    try:
        return d["hidden_size"] // d["num_attention_heads"]
    except (KeyError, TypeError, ZeroDivisionError):
        raise HeteroConfigError(
            "global config: hidden_size and num_attention_heads must be set to derive the global head_dim"
        ) from None


def _stock_config(adapter: FamilyAdapter, d: dict) -> PreTrainedConfig:
    try:
        return adapter.config_class(**d)
    except (ValueError, TypeError, RuntimeError) as e:
        raise HeteroConfigError(f"{adapter.model_types[0]} config rejected by transformers: {e}") from e


_WINDOW_TYPES = (("sliding_window", "sliding_attention"), ("attention_chunk_size", "chunked_attention"))


def _retyped_layer_types(
    adapter: FamilyAdapter, layer_types: list[str], num_layers: int, overrides: Mapping[int, dict], global_value
) -> list[str]:
    """Each layer typed in the global `layer_types` by its own window, which the stock layers and caches read.

    A layer with its own window is typed "sliding_attention" / "chunked_attention", one whose window is
    None "full_attention" (GptOss and Qwen read a layer's window only on sliding-typed layers; Llama4
    derives the types once from the *global* chunk size). NoPE layers stay full (spec checks them).
    `global_value(name)` reads a global attribute.
    """
    layer_types = list(layer_types)
    nope = global_value(adapter.rope_layers) if adapter.rope_layers else None
    for i in range(num_layers):
        o = overrides.get(i, {})
        if nope and i < len(nope) and not nope[i]:
            continue
        for attr, layer_type in _WINDOW_TYPES:
            if attr in o:
                if o[attr] is not None:
                    layer_types[i] = layer_type
                elif layer_types[i] == layer_type:
                    layer_types[i] = "full_attention"
            elif layer_types[i] == layer_type and global_value(attr) is None and attr in adapter.per_layer_attributes:
                layer_types[i] = "full_attention"  # typed windowed, but there is no window to use
    return layer_types


def normalize_config(config: PreTrainedConfig | Mapping[str, Any]) -> PreTrainedConfig:
    """hetgraph's own copy of a config: an object is copied (and retyped), a dict read."""
    if isinstance(config, PreTrainedConfig):
        return _retyped_copy(config)
    if isinstance(config, Mapping):
        return config_from_dict(config)
    raise TypeError(f"config must be a transformers config or a config.json-style dict, got {type(config).__name__}")


def _retyped_copy(config: PreTrainedConfig) -> PreTrainedConfig:
    """A copy of a config object, its `layer_types` set from its per-layer windows as a dict's are.

    hetgraph sets attributes on the config it builds from (attention implementation, canonical
    per-layer names): the user's object is never touched.
    """
    config = copy.deepcopy(config)
    adapter = adapter_for(config.model_type)
    if not config.is_heterogeneous:
        return config
    read = config._getattr_without_heterogeneous_validation
    overridden = {a for o in config._heterogeneity_spec.per_layer_overrides.values() for a in o}
    if _needs_global_head_dim(adapter, overridden, read("head_dim", None)):
        config.head_dim = _default_head_dim({n: read(n, None) for n in ("hidden_size", "num_attention_heads")})
    if not adapter.has_layer_types:
        return config
    layer_types = read("layer_types", None)
    if not layer_types:
        return config
    overrides = validate_overrides(adapter, config, config._heterogeneity_spec.per_layer_overrides)
    retyped = _retyped_layer_types(adapter, list(layer_types), len(layer_types), overrides, lambda n: read(n, None))
    if retyped != list(layer_types):
        config.layer_types = retyped
    return config


def model_config_dict(config: PreTrainedConfig) -> dict:
    """The config.json dict of a config object, as hetgraph reads it back (no stock guard or switch)."""
    d = strip_guard(config.to_dict())
    d.pop("allow_global_per_layer_attribute_access", None)
    d.pop("transformers_version", None)
    return d


def select_layers(config_dict: Mapping[str, Any], layers: Sequence[int]) -> dict:
    """The per-layer config.json dict of a model whose layer j is layer `layers[j]` of `config_dict`.

    `per_layer_config` and the family's per-layer global lists (`layer_types`, NoPE, MoE and block
    type lists) are re-indexed; layers may repeat. What profiling and layer cuts are built from.
    """
    d = copy.deepcopy(strip_guard(config_dict))
    adapter = adapter_for(d.get("model_type"))
    num_layers = len(ModelSpec.from_config(config_from_per_layer(d)))
    bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < num_layers]
    if bad or not layers:
        raise HeteroConfigError(f"select_layers: layers {bad or list(layers)} are invalid; allowed: 0 to {num_layers - 1}")
    per_layer = {int(k): v for k, v in (d.get("per_layer_config") or {}).items()}
    d["per_layer_config"] = {j: copy.deepcopy(per_layer[i]) for j, i in enumerate(layers) if i in per_layer}
    lists = [adapter.rope_layers, adapter.mixer_list, "layer_types" if adapter.has_layer_types else None]
    for name in filter(None, lists):
        if d.get(name) is not None:
            d[name] = [d[name][i] for i in layers]
    if adapter.moe_layers not in (None, "*") and d.get(adapter.moe_layers) is not None:
        moe = set(d[adapter.moe_layers])
        d[adapter.moe_layers] = [j for j, i in enumerate(layers) if i in moe]
    if d.get("num_hidden_layers") is not None or adapter.mixer_list is None:
        d["num_hidden_layers"] = len(layers)
    return d
