"""KV caches that hold exactly what each layer needs, with all bookkeeping in tensors.

`make_cache` returns a transformers `Cache` with, per layer:
  * no attention (removed or linear): a transformers `DummyLayer` (nothing stored);
  * full attention: a transformers `StaticLayer` of `max_cache_len` positions, allocated with the
    layer's own KV heads and head_dim;
  * sliding window W / chunk C: a `StaticWindowLayer` of min(W, max_cache_len) positions;
  * a mamba mixer (NemotronH): a transformers `LinearAttentionLayer`, its conv and recurrent states
    allocated now with the layer's own mamba dims (the recurrent state in fp32, as the stock scan
    returns it).

Stock sliding-window cache layers keep a Python-int length that dynamo guards on, so every decode
step recompiles. `StaticWindowLayer` keeps its length in a tensor and a fixed layout instead.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DummyLayer, LinearAttentionLayer, StaticLayer

from hetgraph.contract import model_spec
from hetgraph.spec import ModelSpec


class StaticWindowLayer(StaticLayer):
    """A cache layer holding the last `window` positions, as a shift register in position order.

    Slot j holds position `seen - window + j` (negative positions are empty). `update` returns the
    held keys followed by the new ones, so the keys it returns cover the contiguous positions
    `seen - window .. seen + q - 1`; `get_mask_sizes` says so, and the mask hides negative ones.
    All shapes depend only on `window` and the query length: no recompiles as the cache fills.
    """

    is_sliding = True
    is_croppable = False

    def __init__(self, max_cache_len: int, window: int, **kwargs):
        super().__init__(max_cache_len=min(window, max_cache_len))
        self.window = window

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys = torch.cat([self.keys, key_states], dim=-2)  # [B, H, held + q, D]
        values = torch.cat([self.values, value_states], dim=-2)
        held = self.max_cache_len
        self.keys.copy_(keys[:, :, -held:])
        self.values.copy_(values[:, :, -held:])
        self.cumulative_length.add_(key_states.shape[-2])
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, torch.Tensor]:
        # Called before `update`: the keys returned then start `max_cache_len` positions back.
        return self.max_cache_len + query_length, self.cumulative_length - self.max_cache_len

    def get_seq_length(self):
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.max_cache_len

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("StaticWindowLayer cannot be cropped: evicted positions are gone")


class HeteroCache(Cache):
    """A `Cache` whose layers follow a hetgraph model's LayerSpec table (see `make_cache`)."""

    def __init__(self, layers: list, max_cache_len: int, batch_size: int):
        super().__init__(layers=layers)
        self.max_cache_len = max_cache_len
        self.max_batch_size = batch_size

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


def make_cache(model, *, batch_size: int, max_cache_len: int, dtype: torch.dtype | None = None) -> HeteroCache:
    """A static cache for a hetgraph-built model, allocated now at its final size and address."""
    spec = model_spec(model)
    if batch_size <= 0 or max_cache_len <= 0:
        raise ValueError(f"make_cache: batch_size={batch_size} and max_cache_len={max_cache_len} must be positive")
    dtype = dtype or model.dtype
    device = model.device
    layers = []
    for s in spec:
        if s.has_mamba:
            layers.append(_mamba_layer(s, batch_size, dtype, device))
            continue
        if not s.has_attention:
            layers.append(DummyLayer())
            continue
        kind, size = s.window
        layer = StaticLayer(max_cache_len) if size is None else StaticWindowLayer(max_cache_len, size)
        empty = torch.zeros((batch_size, s.num_key_value_heads, 0, s.head_dim), dtype=dtype, device=device)
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
