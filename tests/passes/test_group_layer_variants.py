"""group_layer_variants on a small synthetic graph (tests/support/tiny_stack.py): identical layers call
one shared subgraph, counted per layer, a layer used once stays inline; `changed` exactly when layers
were grouped, a second run changes nothing; outputs equal the unrewritten graph's. No Inductor here:
the real-model graph, compiled, is tested in tests/test_variants.py."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from hetgraph.passes import group_layer_variants
from hetgraph.passes._graph import ADD, layer_of, ops_per_layer
from hetgraph.passes.group_layer_variants import GRAD_REFUSAL, PREFIX
from support.graphs import assert_same_outputs, copy_graph
from support.tiny_stack import attributed, layer, spec, trace

INVOKE = torch.ops.higher_order.invoke_subgraph
# Layers 0 and 2 alike (full attention), 1 and 3 alike (window 3, narrower MLP), 4 its own head_dim.
TABLE = spec(layer(), layer(window=3, width=16), layer(), layer(window=3, width=16), layer(head_dim=8))


def _attributed(table):
    traced = trace(table)
    return (*attributed(traced), traced[0])


@pytest.fixture(scope="module")
def traced():
    return _attributed(TABLE)


def _shared(gm) -> list[str]:
    return sorted(name for name, _ in gm.named_children() if name.startswith(PREFIX))


def test_identical_layers_call_one_shared_subgraph(traced):
    gm, inputs, ctx, original = traced
    gm = copy_graph(gm)
    before = ops_per_layer(gm)
    result = group_layer_variants(gm, ctx)
    assert result.changed and not result.refused
    assert len(_shared(gm)) == 2
    assert Counter(layer_of(n) for n in gm.graph.nodes if n.target is INVOKE) == {0: 1, 1: 1, 2: 1, 3: 1}
    assert result.report[0] == result.report[2] and result.report[0].startswith(f"shares {PREFIX}")
    assert result.report[1] == result.report[3] and result.report[1] != result.report[0]
    assert result.report[4] == "variant used once: inline"
    assert ops_per_layer(gm)[4] == before[4]  # left inline, untouched
    code = gm.code
    again = group_layer_variants(gm, ctx)
    assert not again.changed and gm.code == code
    assert_same_outputs(gm, original, inputs)


def test_distinct_layers_stay_inline():
    gm, inputs, ctx, original = _attributed(spec(layer(), layer(window=3), layer(width=16)))
    code = gm.code
    result = group_layer_variants(gm, ctx)
    assert not result.changed and not result.refused and gm.code == code and not _shared(gm)
    assert all(result.report[i] == "variant used once: inline" for i in range(3))
    assert_same_outputs(gm, original, inputs)


def test_nothing_is_shared_when_gradients_are_needed(traced):
    gm, inputs, ctx, original = traced
    gm = copy_graph(gm)
    code = gm.code
    result = group_layer_variants(gm, type(ctx)(spec=ctx.spec, input_layers=ctx.input_layers, needs_grad=True))
    assert not result.changed and result.refused == {None: GRAD_REFUSAL} and gm.code == code
    assert_same_outputs(gm, original, inputs)


def test_each_region_opens_with_the_residual_add():
    """A layer's closing residual add opens the next layer's shared region, where Inductor fuses it
    with that layer's norm; the first layer opens with `x + 0`, so it shares too; the last layer's
    add stays outside, beside the final norm."""
    gm, inputs, ctx, original = _attributed(spec(layer(), layer(window=3, width=16), layer(), layer(window=3, width=16)))
    result = group_layer_variants(gm, ctx)
    assert result.report[0] == result.report[2] and result.report[1] == result.report[3]
    for name in _shared(gm):
        first = next(n for n in getattr(gm, name).graph.nodes if n.op == "call_function")
        assert first.target in ADD, (name, first.format_node())
    calls = [n for n in gm.graph.nodes if n.target is INVOKE]
    assert [layer_of(n) for n in calls] == [0, 1, 2, 3]
    opening = calls[0].args[2:4]  # the embeddings, and the zeros added to them
    assert [n.target for n in opening[1:]] == [torch.zeros_like] and opening[1].args == (opening[0],)
    inline = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ADD and layer_of(n) == 3]
    assert len(inline) == 1 and all(a.args[0] is calls[-1] for a in inline[0].all_input_nodes)
    assert_same_outputs(gm, original, inputs)
