"""The nn.Modules `torch.export` traces: small wrappers around a hetgraph-built model whose
forward is a program's signature (`_Logits` without decode; `_Prefill` and `_Decode` with it)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DummyLayer, LinearAttentionLayer, StaticLayer

from hetgraph.cache import make_cache


class _Logits(nn.Module):
    """The logits of an uncached forward: the prefill program without decode."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class _CachedLM(nn.Module):
    """A forward over a `make_cache` cache whose tensors are the caller's `state` dict."""

    continues = False  # True for decode: the state holds a prompt already (mamba layers then take their step path)

    def __init__(self, model: nn.Module, batch_size: int, max_cache_len: int):
        super().__init__()
        self.model = model
        # The layout (which layers hold which shapes) is make_cache's; its tensors are swapped per call.
        self.cache = make_cache(model, batch_size=batch_size, max_cache_len=max_cache_len)
        carried = (StaticLayer, LinearAttentionLayer, DummyLayer)
        layers = self.cache.layers
        other = [f"layer {i}: {type(x).__name__}" for i, x in enumerate(layers) if not isinstance(x, carried)]
        if other:
            raise NotImplementedError(
                f"export(decode=True) carries attention caches (StaticLayer, StaticWindowLayer) and mamba "
                f"states (LinearAttentionLayer) as state; not yet {other}"
            )
        self.held = {i: lay for i, lay in enumerate(layers) if not isinstance(lay, DummyLayer)}

    @staticmethod
    def _tensors(layer) -> dict[str, torch.Tensor]:
        """The tensors a cache layer carries between calls, by state name."""
        if isinstance(layer, LinearAttentionLayer):
            return {"conv_states": layer.conv_states[0], "recurrent_states": layer.recurrent_states[0]}
        return {"keys": layer.keys, "values": layer.values, "length": layer.cumulative_length}

    def state_layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {
            f"layers.{i}.{name}": (tuple(t.shape), t.dtype)
            for i, layer in self.held.items()
            for name, t in self._tensors(layer).items()
        }

    def new_state(self) -> dict[str, torch.Tensor]:
        device = self.model.device
        return {name: torch.zeros(shape, dtype=dt, device=device) for name, (shape, dt) in self.state_layout().items()}

    def step(self, input_ids: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        for i, layer in self.held.items():
            if isinstance(layer, LinearAttentionLayer):
                layer.conv_states[0] = state[f"layers.{i}.conv_states"]
                layer.recurrent_states[0] = state[f"layers.{i}.recurrent_states"]
                layer.has_previous_state[0] = self.continues
            else:
                layer.keys, layer.values = state[f"layers.{i}.keys"], state[f"layers.{i}.values"]
                layer.cumulative_length = state[f"layers.{i}.length"]
                layer.holds_tokens = self.continues
        return self.model(input_ids=input_ids, cache=self.cache, use_cache=True).logits


class _Prefill(_CachedLM):
    """`(input_ids[B, T]) -> (logits, state)`: a fresh cache filled with the prompt."""

    def forward(self, input_ids: torch.Tensor):
        state = self.new_state()
        return self.step(input_ids, state), state


class _Decode(_CachedLM):
    """`(input_ids[B, 1], state) -> logits`: one step; updates `state` in place."""

    continues = True

    def forward(self, input_ids: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.step(input_ids, state)
