"""Per-family adapters: the only place that knows transformers' module and attribute names.

An adapter is data, not code: which classes a family uses, where its decoder layers live, which
submodule is each block and which norm belongs to it, and which per-layer attributes the stock
layers honour when built from a per-layer config.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import transformers

from hetgraph.errors import HeteroConfigError


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
    moe_width: str | None = "intermediate_size"
    # Single-mixer families (NemotronH): the global list of block types, and for each type its mixer
    # kind ("attention" / "mamba" / "mlp" / "moe") and the `skip` name that also removes it.
    mixer_list: str | None = None
    mixer_types: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    mamba_attributes: tuple[str, ...] = ()
    # Per-layer initialisation of parameters the stock `_init_weights` sizes from the global config:
    # `init_layer(layer, layer_config)`, run before `initialize_weights` (which then skips them).
    init_layer: Callable[[Any, Any], None] | None = None
    # The family's stored checkpoint layout, when it differs from the model's state-dict names:
    # `checkpoint_index(TensorIndex) -> TensorIndex` under the model's names (NemotronH: `backbone.`
    # prefix, one tensor per expert), applied after `hetgraph.formats`' own renames.
    checkpoint_index: Callable[[Any], Any] | None = None

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


from hetgraph.arch.gpt_oss import GPT_OSS  # noqa: E402
from hetgraph.arch.llama import LLAMA_FAMILY  # noqa: E402
from hetgraph.arch.llama4 import LLAMA4_TEXT  # noqa: E402
from hetgraph.arch.nemotron_h import NEMOTRON_H  # noqa: E402

ADAPTERS: tuple[FamilyAdapter, ...] = (*LLAMA_FAMILY, GPT_OSS, LLAMA4_TEXT, NEMOTRON_H)
_BY_MODEL_TYPE = {mt: a for a in ADAPTERS for mt in a.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def adapter_for(model_type: str) -> FamilyAdapter:
    """The adapter of a `model_type`; raises HeteroConfigError listing the supported ones."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise HeteroConfigError(
            f"model_type {model_type!r} is not supported by hetgraph; supported: {supported_model_types()}"
        ) from None
