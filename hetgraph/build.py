"""Build heterogeneous models on the stock transformers classes.

The model is the family's own `*ForCausalLM`, built from a homogeneous parent config on the meta
device; then decoder layer i is rebuilt from `config.per_layer_config[i]` with the family's own
decoder-layer class, and each removed block (with its norm) is replaced by a parameter-free marker
module. transformers' classes are never modified; per-window masks and per-head-dim RoPE are fed
in through a forward pre-hook and the layers' instance forwards (see `hetgraph.attention`).
"""

from __future__ import annotations

import copy
import logging
import os
import re
import types
from typing import Mapping

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

from hetgraph import attention, regions, slicing, stock_guard
from hetgraph import placement as placement_mod
from hetgraph.arch import FamilyAdapter
from hetgraph.checkpoint import check_tensors
from hetgraph.configs import config_from_dict, model_config_dict, normalize_config
from hetgraph.contract import attach
from hetgraph.errors import HeteroConfigError
from hetgraph.loading import open_checkpoint
from hetgraph.spec import FULL, LINEAR, NONE, SKIP, ModelSpec

logger = logging.getLogger(__name__)


class SkippedBlock(nn.Module):
    """A removed attention or MLP block: no parameters, no cache; adds exactly zero to the residual."""

    def __init__(self, block: str, returns_tuple: bool):
        super().__init__()
        self.block = block
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = torch.zeros_like(hidden_states)
        return (out, None) if self.returns_tuple else out

    def extra_repr(self) -> str:
        return f"removed {self.block}"


class SkippedLayer(nn.Module):
    """A decoder layer whose only block was removed (NemotronH): the identity, with no parameters or cache."""

    def __init__(self, block: str, block_type: str):
        super().__init__()
        self.block = block
        self.block_type = block_type  # the stock forward picks each layer's mask by it

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states

    def extra_repr(self) -> str:
        return f"removed {self.block} ({self.block_type})"


class SkippedNorm(nn.Module):
    """Stands in for the norm of a removed block (which has no weights): the identity."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


class LinearBlock(nn.Module):
    """A block replaced by one Linear(hidden, hidden, no bias) map, e.g. Nemotron-NAS `replace_with_linear`."""

    def __init__(self, block: str, weight_name: str, hidden_size: int, returns_tuple: bool):
        super().__init__()
        self.block = block
        self.weight_name = weight_name
        self.returns_tuple = returns_tuple
        self.add_module(weight_name, nn.Linear(hidden_size, hidden_size, bias=False))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = getattr(self, self.weight_name)(hidden_states)
        return (out, None) if self.returns_tuple else out


def parent_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The homogeneous parent: the global values, no per-layer overrides."""
    parent = copy.deepcopy(config)
    parent.per_layer_config = None
    return parent


def _layer_config(
    config: PreTrainedConfig, i: int, attn_implementation: str, experts_implementation: str | None = None
) -> PreTrainedConfig:
    lc = config.per_layer_config[i]
    if lc is config:
        lc = copy.copy(config)
    # A layer config is a copy taken now: carry the implementations, or masks, logging and MoE
    # dispatch go wrong (experts keep their layer config and dispatch on it).
    lc._attn_implementation = attn_implementation
    if experts_implementation is not None:
        lc._experts_implementation = experts_implementation
    return lc


def _build_layer(
    adapter: FamilyAdapter, config, spec: ModelSpec, i: int, attn_implementation: str, experts_implementation=None
) -> nn.Module:
    lc = _layer_config(config, i, attn_implementation, experts_implementation)
    s = spec[i]
    whole = next((b for b in adapter.blocks if b.whole_layer and getattr(s, b.name) == SKIP), None)
    if whole is not None:
        block_type = config._getattr_without_heterogeneous_validation(adapter.mixer_list)[i]
        return SkippedLayer(s.mixer_type or whole.name, block_type)
    layer = adapter.decoder_layer_class(_config_for_kept_blocks(adapter, lc, s), i)
    for block in adapter.blocks:
        kind = getattr(s, block.name)
        if kind == SKIP:
            returns_tuple = block.returns_tuple
            if isinstance(returns_tuple, str):  # decided per layer, e.g. Llama4's `is_moe_layer`
                returns_tuple = bool(getattr(layer, returns_tuple))
            setattr(layer, block.module, SkippedBlock(block.name, returns_tuple))
            setattr(layer, block.norm, SkippedNorm())
        elif kind == LINEAR:
            linear = LinearBlock(block.name, block.linear_weight, spec.hidden_size, block.returns_tuple)
            setattr(layer, block.module, linear)
    return layer


def _config_for_kept_blocks(adapter: FamilyAdapter, lc, s):
    """The stock layer constructor sizes every block: give a block that will be replaced size 1."""
    if s.attention in (FULL, NONE) and s.mlp in (FULL, NONE):
        return lc
    cfg = copy.copy(lc)
    if s.mlp not in (FULL, NONE):
        for width in {adapter.mlp_width, adapter.moe_width} - {None}:
            setattr(cfg, width, 1)
    if s.attention not in (FULL, NONE):
        cfg.num_attention_heads = cfg.num_key_value_heads = cfg.head_dim = 1
    return cfg


def _install_runtime(model: PreTrainedModel, spec: ModelSpec, attn_implementation: str) -> None:
    """The hook that feeds per-window masks and per-head-dim RoPE through the stock forward, and the
    layers' forwards that pick their own and call their variant's region (`hetgraph.regions`)."""
    base = getattr(model, spec.adapter.base_model_attr)
    global_head_dim = _global_head_dim(model.config)
    extra_dims = sorted({s.head_dim for s in spec if s.uses_rope and s.head_dim != global_head_dim})
    if extra_dims and spec.adapter.rotary is not None:
        rotary_cls = type(getattr(base, spec.adapter.rotary))
        base.hetgraph_rotary = nn.ModuleDict(
            {str(d): rotary_cls(_config_with_head_dim(model.config, d)) for d in extra_dims}
        )
    base.register_forward_pre_hook(attention.ModelInputsHook(spec, base, attn_implementation), with_kwargs=True)
    # Each layer's forward picks its inputs, and dynamo traces each layer variant once (for hetgraph's backends).
    regions.install(base.layers, spec)
    attention.install_generate_hooks(model, spec)
    model.save_pretrained = types.MethodType(save_pretrained, model)
    attach(model, spec)


def save_pretrained(model: PreTrainedModel, save_directory, *args, **kwargs) -> None:
    """transformers' own `save_pretrained`, then config.json made unambiguous to stock readers.

    See `hetgraph.stock_guard`: the ambiguity guard's switch is never persisted, and a checkpoint
    stock transformers would silently misread is marked so that it refuses it.
    """
    if kwargs.get("push_to_hub"):
        raise ValueError("hetgraph models: save_pretrained(push_to_hub=True) is not supported; save, then upload")
    before = _weight_files(save_directory)
    type(model).save_pretrained(model, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True):
        # transformers removes another save's shards, not its index or single file: a directory
        # must never hold two sets of weights.
        after = _weight_files(save_directory)
        for path, stamp in before.items():
            if after.get(path) == stamp:
                os.remove(path)
        stock_guard.guard_saved_config(save_directory)


# The files transformers' `save_pretrained` writes a model's weights to; others (a PEFT adapter's
# `adapter_model.safetensors`, say) are never touched.
_MODEL_WEIGHTS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def _weight_files(directory) -> dict[str, tuple[int, int]]:
    """The model's safetensors weights and their index in `directory`: path -> (inode, mtime)."""
    if not os.path.isdir(directory):
        return {}
    found = {}
    for name in os.listdir(directory):
        if _MODEL_WEIGHTS.fullmatch(name):
            st = os.stat(os.path.join(directory, name))
            found[os.path.join(directory, name)] = (st.st_ino, st.st_mtime_ns)
    return found


def _global_head_dim(config) -> int:
    head_dim = config._getattr_without_heterogeneous_validation("head_dim", None)
    heads = config._getattr_without_heterogeneous_validation("num_attention_heads")
    return head_dim or config._getattr_without_heterogeneous_validation("hidden_size") // heads


def _config_with_head_dim(config, head_dim: int):
    cfg = parent_config(config)
    cfg.head_dim = head_dim
    return cfg


def _allow_global_reads(adapter: FamilyAdapter, config) -> None:
    """`LlamaConfig.validate()` (run by `save_pretrained`) reads `num_attention_heads` globally.

    With per-layer head counts that read raises. transformers' escape hatch is
    `allow_global_per_layer_attribute_access`; it is set only when such an attribute varies, on
    the live config only (hetgraph's `save_pretrained` never writes it). No global value reaches a
    layer: every layer reads its own config.
    """
    if config.is_heterogeneous and set(adapter.validate_reads) & config.per_layer_attributes:
        config.allow_global_per_layer_attribute_access = True


def _forward_config(adapter: FamilyAdapter, config) -> PreTrainedConfig:
    """The config the decoder stack's forward reads.

    `MistralModel.forward` reads `sliding_window` globally to pick its mask builder, which raises
    when windows vary per layer (and transformers' escape hatch logs, breaking fullgraph traces).
    hetgraph builds every mask itself, so the stack gets a copy without that attribute per layer.
    """
    varying = set(adapter.forward_reads) & (config.per_layer_attributes or set())
    if not varying:
        return config
    view = copy.deepcopy(config)
    overrides = {
        i: {k: v for k, v in o.items() if k not in varying}
        for i, o in config._heterogeneity_spec.per_layer_overrides.items()
    }
    view.per_layer_config = None
    for name in varying:
        setattr(view, name, None)
    view.per_layer_config = {i: o for i, o in overrides.items() if o}
    return view


def _canonical_overrides(config) -> None:
    """Rewrite per-layer keys given under an `attribute_map` alias (GptOss `num_experts`) to the real name."""
    if not config.is_heterogeneous:
        return
    aliases = config._getattr_without_heterogeneous_validation("attribute_map") or {}
    raw = config._heterogeneity_spec.per_layer_overrides
    if any(key in aliases for o in raw.values() for key in o):
        canonical = {i: {aliases.get(k, k): v for k, v in o.items()} for i, o in raw.items()}
        config.per_layer_config = None
        config.per_layer_config = canonical


def build_skeleton(config, attn_implementation: str | None = None) -> tuple[PreTrainedModel, ModelSpec]:
    """The model with every tensor on the meta device; `materialize` gives it storage.

    `attn_implementation` defaults to the family's first supported one ("sdpa"; GptOss: "eager").
    """
    config = normalize_config(config)
    spec = ModelSpec.from_config(config)
    adapter = spec.adapter
    attn_implementation = attn_implementation or adapter.attn_implementations[0]
    allowed = [a for a in adapter.attn_implementations if a in attention.SUPPORTED_ATTN_IMPLEMENTATIONS]
    if attn_implementation not in allowed:
        raise HeteroConfigError(
            f"attn_implementation={attn_implementation!r} is not supported for {adapter.name}; allowed: {allowed}"
        )
    _canonical_overrides(config)
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = adapter.causal_lm_class(parent_config(config))
        # The stock constructor resolved the experts implementation on the parent; layers need it too.
        experts = getattr(model.config, "_experts_implementation", None)
        if experts is not None:
            config._experts_implementation = experts
        layers = [_build_layer(adapter, config, spec, i, attn_implementation, experts) for i in range(len(spec))]
    base = getattr(model, adapter.base_model_attr)
    base.layers = nn.ModuleList(layers)
    _allow_global_reads(adapter, config)
    model.config = config
    base.config = _forward_config(adapter, config)
    return model, spec


def materialize(model, spec, *, device, dtype, placement=None) -> None:
    """Give every meta tensor real (uninitialised) storage, on `device` or on each unit's device of a
    resolved `placement` (then with its input-moving hooks); parameters in `dtype`, RoPE buffers in fp32."""
    placement_mod.place(model, placement, device)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dtype != dtype:
                setattr(module, name, nn.Parameter(param.data.to(dtype), requires_grad=param.requires_grad))
    if spec.adapter.rotary is not None:  # its inverse frequencies are buffers: computed, not loaded
        model._init_weights(getattr(getattr(model, spec.adapter.base_model_attr), spec.adapter.rotary))
    placement_mod.dispatch(model, placement)


def from_config(config, *, dtype: torch.dtype | None = None, device=None, attn_implementation: str | None = None,
                device_map=None, max_memory: Mapping | None = None):  # fmt: skip
    """A randomly initialised heterogeneous model of the family's stock `*ForCausalLM` class
    (`device_map` / `max_memory` as in `from_pretrained`)."""
    model, spec = build_skeleton(config, attn_implementation)
    dtype = dtype or torch.float32
    placement = placement_mod.requested(model, spec.adapter.base_model_attr, device, device_map, max_memory, dtype)
    materialize(model, spec, device=torch.device(device or "cpu"), dtype=dtype, placement=placement)
    if spec.adapter.init_layer is not None:
        # What the stock `_init_weights` would size from the global config, initialised per layer.
        base = getattr(model, spec.adapter.base_model_attr)
        for i, layer in enumerate(base.layers):
            spec.adapter.init_layer(layer, model.config.per_layer_config[i])
    model.initialize_weights()
    model.tie_weights()
    _install_runtime(model, spec, model.config._attn_implementation)
    model.eval()
    return model


def expected_tensors(model: PreTrainedModel) -> dict[str, tuple[int, ...]]:
    """Names and shapes a checkpoint must hold: the state dict, less weights tied to another."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {}) if model.config.tie_word_embeddings else set()
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}


def _config_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def checkpoint_skeleton(ckpt, attn_implementation: str | None = None, *, infer_shapes: bool = False):
    """The meta model of an opened checkpoint, its tensors checked against it. `infer_shapes`:
    where the stored shapes contradict the config (removed blocks, narrower MLPs, fewer heads),
    the per-layer entries that explain them are derived (`slicing.infer_plan`), logged, and merged
    into the config (`ckpt.config` is replaced); shapes nothing explains are still an error."""
    model, spec = build_skeleton(ckpt.config, attn_implementation)
    if infer_shapes:
        plan = slicing.infer_plan(spec, expected_tensors(model), ckpt.index.shapes)
        if plan:
            logger.warning("%s: per_layer_config inferred from the tensor shapes: %s", ckpt.path, plan)
            ckpt.config = config_from_dict(slicing.plan_config(model_config_dict(ckpt.config), plan))
            model, spec = build_skeleton(ckpt.config, attn_implementation)
    check_tensors(expected_tensors(model), ckpt.index)
    return model, spec


def from_pretrained(
    path: str,
    *,
    per_layer_config: Mapping | None = None,
    prune: slicing.Prune = "first",
    infer_shapes: bool = False,
    dtype: torch.dtype | None = None,
    device=None,
    attn_implementation: str | None = None,
    device_map=None,
    max_memory: Mapping | None = None,
):
    """Load a local checkpoint directory (config.json + safetensors) onto the stock class.

    No hub access, no pickle, no remote code. Every tensor is checked before storage is allocated.
    `per_layer_config` cuts the model from the checkpoint as its parent: the plan's entries
    (layer -> attributes, `skip`) are merged over the checkpoint's own, removed blocks' tensors are
    not read, narrower MLPs and fewer heads take the channels / heads `prune` keeps ("first",
    "magnitude" or a callable: `hetgraph.slicing`). A plan the weights cannot satisfy is an error
    naming the layer and the tensor. `infer_shapes=True` reads a pruned checkpoint saved under its
    parent's config (LLM-Pruner, FLAP): see `checkpoint_skeleton`. `device_map` ("auto", a device,
    or module name -> device) places whole modules on several devices, each tensor read straight
    onto its device (`hetgraph.placement`); `max_memory` caps each device for "auto".
    """
    ckpt = open_checkpoint(path)
    parent, parent_spec = checkpoint_skeleton(ckpt, attn_implementation, infer_shapes=infer_shapes)
    index = ckpt.index
    if per_layer_config is None:
        model, spec, tensors = parent, parent_spec, ((name, index.load(name)) for name in index.shapes)
    else:
        config = config_from_dict(slicing.plan_config(model_config_dict(ckpt.config), per_layer_config))
        model, spec = build_skeleton(config, attn_implementation)
        tensors = slicing.cut_tensors(parent_spec, spec, expected_tensors(model), index.load, prune)
    dtype = dtype or _config_dtype(model.config)
    placement = placement_mod.requested(model, spec.adapter.base_model_attr, device, device_map, max_memory, dtype)
    materialize(model, spec, device=torch.device(device or "cpu"), dtype=dtype, placement=placement)
    params = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for name, tensor in tensors:
            params[name].copy_(tensor)
    model.tie_weights()
    _install_runtime(model, spec, model.config._attn_implementation)
    model.eval()
    return model
