"""The types of a family's description: `FamilyAdapter`, its `Block`s and its `StoredLayout`.

An adapter is data, not code: which classes a family uses, where its decoder layers live, which
submodule is each block and which norm belongs to it, which per-layer attributes the stock
layers honour when built from a per-layer config, and how its checkpoints name their tensors.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import transformers


@dataclass(frozen=True)
class Block:
    """A removable block of a decoder layer: its module, its norm, and what the module returns."""

    name: str  # the `skip` vocabulary: "attention" / "mlp" / "mixer"
    module: str  # attribute on the decoder layer, e.g. "self_attn"
    norm: str  # the pre-norm that feeds only this block, e.g. "input_layernorm"
    # The stock module returns (output, extra) rather than a tensor; a string names the decoder-layer
    # attribute that decides it (Llama4's `is_moe_layer`: its MoE returns a tuple, its dense MLP not).
    returns_tuple: bool | str
    linear_weight: str | None  # name of the Linear inside a "linear" replacement; None: no "linear" form
    # Removing the block leaves the layer nothing but the residual (NemotronH's single-mixer blocks):
    # the whole layer becomes the identity, its norm included.
    whole_layer: bool = False


# The Linear weights of a layer whose shapes its LayerSpec fixes: module name -> (dim, the
# LayerSpec attribute that sizes it). The stock modules of every supported family use these names.
PROJECTIONS: Mapping[str, tuple[int, str]] = {
    "q_proj": (0, "query_size"),
    "k_proj": (0, "key_value_size"),
    "v_proj": (0, "key_value_size"),
    "o_proj": (1, "query_size"),
    "gate_proj": (0, "intermediate_size"),
    "up_proj": (0, "intermediate_size"),
    "down_proj": (1, "intermediate_size"),
}


@dataclass(frozen=True)
class ParamLayout:
    """Which biases and extra norms a family's stock attention and MLP own, for parameter counts by
    formula: a bool, or the config attribute deciding it (read off the stock modeling code)."""

    qkv_bias: bool | str
    o_bias: bool | str
    mlp_bias: bool | str
    qk_norm: bool  # RMSNorm(head_dim) on queries and keys (Qwen3)


@dataclass(frozen=True)
class StoredLayout:
    """How a family's checkpoints name their tensors where the model's state dict differs.

    Applied to a checkpoint's names after its format's own map (`hetgraph.formats`): first the
    prefixes are renamed, then the stacked groups are formed.
    """

    prefixes: tuple[tuple[str, str], ...] = ()  # (stored prefix, model prefix), e.g. ("backbone.", "model.")
    # (pattern, target): stored tensors matching `pattern` (a regex over the renamed names, with a
    # group `index`) are the parts of one model tensor, named `target.format(**groups)`, stacked
    # on a new dim 0 in `index` order (NemotronH stores one tensor per expert).
    stacked: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class FamilyAdapter:
    name: str  # the transformers module, `transformers.models.<name>.modeling_<name>`
    model_types: tuple[str, ...]
    causal_lm: str  # class name in `transformers`
    base_model_attr: str  # attribute of the CausalLM holding the decoder stack
    decoder_layer: str  # class name of one decoder layer
    blocks: tuple[Block, ...]
    per_layer_attributes: frozenset[str]
    # Global attributes the family's config may lack but a layer may override; filled with None.
    optional_globals: tuple[str, ...]
    # The family's config keeps a global `layer_types` that its caches and forward read.
    has_layer_types: bool
    # The stock forward accepts a dict of masks keyed by layer type instead of a padding mask.
    accepts_mask_mapping: bool
    # Attributes stock code reads on the *global* config, which raises when they vary per layer:
    # in the config's `validate()` (run by save_pretrained), and in the decoder stack's forward.
    validate_reads: tuple[str, ...] = ()
    forward_reads: tuple[str, ...] = ()
    # Attention implementations the stock attention supports here; the first is the default.
    attn_implementations: tuple[str, ...] = ("sdpa", "eager")
    # Attribute of the decoder stack holding the RoPE module; None for a family without RoPE.
    rotary: str | None = "rotary_emb"
    # Global per-layer list (1 = RoPE, 0 = NoPE) of families with NoPE layers (Llama4 `no_rope_layers`).
    rope_layers: str | None = None
    # Mixture of experts: which layers are MoE ("*": every layer; else the global list of MoE layer
    # indices, e.g. Llama4 `moe_layers`; single-mixer families say it by mixer type), the per-layer
    # attributes that size the experts, and which attribute is the width of a dense / MoE MLP
    # (None: an MoE layer has no one width, its sizes are all among `moe_attributes`).
    moe_layers: str | None = None
    moe_attributes: tuple[str, ...] = ()
    mlp_width: str = "intermediate_size"
    # The submodule of a MoE layer holding its merged routed experts ([experts, ...] tensors); the
    # router and shared experts sit beside it (a batch-1 decode step reads top-k of its experts).
    routed_experts: str = "experts"
    moe_width: str | None = "intermediate_size"
    # Single-mixer families (NemotronH): the global list of block types, and for each type its mixer
    # kind ("attention" / "mamba" / "mlp" / "moe") and the `skip` name that also removes it.
    mixer_list: str | None = None
    mixer_types: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    mamba_attributes: tuple[str, ...] = ()
    # Per-layer initialisation of parameters the stock `_init_weights` sizes from the global config:
    # `init_layer(layer, layer_config)`, run before `initialize_weights` (which then skips them).
    init_layer: Callable[[Any, Any], None] | None = None
    # How the family's checkpoints name tensors, where that differs from the model's state dict.
    stored_layout: StoredLayout = StoredLayout()
    # Parameter counts by formula (`hetgraph.inspection`); None: blocks that are more than a formula
    # (experts, mamba mixers) are counted on the stock layers built on the meta device.
    param_layout: ParamLayout | None = None
    # Projections whose weight shapes `specialize_shapes` checks against the table.
    projections: Mapping[str, tuple[int, str]] = field(default_factory=lambda: dict(PROJECTIONS))

    @property
    def causal_lm_class(self) -> type:
        return getattr(transformers, self.causal_lm)

    @property
    def config_class(self) -> type:
        return transformers.CONFIG_MAPPING[self.model_types[0]]

    @property
    def decoder_layer_class(self) -> type:
        module = importlib.import_module(f"transformers.models.{self.name}.modeling_{self.name}")
        return getattr(module, self.decoder_layer)

    def block(self, name: str) -> Block:
        return next(b for b in self.blocks if b.name == name)

    @property
    def block_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.blocks)

    @property
    def skip_names(self) -> tuple[str, ...]:
        """The `skip` vocabulary: the blocks, plus the mixer-type names a single-mixer family accepts."""
        aliases = [alias for _, alias in self.mixer_types.values()]
        return tuple(dict.fromkeys([*self.block_names, *aliases]))
