"""A tiny synthetic decoder stack for pass tests, and its hand-written LayerSpec table.

The module layout is a Llama-family model's (`layers[i].self_attn / mlp / input_layernorm /
post_attention_layernorm`, `q_proj` ... `down_proj`), so the passes attribute its nodes as they do a
real model's; nothing else of transformers or hetgraph's builder is involved. A removed block returns
`zeros_like(x)` (as hetgraph's markers do) and takes its norm with it; masks are built outside the
layers, one per distinct window or, with `mask_per_layer`, one per attention layer (as stock code may),
or with `hooked`, as hetgraph's model hook builds and annotates them.
Traced by dynamo without compiling (`trace`), in about a second.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.traceback import annotate

from hetgraph.arch import adapter_for
from hetgraph.attention import MASK_META, window_mask
from hetgraph.passes import PassContext, attribute_nodes
from hetgraph.spec import FULL, LayerSpec, ModelSpec
from support.graphs import capture, copy_graph

HIDDEN = 16


def layer(attention: str = FULL, mlp: str = FULL, heads: int = 2, kv_heads: int = 1, head_dim: int = 4,
          width: int = 32, window: int | None = None) -> dict:
    """One layer's LayerSpec fields (the index is filled in by `spec`)."""
    full = attention == FULL
    return dict(attention=attention, mlp=mlp, num_attention_heads=heads if full else None,
                num_key_value_heads=kv_heads if full else None, head_dim=head_dim if full else None,
                intermediate_size=width if mlp == FULL else None, sliding_window=window if full else None)


def spec(*layers: dict) -> ModelSpec:
    return ModelSpec(adapter=adapter_for("llama"), hidden_size=HIDDEN, vocab_size=1,
                     layers=tuple(LayerSpec(index=i, **fields) for i, fields in enumerate(layers)))


class _Norm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(HIDDEN))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class _Removed(nn.Module):
    """A removed block: zeros the stock layer code adds to the residual."""

    def forward(self, x, mask=None):
        return torch.zeros_like(x)


class _Attention(nn.Module):
    def __init__(self, s: LayerSpec):
        super().__init__()
        self.head_dim, self.groups = s.head_dim, s.num_attention_heads // s.num_key_value_heads
        self.q_proj = nn.Linear(HIDDEN, s.num_attention_heads * s.head_dim, bias=False)
        self.k_proj = nn.Linear(HIDDEN, s.num_key_value_heads * s.head_dim, bias=False)
        self.v_proj = nn.Linear(HIDDEN, s.num_key_value_heads * s.head_dim, bias=False)
        self.o_proj = nn.Linear(s.num_attention_heads * s.head_dim, HIDDEN, bias=False)

    def forward(self, x, mask):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2).repeat_interleave(self.groups, 1)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2).repeat_interleave(self.groups, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             scale=self.head_dim**-0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class _MLP(nn.Module):
    def __init__(self, s: LayerSpec):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, s.intermediate_size, bias=False)
        self.up_proj = nn.Linear(HIDDEN, s.intermediate_size, bias=False)
        self.down_proj = nn.Linear(s.intermediate_size, HIDDEN, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, s: LayerSpec):
        super().__init__()
        self.input_layernorm = _Norm() if s.attention == FULL else nn.Identity()
        self.self_attn = _Attention(s) if s.attention == FULL else _Removed()
        self.post_attention_layernorm = _Norm() if s.mlp == FULL else nn.Identity()
        self.mlp = _MLP(s) if s.mlp == FULL else _Removed()

    def forward(self, x, mask):
        x = x + self.self_attn(self.input_layernorm(x), mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def _window_mask(t: int, window: int) -> torch.Tensor:
    pos = torch.arange(t)
    distance = pos[:, None] - pos[None, :]  # [T, T]: query minus key position
    return ((distance >= 0) & (distance < window))[None, None]  # [1, 1, T, T]


def _hooked_mask(t: int, window: int) -> torch.Tensor:
    """The mask as hetgraph's model hook builds it without a cache: annotated with what it proves."""
    info = {"kind": "sliding", "size": window, "aligned": True, "padded": False, "fresh": True}
    with annotate({MASK_META: info}):
        return window_mask(("sliding", window), torch.arange(t), torch.arange(t), None)


class TinyStack(nn.Module):
    def __init__(self, table: ModelSpec, mask_per_layer: bool = False, hooked: bool = False):
        super().__init__()
        self.windows = [s.sliding_window for s in table]
        self.mask_per_layer = mask_per_layer
        self.hooked = hooked
        self.layers = nn.ModuleList(_Layer(s) for s in table)
        self.norm = _Norm()

    def forward(self, x):
        t = x.shape[1]
        if self.hooked:
            built = {w: _hooked_mask(t, w) for w in dict.fromkeys(self.windows) if w is not None}
            masks = [built.get(w) for w in self.windows]
        elif self.mask_per_layer:
            masks = [None if w is None else _window_mask(t, w) for w in self.windows]
        else:
            built = {w: _window_mask(t, w) for w in dict.fromkeys(self.windows) if w is not None}
            masks = [built.get(w) for w in self.windows]
        for decoder_layer, mask in zip(self.layers, masks):
            x = decoder_layer(x, mask)
        return self.norm(x)


def trace(table: ModelSpec, mask_per_layer: bool = False, seed: int = 0, hooked: bool = False, length: int = 6):
    """(graph module, example inputs, pass context with `table`) of a TinyStack built from `table`;
    `hooked`: its masks built and annotated as hetgraph's model hook does."""
    torch.manual_seed(seed)
    module = TinyStack(table, mask_per_layer, hooked).eval()
    x = torch.randn(2, length, HIDDEN)  # [B, T, hidden]
    gm, inputs, ctx = capture(module, x)
    return gm, inputs, dataclasses.replace(ctx, spec=table)


def trace_layer(table: ModelSpec, index: int, seed: int = 0):
    """Layer `index` of `table` traced on its own (no `layers[i]` in its module paths), with a context
    that says which layer its parameters belong to, as hetgraph's parameter tags do."""
    torch.manual_seed(seed)
    module = _Layer(table[index]).eval()
    window = table[index].sliding_window
    mask = None if window is None else _window_mask(6, window)
    gm, inputs, ctx = capture(module, torch.randn(2, 6, HIDDEN), mask)
    params = {n.name: index for n in gm.graph.nodes if n.op == "placeholder" and "_parameters_" in n.name}
    assert params, "the layer's parameters are not graph inputs"
    return gm, inputs, dataclasses.replace(ctx, spec=table, input_layers=params)


def with_layers(ctx: PassContext, changes: dict[int, dict]) -> PassContext:
    """`ctx` whose table says something else of some layers, e.g. `with_layers(ctx, {2: {"sliding_window": 4}})`."""
    layers = [dataclasses.replace(s, **changes.get(s.index, {})) for s in ctx.spec]
    return dataclasses.replace(ctx, spec=dataclasses.replace(ctx.spec, layers=tuple(layers)))


def attributed(traced):
    """A fresh copy of a `trace` result's graph with its nodes tagged by `attribute_nodes`: (gm, inputs, ctx)."""
    original, inputs, ctx = traced
    gm = copy_graph(original)
    attribute_nodes(gm, ctx)
    return gm, inputs, ctx
