"""Per-window attention masks and per-head-dim RoPE, computed once per forward.

The stock forwards build one mask per layer *type* from the global config, and one RoPE table from
the global head_dim, so they cannot serve layers with different windows, chunks or head dims.
hetgraph leaves their code alone and uses a PyTorch forward pre-hook (public `nn.Module` API) and
the layers' own forwards:

* `ModelInputsHook`, on the decoder stack: computes, once per forward, one mask per distinct
  window (from explicit query and key positions, sized by the cache layer of a representative
  layer that really holds attention) and one (cos, sin) pair per extra head_dim, and passes them
  down as keyword arguments that the stock forward forwards to every decoder layer.
* `LayerInputs`, run by each decoder layer's forward: hands the layer its own mask and RoPE table.

Masks are in cache-position space: query i sits at position `past + i`; the cache layer says
where its keys sit (`key_positions` of hetgraph's layers, `get_mask_sizes` of transformers').
Key k is visible to query q iff k <= q, k >= 0 (a slot that holds a real token), the window /
chunk rule holds, and the padding mask allows k. Each mask is built under an annotation of what
it proves (`MASK_META`), which `passes/specialize_attention` reads.
"""

from __future__ import annotations

import functools
import inspect
import types
from dataclasses import dataclass

import torch
from torch.fx.traceback import annotate
from transformers.cache_utils import CacheLayerMixin, DummyLayer, DynamicLayer

from hetgraph.spec import LayerSpec, ModelSpec

MASKS_KWARG = "hetgraph_masks"
ROPE_KWARG = "hetgraph_rope"
MASK_META = "hetgraph_mask"  # node.meta["custom"] key: the window and key layout a mask was built for
SUPPORTED_ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
# Mask key of recurrent (mamba) layers: the 2D padding mask of the new tokens, None in single-token
# decode, as transformers' `create_recurrent_attention_mask` gives them.
RECURRENT = ("recurrent", None)


@dataclass(frozen=True)
class WindowGroup:
    window: tuple  # ("full", None) / ("sliding", W) / ("chunked", C)
    rep: int  # a layer of this window that really holds attention: its cache layer sizes the mask
    layers: tuple[int, ...]


def window_groups(spec: ModelSpec) -> tuple[WindowGroup, ...]:
    return tuple(WindowGroup(w, layers[0], tuple(layers)) for w, layers in spec.window_groups().items())


def window_mask(
    window: tuple,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    padding: torch.Tensor | None,
) -> torch.Tensor:
    """Boolean mask [B or 1, 1, Q, K]: True where query may attend key.

    q_pos [Q] and k_pos [K] are cache positions; padding [B, L] marks real tokens of positions 0..L-1.
    """
    q = q_pos[:, None]
    k = k_pos[None, :]
    allowed = (k <= q) & (k >= 0)
    kind, size = window
    if kind == "sliding":
        allowed = allowed & (k > q - size)
    allowed = allowed[None, None]  # [1, 1, Q, K]
    if kind == "chunked":
        # Chunks count from each row's first real token, as transformers' chunked masks do.
        offset = 0 if padding is None else padding.int().argmax(-1)[:, None, None, None]
        allowed = allowed & ((k - offset) // size == (q - offset) // size)
    if padding is not None:
        length = padding.shape[-1]
        real = padding[:, k_pos.clamp(0, length - 1)] & (k_pos < length)  # [B, K]
        allowed = allowed & real[:, None, None, :]
    return allowed


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Eager attention adds its mask to the scores."""
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class ModelInputsHook:
    """Forward pre-hook of the decoder stack (e.g. `LlamaModel`): builds masks and RoPE tables."""

    def __init__(self, spec: ModelSpec, base_model: torch.nn.Module, attn_implementation: str):
        self.groups = window_groups(spec)
        self.first_attention = spec.attention_layers[0] if spec.attention_layers else None
        self.recurrent = any(s.has_mamba for s in spec)
        # Layers that hold no attention or mamba state: a cache built by transformers from the config
        # gives them a real (empty) layer; hetgraph swaps in a DummyLayer, as `make_cache` does.
        self.stateless = stateless_layers(spec)
        self.attn_implementation = attn_implementation
        self.accepts_mask_mapping = spec.adapter.accepts_mask_mapping
        params = list(inspect.signature(base_model.forward).parameters)
        self.positional = tuple(p for p in params if p not in ("self", "kwargs"))

    def __call__(self, module, args, kwargs):
        kwargs = dict(kwargs)
        for name, value in zip(self.positional, args):
            kwargs[name] = value
        if "past_key_values" in kwargs and kwargs.get("cache") is None:
            kwargs["cache"] = kwargs.pop("past_key_values")
        embeds = kwargs.get("inputs_embeds")
        ids = kwargs.get("input_ids")
        ref = embeds if embeds is not None else ids
        if ref is None:
            return (), kwargs  # the stock forward raises its own error
        q_len, device = ref.shape[1], ref.device
        cache = kwargs.get("cache")
        padding = _padding_mask(kwargs.get("attention_mask"), device)
        _drop_unused_cache_layers(cache, self.stateless)

        if kwargs.get("position_ids") is None:
            # The stock forward asks layer 0 for the past length; layer 0 may hold no attention.
            past = 0 if cache is None or self.first_attention is None else cache.get_seq_length(self.first_attention)
            kwargs["position_ids"] = (torch.arange(q_len, device=device) + past).unsqueeze(0)

        masks = {}
        for group in self.groups:
            masks[group.window] = self._mask(group, cache, q_len, padding, device, module.dtype)
        if self.recurrent:
            pad2d = kwargs.get("attention_mask")
            masks[RECURRENT] = None if padding is None or q_len == 1 else pad2d[:, -q_len:].contiguous()
        kwargs[MASKS_KWARG] = masks
        # The stock mask builders would read per-layer attributes globally; give them nothing to build.
        first = next(iter(masks.values()), None)
        if self.accepts_mask_mapping:
            kwargs["attention_mask"] = _AllLayerTypes(first)
        else:
            kwargs["attention_mask"] = first if first is not None else kwargs.get("attention_mask")
            if isinstance(kwargs["attention_mask"], torch.Tensor) and kwargs["attention_mask"].dim() == 2:
                kwargs["attention_mask"] = None if padding is None else _padding_4d(padding)

        rope = {}
        for head_dim, rotary in getattr(module, "hetgraph_rotary", {}).items():
            rope[int(head_dim)] = rotary(torch.empty(0, dtype=module.dtype, device=device), kwargs["position_ids"])
        kwargs[ROPE_KWARG] = rope
        return (), kwargs

    def _mask(self, group: WindowGroup, cache, q_len: int, padding, device, dtype):
        past, k_pos, aligned = key_layout(cache, group.rep, q_len, device)
        # An `if`, so that dynamo branches (and guards) on a length it made symbolic: the annotation
        # below must hold constants.
        fresh = False
        if isinstance(past, int) and past == 0:
            fresh = True
        trivially_causal = (
            self.attn_implementation == "sdpa"
            and padding is None
            and group.window[0] == "full"
            and fresh
            and k_pos.shape[0] == q_len
        )
        if trivially_causal:
            return None  # sdpa's is_causal does it without a materialized mask
        # What `passes/specialize_attention` needs to prove a cheaper exact form: on every node of
        # the mask's computation (dynamo and torch.export keep it in node.meta["custom"]).
        kind, size = group.window
        info = {"kind": kind, "size": size, "aligned": aligned, "padded": padding is not None, "fresh": fresh}
        with annotate({MASK_META: info}):
            q_pos = torch.arange(q_len, device=device) + past
            mask = window_mask(group.window, q_pos, k_pos, padding)
            if self.attn_implementation == "eager":
                mask = _as_additive(mask, dtype)
        return mask


def key_layout(cache, layer_idx: int, q_len: int, device) -> tuple:
    """(past length, the position of each key the layer attends over, whether they are aligned).

    Aligned: in position order, the last `q_len` of them the new tokens' own (see attention_forms).
    hetgraph's cache layers say so themselves; transformers' dynamic layers always are.
    """
    if cache is None:
        return 0, torch.arange(q_len, device=device), True
    layers = getattr(cache, "layers", None)
    layer = layers[layer_idx] if isinstance(layers, list) else None
    past = cache.get_seq_length(layer_idx)
    if hasattr(layer, "key_positions"):
        return past, layer.key_positions(q_len), layer.keys_aligned(q_len)
    kv_len, kv_offset = cache.get_mask_sizes(q_len, layer_idx)
    return past, torch.arange(kv_len, device=device) + kv_offset, isinstance(layer, DynamicLayer)


class _AllLayerTypes(dict):
    """A mask mapping that answers every layer type: the stock Qwen forwards then build no masks."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def __missing__(self, key):
        return self.value

    def get(self, key, default=None):  # NemotronH's forward reads `mapping.get(block_type)`
        return self.value


def _padding_mask(attention_mask, device) -> torch.Tensor | None:
    """The 2D padding mask [B, L] as bool, or None when every token is real."""
    if attention_mask is None:
        return None
    if isinstance(attention_mask, dict):
        raise TypeError(
            "hetgraph models take a 2D padding mask (batch, sequence) as `attention_mask`; got a dict of masks"
        )
    if attention_mask.dim() != 2:
        raise ValueError(
            f"hetgraph models take a 2D padding mask (batch, sequence) as `attention_mask`; got shape "
            f"{tuple(attention_mask.shape)}: per-layer windows need the padding, not a prebuilt 4D mask"
        )
    return attention_mask.to(device=device, dtype=torch.bool)


class NoKVLayer(DummyLayer):
    """transformers' `DummyLayer` (nothing stored) for a layer without attention, whose sequence length
    is that of its cache's first attention layer. transformers 5.25's `Cache.get_seq_length()` asks
    layer 0 itself (5.24 skipped to the first attention layer), and layer 0 of a pruned model may have
    no attention; `generate` reads that length to know how much of the prompt is cached."""

    def __init__(self, cache_layers: list):
        super().__init__()
        self.cache_layers = cache_layers  # the cache's own list of layers, this one among them

    def get_seq_length(self, *args, **kwargs):
        return first_attention_length(self.cache_layers)


def first_attention_length(cache_layers) -> int:
    """The sequence length of the first attention layer (not mamba state, as transformers 5.24 counted)."""
    for layer in cache_layers:
        if isinstance(layer, CacheLayerMixin):
            return layer.get_seq_length()
    return 0


def stateless_layers(spec: ModelSpec) -> tuple[int, ...]:
    """The layers that hold no attention or mamba state: a `NoKVLayer` in any cache."""
    return tuple(s.index for s in spec if not s.has_attention and not s.has_mamba)


def _drop_unused_cache_layers(cache, layers: tuple[int, ...]) -> None:
    """Give layers without attention (or mamba state) a `NoKVLayer` in a cache transformers built.

    Eager only, before the first update: it edits a Python list, which a compiled graph must not do.
    """
    if cache is None or not layers or torch.compiler.is_compiling():
        return
    cache_layers = getattr(cache, "layers", None)
    if not isinstance(cache_layers, list):
        return
    for i in layers:
        if i < len(cache_layers) and not isinstance(cache_layers[i], NoKVLayer):
            cache_layers[i] = NoKVLayer(cache_layers)  # the model never reads or writes this layer


def _padding_4d(padding: torch.Tensor) -> torch.Tensor:
    return padding[:, None, None, :]


class LayerInputs:
    """One decoder layer's own mask and, if its head_dim differs, its RoPE, picked from what
    `ModelInputsHook` passed down. Run by the layer's forward (`regions.install`), not as a hook:
    dynamo interprets a module's hook machinery at every layer call (a quarter of the bytecode it
    stepped through for a deep model, docs/architecture.md)."""

    def __init__(self, window: tuple | None, head_dim: int | None):
        self.window = window
        self.head_dim = head_dim

    @classmethod
    def of(cls, s: LayerSpec) -> LayerInputs:
        """Layer `s`'s: its window's mask (mamba layers: the recurrent one; none without either)."""
        return cls(s.window if s.has_attention else RECURRENT if s.has_mamba else None, s.head_dim)

    def pick(self, kwargs: dict, device) -> None:
        """In place: the layer's own mask and RoPE into `kwargs`, on `device` (the layer's inputs'),
        the per-window and per-head-dim dicts out of it. Called without them (the layer called
        directly, outside a hetgraph model's forward): stock behaviour."""
        masks = kwargs.pop(MASKS_KWARG, None)
        rope = kwargs.pop(ROPE_KWARG, None)
        if masks is None:
            return
        if self.window is not None:
            kwargs["attention_mask"] = on_device(masks[self.window], device)
        if rope and self.head_dim in rope:
            table = rope[self.head_dim]  # (cos, sin), or one tensor (Llama4's complex frequencies)
            on = tuple(on_device(t, device) for t in table) if isinstance(table, tuple) else on_device(table, device)
            kwargs["position_embeddings"] = on


def on_device(t, device):
    """`t` on `device` if it is a tensor elsewhere, else `t` itself. The model's masks and RoPE are
    built where its input is; a layer may sit on another device (`placement.dispatch`, whose hooks
    leave the per-window dicts to `LayerInputs`)."""
    return t.to(device) if isinstance(t, torch.Tensor) and t.device != device else t


def install_generate_hooks(model, spec) -> None:
    """What `generate` looks up on a hetgraph model: its mask builder (none; masks are built in the
    forward) and, with layers that hold no state, a cache preparation that gives them a `NoKVLayer`.

    transformers builds `generate`'s cache from the config, with a bare `DummyLayer` for a NemotronH
    "moe" / "mlp" layer, and asks that cache's layer 0 for its length before the first forward
    (`_prefill`, 5.25), which a `DummyLayer` cannot answer. Set on the instance, as `save_pretrained`.
    """
    model.create_masks_for_generate = create_masks_for_generate
    stateless = stateless_layers(spec)
    stock = getattr(type(model), "_prepare_cache_for_generation", None)
    if stateless and stock is not None:
        model._prepare_cache_for_generation = types.MethodType(
            functools.partial(_prepare_cache_for_generation, stock=stock, stateless=stateless), model
        )


def _prepare_cache_for_generation(model, *args, stock, stateless: tuple[int, ...], **kwargs):
    """transformers' own `_prepare_cache_for_generation`, then a `NoKVLayer` in each stateless layer."""
    result = stock(model, *args, **kwargs)
    model_kwargs = inspect.signature(stock).bind(model, *args, **kwargs).arguments["model_kwargs"]
    _drop_unused_cache_layers(model_kwargs.get("cache"), stateless)
    return result


def create_masks_for_generate(config, inputs_embeds, attention_mask, cache, position_ids=None, **kwargs):
    """`generate` precomputes masks for compileable caches; hetgraph builds them in the forward instead.

    Returning the 2D padding mask keeps the padding information for `ModelInputsHook`.
    """
    return attention_mask
