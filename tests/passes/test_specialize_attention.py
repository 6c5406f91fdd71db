"""specialize_attention on a small synthetic graph (tests/support/tiny_stack.py): sliding layers whose
mask hetgraph's hook built get banded attention, a full layer keeps its is_causal SDPA, masks the
hook did not build (or built for another window) are refused with the reason; `changed` is exact, a
second run changes nothing, outputs equal the unrewritten graph's. Real models: tests/test_attention_forms.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import repeat_kv

from hetgraph.attention_forms import banded_attention
from hetgraph.passes import specialize_attention
from hetgraph.passes._graph import SDPA, layer_of
from support.graphs import capture, copy_graph, outputs
from support.tiny_stack import attributed, layer, spec, trace, with_layers

# Windows 3 (layers 0, 2), full (layer 1), 5 (layer 3); 40 tokens: more keys than one band (32).
TABLE = spec(layer(window=3), layer(), layer(window=3), layer(window=5))


def assert_close_outputs(gm, reference, inputs):
    """A new form adds in another order: equal to float rounding, not bit for bit."""
    for a, b in zip(outputs(gm, inputs), outputs(reference, inputs), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _forms(gm) -> dict[int, str]:
    return {layer_of(n): "sdpa" if n.target in SDPA else "banded" for n in gm.graph.nodes
            if n.target in SDPA or n.target is banded_attention}


@pytest.fixture(scope="module")
def hooked():
    return trace(TABLE, hooked=True, length=40)


def test_windowed_layers_get_banded_attention(hooked):
    gm, inputs, ctx = attributed(hooked)
    result = specialize_attention(gm, ctx)
    assert result.changed
    assert _forms(gm) == {0: "banded", 1: "sdpa", 2: "banded", 3: "banded"}
    assert result.report[1] == "is_causal SDPA" and "banded attention (extent 5" in result.report[3]
    assert not result.refused
    assert_close_outputs(gm, hooked[0], inputs)
    again = specialize_attention(gm, ctx)
    assert not again.changed and _forms(gm)[0] == "banded"


def test_masks_not_built_by_the_hook_are_refused():
    gm, inputs, ctx = attributed(trace(TABLE, length=40))
    result = specialize_attention(gm, ctx)
    assert not result.changed
    assert set(result.refused) == {0, 2, 3}
    assert all("not built by hetgraph" in why for why in result.refused.values())


def test_a_mask_built_for_another_window_is_refused(hooked):
    gm, inputs, ctx = attributed(hooked)
    result = specialize_attention(gm, with_layers(ctx, {3: {"sliding_window": 4}}))
    assert _forms(gm)[3] == "sdpa"
    assert "mask built for window ('sliding', 5), layer has ('sliding', 4)" == result.refused[3]
    assert_close_outputs(gm, hooked[0], inputs)


def test_short_prompts_keep_the_masked_sdpa():
    gm, inputs, ctx = attributed(trace(TABLE, hooked=True, length=20))
    result = specialize_attention(gm, ctx)
    assert not result.changed
    assert result.refused[3] == "20 keys: no more than one band of 32"


class _DecodeStack(nn.Module):
    """One decode step of a Llama-layout layer over held keys: transformers' own `repeat_kv`, then
    SDPA with one mask row (`mask_heads` > 1: a mask per head, which packing must not take)."""

    def __init__(self, heads: int, kv_heads: int):
        super().__init__()
        self.groups = heads // kv_heads
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].self_attn = _Attend(self.groups)

    def forward(self, q, k, v, mask):
        return self.layers[0].self_attn(q, k, v, mask)


class _Attend(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.groups = groups

    def forward(self, q, k, v, mask):
        k, v = repeat_kv(k, self.groups), repeat_kv(v, self.groups)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5).transpose(1, 2).contiguous()


def _decode(heads=4, kv_heads=2, mask_heads=1, length=1, seed=0):
    torch.manual_seed(seed)
    keys = 9
    q = torch.randn(2, heads, length, 4)
    k, v = torch.randn(2, kv_heads, keys, 4), torch.randn(2, kv_heads, keys, 4)
    mask = torch.rand(2, mask_heads, length, keys) > 0.3
    mask[..., 0] = True
    table = spec(layer(heads=heads, kv_heads=kv_heads))
    gm, inputs, ctx = capture(_DecodeStack(heads, kv_heads).eval(), q, k, v, mask)
    ctx = dataclasses.replace(ctx, spec=table)
    return attributed((gm, inputs, ctx))


def test_decode_with_grouped_heads_packs_the_queries_and_reads_the_keys_unrepeated():
    gm, inputs, ctx = _decode()
    reference = copy_graph(gm)
    result = specialize_attention(gm, ctx)
    assert result.changed, result.report
    assert result.report[0].startswith("GQA-packed SDPA over the held keys (decode, 2 query"), result.report
    (sdpa,) = [n for n in gm.graph.nodes if n.target in SDPA]
    key_heads = sdpa.args[1].meta["example_value"].shape[1]
    assert key_heads == 2 and sdpa.args[0].meta["example_value"].shape[1:3] == (2, 2)  # [B, Hk, groups, D]
    assert not any(n.op == "call_method" and n.target == "expand" for n in gm.graph.nodes), "repeat_kv left in"
    assert_close_outputs(gm, reference, inputs)
    assert not specialize_attention(gm, ctx).changed  # nothing repeated is left to pack


@pytest.mark.parametrize("case,why", [
    (dict(mask_heads=4), "the mask is not one row shared by all heads"),
    # Nothing to pack (one query head per KV head; not a decode step): the prefill rules decide, and
    # this mask is not one hetgraph's hook built.
    (dict(heads=2, kv_heads=2), "mask not built by hetgraph's model hook"),
    (dict(length=3), "mask not built by hetgraph's model hook"),
])
def test_decode_packing_is_refused_where_it_would_differ(case, why):
    gm, inputs, ctx = _decode(**case)
    reference = copy_graph(gm)
    result = specialize_attention(gm, ctx)
    assert not any(form.startswith("GQA-packed") for form in result.report.values()), result.report
    assert result.refused.get(0) == why, result.refused
    assert_close_outputs(gm, reference, inputs)
