"""eliminate_skipped_blocks on a small synthetic graph (tests/support/tiny_stack.py): a removed block's
zeros and their residual add are gone, per layer by count, and nothing else; `changed` exactly when
something was removed, a second run changes nothing; outputs equal the unrewritten graph's. The
real-model graph is tested in tests/test_passes.py."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from hetgraph.passes import attribute_nodes, eliminate_skipped_blocks
from hetgraph.passes._graph import layer_of, ops_per_layer
from hetgraph.spec import SKIP
from support.graphs import assert_ops, assert_same_outputs, copy_graph
from support.tiny_stack import attributed, layer, spec, trace, with_layers

# Layer 0 without attention, 2 without MLP, 3 with neither; 1 and 4 whole.
TABLE = spec(layer(attention=SKIP), layer(window=3), layer(mlp=SKIP), layer(attention=SKIP, mlp=SKIP), layer())


@pytest.fixture(scope="module")
def traced():
    return trace(TABLE)


def _attributed(traced, ctx=None):
    gm, inputs, traced_ctx = attributed(traced)
    return gm, inputs, ctx or traced_ctx


def _zeros(gm) -> Counter:
    return Counter(layer_of(n) for n in gm.graph.nodes if n.target is torch.zeros_like)


def test_removes_the_zeros_and_their_residual_adds(traced):
    gm, inputs, ctx = _attributed(traced)
    before = ops_per_layer(gm)
    assert _zeros(gm) == {0: 1, 2: 1, 3: 2}
    result = eliminate_skipped_blocks(gm, ctx)
    assert result.changed and not result.refused and set(result.report) == {0, 2, 3}
    assert_ops(gm, absent=[torch.zeros_like])
    after = ops_per_layer(gm)
    assert before[0] - after[0] == 2 and before[2] - after[2] == 2  # the zeros and their residual add
    assert before[3] == 4 and after.get(3, 0) == 0  # a layer with both blocks removed is gone entirely
    assert after[1] == before[1] and after[4] == before[4] and after[None] == before[None]
    code = gm.code
    again = eliminate_skipped_blocks(gm, ctx)
    assert not again.changed and not again.report and gm.code == code
    assert_same_outputs(gm, traced[0], inputs)


def test_keeps_zeros_of_a_block_the_table_says_is_kept(traced):
    """Layer 0's zeros come from a block its LayerSpec calls full: nothing proves them dead."""
    gm, inputs, _ = _attributed(traced)
    kept = with_layers(traced[2], {0: layer()})
    result = eliminate_skipped_blocks(gm, kept)
    assert result.changed and set(result.report) == {2, 3}
    assert _zeros(gm) == {0: 1}
    assert_same_outputs(gm, traced[0], inputs)


def test_a_graph_without_removed_blocks_is_unchanged():
    original, inputs, ctx = trace(spec(layer(), layer(window=3)))
    gm = copy_graph(original)
    attribute_nodes(gm, ctx)
    code = gm.code
    result = eliminate_skipped_blocks(gm, ctx)
    assert not result.changed and not result.report and not result.refused and gm.code == code
    assert_same_outputs(gm, original, inputs)
