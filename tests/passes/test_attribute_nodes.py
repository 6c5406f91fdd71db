"""attribute_nodes on a small synthetic graph (tests/support/tiny_stack.py): every node gets its layer
and block, counted per layer; the pass only tags (`changed` never true, the code untouched); outputs
unchanged. The real-model graph is tested in tests/test_passes.py."""

from __future__ import annotations

import dataclasses
import operator
from collections import Counter

import pytest
import torch

from hetgraph.passes import attribute_nodes
from hetgraph.passes._graph import SDPA, compute_nodes, tag
from hetgraph.spec import SKIP
from support.graphs import assert_same_outputs, copy_graph
from support.tiny_stack import layer, spec, trace, trace_layer

LINEAR = torch._C._nn.linear
ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
# Layer 0 without attention, 1 windowed, 2 without MLP (its own head_dim), 3 with neither block.
TABLE = spec(layer(attention=SKIP), layer(window=3), layer(mlp=SKIP, head_dim=8, kv_heads=2),
             layer(attention=SKIP, mlp=SKIP))


@pytest.fixture(scope="module")
def traced():
    return trace(TABLE)


def _tags(gm, target) -> Counter:
    return Counter((tag(n).layer, tag(n).block, tag(n).module_name) for n in gm.graph.nodes if n.target is target)


def test_tags_each_node_with_its_layer_and_block(traced):
    original, inputs, ctx = traced
    gm = copy_graph(original)
    code = gm.code
    result = attribute_nodes(gm, ctx)

    assert all(tag(n) is not None for n in compute_nodes(gm))
    assert _tags(gm, LINEAR) == {
        **{(i, "attention", name): 1 for i in (1, 2) for name in ATTENTION_LINEARS},
        **{(i, "mlp", name): 1 for i in (0, 1) for name in MLP_LINEARS},
    }
    assert Counter(tag(n).layer for n in gm.graph.nodes if n.target in SDPA) == {1: 1, 2: 1}
    # A removed block's zeros belong to that block; its norm went with it.
    assert _tags(gm, torch.zeros_like) == {
        (0, "attention", "self_attn"): 1, (2, "mlp", "mlp"): 1, (3, "attention", "self_attn"): 1, (3, "mlp", "mlp"): 1
    }
    # A norm belongs to the block it feeds; the final norm to no layer.
    assert _tags(gm, torch.rsqrt) == {
        (1, "attention", "input_layernorm"): 1, (2, "attention", "input_layernorm"): 1,
        (0, "mlp", "post_attention_layernorm"): 1, (1, "mlp", "post_attention_layernorm"): 1, (None, None, "norm"): 1,
    }
    # The residual adds belong to their layer, outside its blocks: two per layer.
    adds = [tag(n).layer for n in gm.graph.nodes if n.target is operator.add and tag(n).block is None]
    assert Counter(a for a in adds if a is not None) == {0: 2, 1: 2, 2: 2, 3: 2}
    # The window mask is built outside the layers.
    (mask,) = [n.kwargs["attn_mask"] for n in gm.graph.nodes if n.target in SDPA and n.kwargs["attn_mask"] is not None]
    assert tag(mask).layer is None

    assert not result.changed and not result.refused and gm.code == code
    again = attribute_nodes(gm, ctx)
    assert not again.changed and again.report == result.report and gm.code == code
    assert_same_outputs(gm, original, inputs)


def test_a_layer_alone_takes_its_index_from_its_parameters():
    """One decoder layer compiled on its own: no `layers[i]` in the module paths, the parameter tags say 2."""
    gm, inputs, ctx = trace_layer(TABLE, 2)
    code = gm.code
    result = attribute_nodes(gm, ctx)
    assert {tag(n).layer for n in compute_nodes(gm)} == {2}
    assert _tags(gm, LINEAR) == {(2, "attention", name): 1 for name in ATTENTION_LINEARS}
    assert _tags(gm, torch.zeros_like) == {(2, "mlp", "mlp"): 1}
    assert not result.changed and not result.refused and gm.code == code


def test_a_layer_missing_from_the_table_is_refused(traced):
    original, _, ctx = traced
    gm = copy_graph(original)
    code = gm.code
    short = dataclasses.replace(ctx, spec=dataclasses.replace(ctx.spec, layers=ctx.spec.layers[:3]))
    result = attribute_nodes(gm, short)
    assert set(result.refused) == {3} and "not in the LayerSpec table (3 layers)" in result.refused[3]
    assert not result.changed and gm.code == code
