"""Each pass on a real dynamo graph of a tiny heterogeneous Llama: structure, `changed`, idempotence, numerics."""

from __future__ import annotations

import dataclasses
import operator

import pytest
import torch

import hetgraph
from hetgraph.passes import (
    NO_TABLE,
    PASSES,
    attribute_nodes,
    eliminate_skipped_blocks,
    run_passes,
    select_window_masks,
    specialize_shapes,
)
from hetgraph.passes._graph import SDPA, is_view, ops_per_layer, tag
from support.graphs import assert_ops, capture, copy_graph, count_ops, outputs
from support.models import hetero_config

SDPA_OP = torch._C._nn.scaled_dot_product_attention


@pytest.fixture(scope="module")
def traced():
    torch.manual_seed(0)
    config = hetero_config("llama")
    config["per_layer_config"][5]["sliding_window"] = 3  # layers 1 and 5 share a window, hence a mask
    model = hetgraph.from_config(config)
    ids = torch.randint(0, 128, (1, 8))
    gm, inputs, ctx = capture(model, ids, use_cache=False)
    return gm, inputs, ctx


@pytest.fixture
def attributed(traced):
    gm, inputs, ctx = traced
    gm = copy_graph(gm)
    attribute_nodes(gm, ctx)
    return gm, inputs, ctx


def _reference_outputs(traced):
    gm, inputs, _ = traced
    return outputs(gm, inputs)


def _assert_same_outputs(gm, traced):
    for a, b in zip(outputs(gm, traced[1]), _reference_outputs(traced)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_attribute_nodes_tags_layers_and_blocks(traced):
    gm, _, ctx = traced
    gm = copy_graph(gm)
    result = attribute_nodes(gm, ctx)
    assert not result.changed
    sdpa_layers = sorted(tag(n).layer for n in gm.graph.nodes if n.target in SDPA)
    assert sdpa_layers == ctx.spec.attention_layers == [1, 2, 3, 5]
    assert all(tag(n).block == "attention" for n in gm.graph.nodes if n.target in SDPA)
    mlp_linears = [n for n in gm.graph.nodes if n.target is torch._C._nn.linear and tag(n).module_name == "gate_proj"]
    assert sorted(tag(n).layer for n in mlp_linears) == [0, 1, 3, 5]  # layers whose MLP is kept
    assert all(tag(n).block == "mlp" for n in mlp_linears)
    # The residual adds of a layer belong to the layer, outside its blocks.
    adds = [n for n in gm.graph.nodes if n.target is operator.add and tag(n).layer == 3 and tag(n).block is None]
    assert len(adds) == 2
    assert attribute_nodes(gm, ctx).report == result.report


def test_a_one_layer_models_embedding_and_head_belong_to_no_layer():
    """Its parameters all belong to layer 0, as a layer compiled alone; its module paths say it is a
    whole model (hetgraph.profile cuts such a graph at the layer's boundaries)."""
    model = hetgraph.from_config(hetero_config("llama", num_hidden_layers=1, per_layer_config={}))
    gm, _, ctx = capture(model, torch.randint(0, 128, (1, 8)), use_cache=False)
    attribute_nodes(gm, ctx)
    layer_of_target = {n.target: tag(n).layer for n in gm.graph.nodes if n.op == "call_function"}
    assert layer_of_target[torch.nn.functional.embedding] is None and layer_of_target[SDPA_OP] == 0
    linears = [tag(n) for n in gm.graph.nodes if n.target is torch._C._nn.linear]
    assert [(t.layer, t.module_name) for t in linears if t.layer is None] == [(None, "lm_head")]


def test_eliminate_skipped_blocks_leaves_no_op_behind(attributed, traced):
    gm, _, ctx = attributed
    before = ops_per_layer(gm)
    assert count_ops(gm, torch.zeros_like) == 4  # layer 0 attention, layer 2 mlp, layer 4 both
    result = eliminate_skipped_blocks(gm, ctx)
    assert result.changed and not result.refused
    assert_ops(gm, absent=[torch.zeros_like])
    after = ops_per_layer(gm)
    assert after.get(4, 0) == 0  # a layer with both blocks removed is gone entirely
    assert before[0] - after[0] == 2 and before[2] - after[2] == 2  # the zeros and their residual add
    for layer in (1, 3, 5):
        assert after[layer] == before[layer]
    assert set(result.report) == {0, 2, 4}
    code = gm.code
    again = eliminate_skipped_blocks(gm, ctx)
    assert not again.changed and gm.code == code
    _assert_same_outputs(gm, traced)


def test_eliminate_skipped_blocks_refuses_what_it_cannot_prove(attributed):
    gm, _, ctx = attributed
    zeros = next(n for n in gm.graph.nodes if n.target is torch.zeros_like and tag(n).layer == 0)
    with gm.graph.inserting_after(zeros):
        odd = gm.graph.call_function(operator.mul, (zeros, 2.0))
    odd.meta = dict(zeros.meta)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((*out.args[0], odd),) if isinstance(out.args[0], tuple) else out.args
    gm.recompile()
    result = eliminate_skipped_blocks(gm, ctx)
    assert 0 in result.refused and "not a plain residual add" in result.refused[0]
    assert any(n.target is torch.zeros_like and tag(n).layer == 0 for n in gm.graph.nodes)
    # The other removed blocks are still eliminated.
    assert not any(n.target is torch.zeros_like and tag(n).layer in (2, 4) for n in gm.graph.nodes)


def _masks(gm):
    return {n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None) for n in gm.graph.nodes if n.target in SDPA}


def test_select_window_masks_one_mask_per_window(attributed, traced):
    gm, _, ctx = attributed
    result = select_window_masks(gm, ctx)
    assert not result.changed and not result.refused
    # Windows: sliding 3 (layers 1 and 5), chunk 4 (layer 2), full (layer 3: sdpa's is_causal).
    assert len(_masks(gm) - {None}) == 2
    assert result.report[3].startswith("causal")
    assert result.report[1] == result.report[5]
    assert len({result.report[i] for i in (1, 2, 3)}) == 3


def _duplicate(gm, node, memo):
    """Copy the computation of `node` (not its inputs) into the graph, just before its first use."""
    if node.op in ("placeholder", "get_attr") or node in memo:
        return memo.get(node, node)
    args = torch.fx.map_arg(node.args, lambda a: _duplicate(gm, a, memo))
    kwargs = torch.fx.map_arg(node.kwargs, lambda a: _duplicate(gm, a, memo))
    with gm.graph.inserting_after(node):
        new = gm.graph.create_node(node.op, node.target, args, kwargs)
    new.meta = dict(node.meta)
    memo[node] = new
    return new


def test_select_window_masks_merges_identical_masks(attributed, traced):
    gm, _, ctx = attributed
    # Make layer 5 read its own copy of the sliding-window mask it shares with layer 1.
    op5 = next(n for n in gm.graph.nodes if n.target in SDPA and tag(n).layer == 5)
    copy = _duplicate(gm, op5.kwargs["attn_mask"], {})
    op5.kwargs = {**op5.kwargs, "attn_mask": copy}
    gm.recompile()
    assert len(_masks(gm) - {None}) == 3
    result = select_window_masks(gm, ctx)
    assert result.changed
    assert len(_masks(gm) - {None}) == 2
    code = gm.code
    assert not select_window_masks(gm, ctx).changed and gm.code == code
    _assert_same_outputs(gm, traced)


def _q_view(gm, layer):
    q_proj = next(n for n in gm.graph.nodes if tag(n) and tag(n).layer == layer and tag(n).module_name == "q_proj")
    return next(u for u in q_proj.users if is_view(u))


def test_specialize_shapes_accepts_consistent_graph(attributed):
    gm, _, ctx = attributed
    code = gm.code
    result = specialize_shapes(gm, ctx)
    assert not result.changed and not result.refused and gm.code == code
    assert all("consistent" in result.report[i] for i in ctx.spec.attention_layers)


def test_specialize_shapes_rewrites_baked_global_head_dim(attributed, traced):
    gm, _, ctx = attributed
    view = _q_view(gm, 2)  # layer 2 has head_dim 8; the global head_dim is 16
    shape = view.args[1]
    assert shape[-1] == 8
    view.args = (view.args[0], (*shape[:-1], 16))  # what code reading the global config would bake in
    gm.recompile()
    result = specialize_shapes(gm, ctx)
    assert result.changed and "head_dim" in result.report[2] and not result.refused
    assert _q_view(gm, 2).args[1][-1] == 8
    code = gm.code
    assert not specialize_shapes(gm, ctx).changed and gm.code == code
    _assert_same_outputs(gm, traced)


def test_specialize_shapes_refuses_when_weights_disagree(attributed):
    gm, _, ctx = attributed
    layers = list(ctx.spec.layers)
    layers[3] = dataclasses.replace(layers[3], num_attention_heads=4)  # weights hold 2 heads
    bad = dataclasses.replace(ctx, spec=dataclasses.replace(ctx.spec, layers=tuple(layers)))
    code = gm.code
    result = specialize_shapes(gm, bad)
    assert not result.changed and gm.code == code
    assert "q_proj" in result.refused[3]


def test_passes_on_a_model_hetgraph_did_not_build():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()
    gm, inputs, ctx = capture(model, torch.randint(0, 128, (1, 6)), use_cache=False)
    assert ctx.spec is None
    code = gm.code
    # The runner, not each pass, enforces "no table, no change": no pass runs at all.
    out, records = run_passes(gm, ctx)
    assert out is gm and gm.code == code
    assert [r.name for r in records] == [p.__name__ for p in PASSES]
    assert all(not r.changed and r.refused == {None: NO_TABLE} for r in records)
