"""specialize_shapes on a small synthetic graph (tests/support/tiny_stack.py): every head split and
attention scale carries its own layer's head_dim, counted per layer; a baked-in other value is
rewritten (`changed`), a consistent graph is not, a second run changes nothing; outputs equal the
unrewritten graph's. The real-model graph is tested in tests/test_passes.py."""

from __future__ import annotations

import pytest

from hetgraph.passes import specialize_shapes
from hetgraph.passes._graph import SDPA, is_view, tag
from hetgraph.spec import SKIP
from support.graphs import assert_same_outputs
from support.tiny_stack import attributed, layer, spec, trace, with_layers

# Per-layer head_dim 8 (two heads, two KV heads) and 4 (four heads, two KV heads); layer 2 no attention.
TABLE = spec(layer(head_dim=8, heads=2, kv_heads=2), layer(head_dim=4, heads=4, kv_heads=2, window=3),
             layer(attention=SKIP))


@pytest.fixture(scope="module")
def traced():
    return trace(TABLE)




def _head_splits(gm) -> dict[int, list[int]]:
    """Layer -> the last dim of each `view(B, T, -1, head_dim)` of a q/k/v projection."""
    splits: dict[int, list[int]] = {}
    for n in gm.graph.nodes:
        if is_view(n) and tag(n.args[0]) and tag(n.args[0]).module_name in ("q_proj", "k_proj", "v_proj"):
            splits.setdefault(tag(n).layer, []).append(n.args[-1])
    return splits


def _split(gm, layer_index, proj="q_proj"):
    return next(n for n in gm.graph.nodes if is_view(n) and tag(n.args[0]) and tag(n.args[0]).layer == layer_index
                and tag(n.args[0]).module_name == proj)


def _attention(gm, layer_index):
    return next(n for n in gm.graph.nodes if n.target in SDPA and tag(n).layer == layer_index)


def test_a_consistent_graph_is_unchanged(traced):
    gm, inputs, ctx = attributed(traced)
    assert _head_splits(gm) == {0: [8, 8, 8], 1: [4, 4, 4]}
    code = gm.code
    result = specialize_shapes(gm, ctx)
    assert not result.changed and not result.refused and gm.code == code
    # Layers 0 and 1: head splits, scale and projection weights; layer 2: its MLP's weights.
    assert set(result.report) == {0, 1, 2} and all("consistent" in r for r in result.report.values())
    assert_same_outputs(gm, traced[0], inputs)


def test_rewrites_a_baked_in_head_dim(traced):
    gm, inputs, ctx = attributed(traced)
    view = _split(gm, 0)
    view.args = (*view.args[:-1], 4)  # what code reading another layer's (or the global) head_dim bakes in
    gm.recompile()
    result = specialize_shapes(gm, ctx)
    assert result.changed and "head_dim" in result.report[0] and not result.refused
    assert _head_splits(gm) == {0: [8, 8, 8], 1: [4, 4, 4]}
    code = gm.code
    again = specialize_shapes(gm, ctx)
    assert not again.changed and gm.code == code
    assert_same_outputs(gm, traced[0], inputs)


def test_rewrites_a_baked_in_attention_scale(traced):
    gm, inputs, ctx = attributed(traced)
    op = _attention(gm, 1)
    op.kwargs = {**op.kwargs, "scale": 8**-0.5}  # layer 0's head_dim; layer 1's is 4
    gm.recompile()
    result = specialize_shapes(gm, ctx)
    assert result.changed and "scale" in result.report[1] and not result.refused
    assert _attention(gm, 1).kwargs["scale"] == pytest.approx(4**-0.5, rel=1e-6)
    code = gm.code
    assert not specialize_shapes(gm, ctx).changed and gm.code == code
    assert_same_outputs(gm, traced[0], inputs)


def test_refuses_a_table_its_weights_disagree_with(traced):
    gm, _, _ = attributed(traced)
    code = gm.code
    result = specialize_shapes(gm, with_layers(traced[2], {1: {"num_attention_heads": 2}}))  # weights hold 4
    assert not result.changed and gm.code == code
    assert set(result.refused) == {1} and "q_proj" in result.refused[1]
