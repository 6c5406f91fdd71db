"""The LayerSpec table: one frozen, validated description per decoder layer.

Everything downstream (build, caches, masks, passes, inspect) reads this table instead of the
config: `ModelSpec.from_config` builds it from a transformers config object (reading config.json
dicts into one is `hetgraph.configs`). Every validation error is a `HeteroConfigError` naming the
layer, the attribute, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedConfig

from hetgraph.arch import FamilyAdapter, adapter_for
from hetgraph.errors import HeteroConfigError
from hetgraph.overrides import layer_where, positive, validate_overrides

FULL, SKIP, LINEAR = "full", "skip", "linear"
NONE = "none"  # the layer has no such block by construction (a NemotronH mamba block has no MLP)
BLOCK_KINDS = (FULL, SKIP, LINEAR)


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
    mamba: str = NONE  # FULL / SKIP for a NemotronH mamba block
    mixer_type: str | None = None  # single-mixer families: "attention" / "mamba" / "mlp" / "moe"
    # Family-specific sizes that change the layer's code, as sorted (name, value) pairs: expert
    # counts and widths, mamba dims, ("nope", True) for a Llama4 layer without RoPE.
    extra: tuple[tuple[str, Any], ...] = ()

    @property
    def has_attention(self) -> bool:
        return self.attention == FULL

    @property
    def has_mamba(self) -> bool:
        return self.mamba == FULL

    @property
    def mixer(self) -> str:
        """The kind of a single-mixer block's mixer (FULL / SKIP); NONE for two-block layers."""
        if self.mixer_type is None:
            return NONE
        return next(k for k in (self.attention, self.mlp, self.mamba) if k != NONE)

    @property
    def query_size(self) -> int | None:
        """Width of the query (and attention output) projection: heads x head_dim."""
        return self.num_attention_heads * self.head_dim if self.has_attention else None

    @property
    def key_value_size(self) -> int | None:
        return self.num_key_value_heads * self.head_dim if self.has_attention else None

    @property
    def uses_rope(self) -> bool:
        return self.has_attention and not dict(self.extra).get("nope", False)

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
            self.mamba,
            self.mixer_type,
            self.extra,
        )

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        if not self.has_attention:
            return 0
        return 2 * self.num_key_value_heads * self.head_dim * dtype_bytes

    def describe(self) -> str:
        if self.mixer_type is not None:
            parts = [f"{self.mixer_type}={self.mixer}"]
        else:
            parts = [f"attn={self.attention}", f"mlp={self.mlp}"]
        if self.has_attention:
            parts.append(f"heads={self.num_attention_heads}/{self.num_key_value_heads}x{self.head_dim}")
            kind, size = self.window
            if size is not None:
                parts.append(f"{kind}={size}")
        if self.intermediate_size is not None:
            parts.append(f"ffn={self.intermediate_size}")
        parts.extend(f"{name}={value}" for name, value in self.extra)
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
        overrides = {}
        if config.is_heterogeneous:
            overrides = validate_overrides(adapter, config, config._heterogeneity_spec.per_layer_overrides)
        hidden = _global(config, "hidden_size")
        layers = tuple(
            _layer_spec(adapter, config, i, config.per_layer_config[i], hidden, overrides.get(i, {}))
            for i in range(config.num_hidden_layers)
        )
        if not any(s.has_attention for s in layers):
            # transformers' caches (and so `generate`) ask an attention layer for the past length;
            # with none, they fail mid-generation.
            raise HeteroConfigError(
                f"no layer of the {len(layers)} has attention: at least one must; "
                f"layers {[s.index for s in layers]} all remove or replace it (or are mamba layers)"
            )
        return cls(adapter=adapter, hidden_size=hidden, vocab_size=_global(config, "vocab_size"), layers=layers)


def _global(config: PreTrainedConfig, name: str) -> int:
    value = config._getattr_without_heterogeneous_validation(name, None)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise HeteroConfigError(f"global config: {name}={value!r} must be a positive integer")
    return value


def global_list(config: PreTrainedConfig, name: str) -> list:
    return list(config._getattr_without_heterogeneous_validation(name, None) or [])


def _mixer(adapter: FamilyAdapter, config: PreTrainedConfig, i: int) -> tuple[str, str] | None:
    """(mixer type, skip alias) of layer i of a single-mixer family; None for two-block families."""
    if adapter.mixer_list is None:
        return None
    block_type = global_list(config, adapter.mixer_list)[i]
    if block_type not in adapter.mixer_types:
        raise HeteroConfigError(
            f"layer {i}: {adapter.mixer_list}[{i}]={block_type!r} is not a known block type; "
            f"allowed: {sorted(adapter.mixer_types)}"
        )
    return adapter.mixer_types[block_type]


def _block_kinds(adapter: FamilyAdapter, i: int, layer_config: PreTrainedConfig, mixer) -> dict[str, str]:
    if mixer is not None:
        return _mixer_kinds(adapter, i, layer_config, mixer)
    kinds = {name: FULL for name in adapter.block_names}
    for key, kind in (("skip", SKIP), ("linear", LINEAR)):
        for name in getattr(layer_config, key, None) or []:
            if kinds[name] != FULL:
                raise HeteroConfigError(
                    f"layer {i}: block {name!r} is listed in both 'skip' and 'linear'; a block is one of {BLOCK_KINDS}"
                )
            kinds[name] = kind
    kinds.setdefault("mamba", NONE)
    return kinds


def _mixer_kinds(adapter: FamilyAdapter, i: int, layer_config: PreTrainedConfig, mixer) -> dict[str, str]:
    """A single-mixer block: its one mixer is kept or removed; the other kinds are NONE."""
    mixer_type, alias = mixer
    kind = FULL
    for name in getattr(layer_config, "skip", None) or []:
        if name not in ("mixer", alias):
            raise HeteroConfigError(
                f"layer {i}: skip {name!r} does not match the block's type ({adapter.mixer_list}[{i}] is a "
                f"{mixer_type} block); allowed for this block: ['mixer', {alias!r}]"
            )
        kind = SKIP
    kinds = {"attention": NONE, "mlp": NONE, "mamba": NONE}
    kinds["mlp" if mixer_type == "moe" else mixer_type] = kind
    return kinds


def _window(adapter: FamilyAdapter, config: PreTrainedConfig, i: int, lc: PreTrainedConfig, explicit: dict) -> tuple:
    # Only windows the family supports per layer count (NemotronH has an unused `sliding_window` field).
    supported = adapter.per_layer_attributes
    sliding = getattr(lc, "sliding_window", None) if "sliding_window" in supported else None
    chunk = getattr(lc, "attention_chunk_size", None) if "attention_chunk_size" in supported else None
    if adapter.rope_layers is not None and not global_list(config, adapter.rope_layers)[i]:
        for attr in ("sliding_window", "attention_chunk_size"):
            if explicit.get(attr) is not None:
                raise HeteroConfigError(
                    f"{layer_where(i, attr, explicit[attr])}: layer {i} is a NoPE layer "
                    f"({adapter.rope_layers}[{i}]=0), which attends globally in {adapter.name}; "
                    "allowed: a window only on RoPE layers"
                )
        return None, None  # NoPE layers are full attention whatever the global chunk size
    if adapter.has_layer_types:
        # The stock layer and cache read a layer's window only where the global `layer_types` says so.
        layer_type = (getattr(config, "layer_types", None) or ["full_attention"] * len(config.per_layer_config))[i]
        for attr, wanted in (("sliding_window", "sliding_attention"), ("attention_chunk_size", "chunked_attention")):
            if explicit.get(attr) is not None and layer_type != wanted:
                raise HeteroConfigError(
                    f"{layer_where(i, attr, explicit[attr])}, but layer_types[{i}]={layer_type!r}: the stock layer "
                    f"and cache would ignore the window; allowed: layer_types[{i}]={wanted!r} (hetgraph.from_config "
                    "sets it on its own copy of the config)"
                )
        if layer_type != "sliding_attention":
            sliding = None
        if layer_type != "chunked_attention":
            chunk = None
    sliding = positive(i, "sliding_window", sliding, optional=True)
    chunk = positive(i, "attention_chunk_size", chunk, optional=True)
    if sliding is not None and chunk is not None:
        raise HeteroConfigError(
            f"layer {i}: sliding_window={sliding} and attention_chunk_size={chunk} are both set; "
            "a layer has at most one of them"
        )
    return sliding, chunk


def _is_moe(adapter: FamilyAdapter, config: PreTrainedConfig, i: int, mixer) -> bool:
    if mixer is not None:
        return mixer[0] == "moe"
    if adapter.moe_layers is None:
        return False
    return adapter.moe_layers == "*" or i in global_list(config, adapter.moe_layers)


def _experts(adapter: FamilyAdapter, i: int, lc: PreTrainedConfig) -> dict[str, int]:
    sizes = {attr: positive(i, attr, getattr(lc, attr, None)) for attr in adapter.moe_attributes}
    experts, top_k = sizes[adapter.moe_attributes[0]], sizes["num_experts_per_tok"]
    if top_k > experts:
        raise HeteroConfigError(
            f"layer {i}: num_experts_per_tok={top_k} exceeds {adapter.moe_attributes[0]}={experts}; "
            f"allowed: 1 to {experts}"
        )
    groups = getattr(lc, "n_group", None)  # NemotronH's group-limited routing: top-2 within each group
    if groups is not None and (experts % groups or experts // groups < 2):
        raise HeteroConfigError(
            f"layer {i}: {adapter.moe_attributes[0]}={experts} with n_group={groups}: the router needs "
            "a multiple of n_group with at least 2 experts per group"
        )
    return sizes


def _mamba(adapter: FamilyAdapter, i: int, lc: PreTrainedConfig) -> dict[str, int]:
    sizes = {attr: positive(i, attr, getattr(lc, attr, None)) for attr in adapter.mamba_attributes}
    if sizes["mamba_num_heads"] % sizes["n_groups"]:
        raise HeteroConfigError(
            f"layer {i}: mamba_num_heads={sizes['mamba_num_heads']} is not divisible by n_groups={sizes['n_groups']}; "
            "allowed: a multiple of n_groups"
        )
    return sizes


def _layer_spec(adapter: FamilyAdapter, config, i: int, lc: PreTrainedConfig, hidden: int, explicit=None) -> LayerSpec:
    explicit = explicit or {}
    mixer = _mixer(adapter, config, i)
    kinds = _block_kinds(adapter, i, lc, mixer)
    fields: dict[str, Any] = {"index": i, "attention": kinds["attention"], "mlp": kinds["mlp"], "mamba": kinds["mamba"]}
    if mixer is not None:
        fields["mixer_type"] = mixer[0]
    extra: dict[str, Any] = {}
    if kinds["attention"] == FULL:
        heads = positive(i, "num_attention_heads", lc.num_attention_heads)
        kv = positive(i, "num_key_value_heads", getattr(lc, "num_key_value_heads", None) or heads)
        if heads % kv:
            raise HeteroConfigError(
                f"layer {i}: num_attention_heads={heads} is not divisible by num_key_value_heads={kv}; "
                "allowed: a divisor of num_attention_heads"
            )
        head_dim = positive(i, "head_dim", getattr(lc, "head_dim", None) or hidden // heads)
        sliding, chunk = _window(adapter, config, i, lc, explicit)
        fields.update(
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            sliding_window=sliding,
            attention_chunk_size=chunk,
        )
        if adapter.rope_layers is not None and not global_list(config, adapter.rope_layers)[i]:
            extra["nope"] = True
    if kinds["mlp"] == FULL:
        if _is_moe(adapter, config, i, mixer):
            extra.update(_experts(adapter, i, lc))
            width = adapter.moe_width
        else:
            width = adapter.mlp_width
        if width is not None:
            fields["intermediate_size"] = positive(i, width, getattr(lc, width, None))
    if kinds["mamba"] == FULL:
        extra.update(_mamba(adapter, i, lc))
    fields["extra"] = tuple(sorted(extra.items()))
    return LayerSpec(**fields)
