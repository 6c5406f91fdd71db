"""KV caches that hold exactly what each layer needs, with all bookkeeping in tensors.

`make_cache` returns a transformers `Cache` with, per layer:
  * no attention (removed or linear): a `NoKVLayer`, transformers' `DummyLayer` (nothing stored)
    that reports the length of the cache's first attention layer;
  * full attention: a `StaticFullLayer` (transformers' `StaticLayer`) of `max_cache_len` positions,
    allocated with the layer's own KV heads and head_dim;
  * sliding window W / chunk C: a `StaticWindowLayer`, a ring buffer of min(W, max_cache_len)
    positions;
  * a mamba mixer (NemotronH): a transformers `LinearAttentionLayer`, its conv and recurrent states
    allocated now with the layer's own mamba dims (the recurrent state in fp32, as the stock scan
    returns it).

Stock sliding-window cache layers keep a Python-int length that dynamo guards on, so every decode
step recompiles. `StaticWindowLayer` keeps its length in a tensor and a fixed layout instead.
Both hetgraph layers return only the new keys in a prefill into an empty layer (`_FillsOnce`), so
no prefill attends over empty slots; dynamo specializes on that one Python bool.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, LinearAttentionLayer, StaticLayer

from hetgraph.attention import NoKVLayer, first_attention_length
from hetgraph.contract import model_spec
from hetgraph.placement import layer_device
from hetgraph.spec import ModelSpec


class _FillsOnce:
    """What both hetgraph attention cache layers add to transformers' `StaticLayer`.

    `holds_tokens` is a Python bool, so dynamo specializes on it: a prefill into an empty layer
    attends over its new keys only (K = T, positions from 0) and never over empty slots; the graph
    for a layer that holds tokens is a second one (decode), a prefill into it a third.
    `key_positions(q)` gives the position of every key `update(q new)` returns, for the mask, and
    `keys_aligned(q)` whether those keys are in position order ending at the new ones (the layout
    `attention_forms` needs).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.holds_tokens = False  # an instance attribute from the start: dynamo guards on its value

    def get_seq_length(self):
        return self.cumulative_length if self.holds_tokens else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        super().reset()
        self.holds_tokens = False


class StaticFullLayer(_FillsOnce, StaticLayer):
    """transformers' `StaticLayer` (max_cache_len slots, position p in slot p), except that a prefill
    into the empty layer returns only the new keys: a 512-token prompt into a 4096-slot cache
    attends over 512 keys, not 4096."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        fresh = not self.holds_tokens
        if fresh and key_states.shape[-2] > self.max_cache_len:
            raise ValueError(
                f"layer {getattr(self, 'layer_index', '?')}: a prompt of {key_states.shape[-2]} tokens does not "
                f"fit its cache of {self.max_cache_len} positions (make_cache(max_cache_len=...) bounds prompt "
                "plus generated tokens)"
            )
        keys, values = super().update(key_states, value_states, *args, **kwargs)  # StaticLayer's write
        if not fresh:
            return keys, values
        self.holds_tokens = True
        return key_states, value_states  # a fresh prefill attends over its own keys only

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (query_length, 0) if not self.holds_tokens else (self.max_cache_len, 0)

    def key_positions(self, query_length: int) -> torch.Tensor:
        return torch.arange(self.get_mask_sizes(query_length)[0], device=self.keys.device)

    def keys_aligned(self, query_length: int) -> bool:
        return not self.holds_tokens


class StaticWindowLayer(_FillsOnce, StaticLayer):
    """A cache layer holding the last `window` positions as a ring buffer: position p in slot p % W.

    * prefill into the empty layer: returns the new keys only; keeps the last min(T, W) of them;
    * decode (one new key): writes one row at the tensor-indexed slot `seen % W` (nothing else
      moves) and returns the buffer in slot order; `key_positions` gives each slot's position
      (negative: empty), from which the mask is built;
    * prefill into a layer holding tokens: returns the held window in position order followed by
      the new keys (W + T keys, aligned), and keeps the last W of those.
    All shapes depend only on W and the query length: no recompiles as the cache fills.
    """

    is_sliding = True
    is_croppable = False

    def __init__(self, max_cache_len: int, window: int, **kwargs):
        super().__init__(max_cache_len=min(window, max_cache_len))
        self.window = window

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held, length = self.max_cache_len, key_states.shape[-2]
        if not self.holds_tokens:  # a fresh prefill attends over its own keys only
            self._keep_last(key_states, value_states, 0)
            self.cumulative_length.add_(length)
            self.holds_tokens = True
            return key_states, value_states
        seen = self.cumulative_length
        if length == 1:  # decode: one row at its slot
            slot = (seen % held).reshape(1)
            self.keys.index_copy_(2, slot, key_states)
            self.values.index_copy_(2, slot, value_states)
            self.cumulative_length.add_(1)
            return self.keys, self.values
        order = (seen + torch.arange(held, device=self.keys.device)) % held  # the held window by position
        keys = torch.cat([self.keys.index_select(2, order), key_states], dim=-2)
        values = torch.cat([self.values.index_select(2, order), value_states], dim=-2)
        self._keep_last(keys, values, seen - held)
        self.cumulative_length.add_(length)
        return keys, values

    def _keep_last(self, keys: torch.Tensor, values: torch.Tensor, first) -> None:
        """Fill every slot j with the latest of `keys` (positions first, first + 1, ...) at a position
        p = j mod W: one W-row gather, no slicing by the (possibly symbolic) number of keys."""
        held = self.max_cache_len
        last = first + keys.shape[-2] - 1
        positions = last - (last - torch.arange(held, device=self.keys.device)) % held
        index = (positions - first).clamp(min=0)  # a slot no key reaches keeps key 0: its position is < 0
        self.keys.copy_(keys.index_select(2, index))
        self.values.copy_(values.index_select(2, index))

    def get_mask_sizes(self, query_length: int) -> tuple[int, torch.Tensor | int]:
        # Called before `update`. For decode the keys are in slot order: see `key_positions`.
        if not self.holds_tokens:
            return query_length, 0
        if query_length == 1:
            return self.max_cache_len, self.cumulative_length + 1 - self.max_cache_len
        return self.max_cache_len + query_length, self.cumulative_length - self.max_cache_len

    def key_positions(self, query_length: int) -> torch.Tensor:
        """Position of each key `update(query_length new)` returns; negative for an empty slot."""
        size, offset = self.get_mask_sizes(query_length)
        slots = torch.arange(size, device=self.keys.device)
        if not self.holds_tokens or query_length > 1:
            return slots + offset
        last = self.cumulative_length  # the new key's position; slot j holds last - (last - j) % W
        return last - (last - slots) % self.max_cache_len

    def keys_aligned(self, query_length: int) -> bool:
        return not self.holds_tokens or query_length > 1

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("StaticWindowLayer cannot be cropped: evicted positions are gone")


class HeteroCache(Cache):
    """A `Cache` whose layers follow a hetgraph model's LayerSpec table (see `make_cache`)."""

    def __init__(self, layers: list, max_cache_len: int, batch_size: int):
        super().__init__(layers=layers)
        self.max_cache_len = max_cache_len
        self.max_batch_size = batch_size

    def get_seq_length(self, layer_idx: int = 0):
        """Layer 0's length is the first attention layer's, whatever layer 0 holds (transformers 5.24's
        rule; 5.25 asks layer 0, which may be a mamba state that does not count tokens)."""
        if layer_idx == 0:
            return first_attention_length(self.layers)
        return super().get_seq_length(layer_idx)

    @property
    def nbytes(self) -> int:
        """Bytes of KV tensors held, all layers together."""
        total = 0
        for layer in self.layers:
            if getattr(layer, "keys", None) is not None:
                total += layer.keys.nbytes + layer.values.nbytes
        return total


def ideal_kv_bytes(spec: ModelSpec, batch_size: int, max_cache_len: int, dtype: torch.dtype) -> int:
    """What a cache must hold at most: each attention layer's own heads, head_dim and window."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for s in spec:
        if s.has_attention:
            kind, size = s.window
            positions = max_cache_len if size is None else min(size, max_cache_len)
            total += batch_size * positions * s.kv_bytes_per_token(itemsize)
    return total


#: set on a model by `hetgraph.distributed.tensor_parallel`: {"tp_size": N, "kv_heads": [this rank's KV
#: heads per layer]}; `make_cache` then holds each rank's own KV heads only.
TENSOR_PARALLEL_ATTR = "hetgraph_tensor_parallel"


def make_cache(model, *, batch_size: int, max_cache_len: int, dtype: torch.dtype | None = None) -> HeteroCache:
    """A static cache for a hetgraph-built model, allocated now at its final size and address."""
    spec = model_spec(model)
    tp = getattr(model, TENSOR_PARALLEL_ATTR, None)
    if batch_size <= 0 or max_cache_len <= 0:
        raise ValueError(f"make_cache: batch_size={batch_size} and max_cache_len={max_cache_len} must be positive")
    dtype = dtype or model.dtype
    stack = getattr(model, spec.adapter.base_model_attr).layers
    layers = []
    for s in spec:
        device = layer_device(model, stack[s.index])  # each layer's cache beside its weights (device maps)
        if s.has_mamba:
            layers.append(_mamba_layer(s, batch_size, dtype, device))
            continue
        if not s.has_attention:
            layers.append(NoKVLayer(layers))
            continue
        kind, size = s.window
        layer = StaticFullLayer(max_cache_len) if size is None else StaticWindowLayer(max_cache_len, size)
        layer.layer_index = s.index  # for error messages
        kv_heads = s.num_key_value_heads if tp is None else tp["kv_heads"][s.index]
        empty = torch.zeros((batch_size, kv_heads, 0, s.head_dim), dtype=dtype, device=device)
        layer.lazy_initialization(empty, empty)
        layers.append(layer)
    return HeteroCache(layers, max_cache_len=max_cache_len, batch_size=batch_size)


def _mamba_layer(s, batch_size: int, dtype: torch.dtype, device) -> LinearAttentionLayer:
    """A transformers linear-attention cache layer with its states allocated (static addresses)."""
    d = dict(s.extra)
    heads, head_dim, state = d["mamba_num_heads"], d["mamba_head_dim"], d["ssm_state_size"]
    conv_dim = heads * head_dim + 2 * d["n_groups"] * state
    layer = LinearAttentionLayer()
    layer.lazy_initialization(
        conv_states=torch.zeros((batch_size, conv_dim, d["conv_kernel"]), dtype=dtype, device=device),
        recurrent_states=torch.zeros((batch_size, heads, head_dim, state), dtype=torch.float32, device=device),
    )
    return layer
