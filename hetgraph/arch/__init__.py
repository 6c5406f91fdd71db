"""Per-family adapters: the only place that knows transformers' module and attribute names.

An adapter is data, not code: which classes a family uses, where its decoder layers live, which
submodule is each block and which norm belongs to it, and which per-layer attributes the stock
layers honour when built from a per-layer config.
"""

from __future__ import annotations

from dataclasses import dataclass

import importlib

import transformers


@dataclass(frozen=True)
class Block:
    """A removable block of a decoder layer: its module, its norm, and what the module returns."""

    name: str  # the `skip` vocabulary: "attention" / "mlp"
    module: str  # attribute on the decoder layer, e.g. "self_attn"
    norm: str  # the pre-norm that feeds only this block, e.g. "input_layernorm"
    returns_tuple: bool  # the stock module returns (output, extra) rather than a tensor
    linear_weight: str  # name of the Linear inside a "linear" replacement, e.g. "linear_attn"


@dataclass(frozen=True)
class FamilyAdapter:
    name: str
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

    @property
    def causal_lm_class(self) -> type:
        return getattr(transformers, self.causal_lm)

    @property
    def decoder_layer_class(self) -> type:
        module = importlib.import_module(f"transformers.models.{self.name}.modeling_{self.name}")
        return getattr(module, self.decoder_layer)

    def block(self, name: str) -> Block:
        return next(b for b in self.blocks if b.name == name)

    @property
    def block_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.blocks)


from hetgraph.arch.llama import LLAMA_FAMILY  # noqa: E402

ADAPTERS: tuple[FamilyAdapter, ...] = LLAMA_FAMILY
_BY_MODEL_TYPE = {mt: a for a in ADAPTERS for mt in a.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def adapter_for(model_type: str) -> FamilyAdapter:
    """The adapter of a `model_type`; raises HeteroConfigError listing the supported ones."""
    from hetgraph.spec import HeteroConfigError

    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise HeteroConfigError(
            f"model_type {model_type!r} is not supported by hetgraph; supported: {supported_model_types()}"
        ) from None
