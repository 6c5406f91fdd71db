"""select_window_masks on a small synthetic graph (tests/support/tiny_stack.py): one mask computation
per distinct window, counted, each layer reading its own window's; `changed` exactly when masks were
merged, a second run changes nothing; outputs equal the unrewritten graph's. The real-model graph is
tested in tests/test_passes.py."""

from __future__ import annotations

import pytest

from hetgraph.passes import select_window_masks
from hetgraph.passes._graph import SDPA, layer_of
from hetgraph.spec import SKIP
from support.graphs import assert_same_outputs
from support.tiny_stack import attributed, layer, spec, trace, with_layers

# Windows: 3 (layers 0 and 2), full (layer 1: sdpa's is_causal, no mask), 5 (layer 3); layer 4 no attention.
TABLE = spec(layer(window=3), layer(), layer(window=3), layer(window=5), layer(attention=SKIP))


@pytest.fixture(scope="module")
def per_layer():
    """The stock way this pass cleans up: a mask built for each attention layer, windows repeated."""
    return trace(TABLE, mask_per_layer=True)


@pytest.fixture(scope="module")
def per_window():
    return trace(TABLE)




def _masks(gm) -> dict[int, object]:
    """Layer -> the mask node its attention op reads (None: no mask tensor)."""
    return {layer_of(n): n.kwargs["attn_mask"] for n in gm.graph.nodes if n.target in SDPA}


def _distinct(gm) -> int:
    return len({id(m) for m in _masks(gm).values() if m is not None})


def test_merges_repeated_masks_into_one_per_window(per_layer):
    gm, inputs, ctx = attributed(per_layer)
    assert _distinct(gm) == 3
    result = select_window_masks(gm, ctx)
    assert result.changed and not result.refused
    masks = _masks(gm)
    assert _distinct(gm) == 2 and masks[1] is None
    assert masks[0] is masks[2] and masks[3] is not masks[0]
    assert result.report[0] == result.report[2] != result.report[3]
    assert result.report[1].startswith("causal")
    code = gm.code
    again = select_window_masks(gm, ctx)
    assert not again.changed and gm.code == code
    assert_same_outputs(gm, per_layer[0], inputs)


def test_one_mask_per_window_is_unchanged(per_window):
    gm, inputs, ctx = attributed(per_window)
    code = gm.code
    result = select_window_masks(gm, ctx)
    assert not result.changed and not result.refused and gm.code == code
    assert _distinct(gm) == 2 and result.report[0] == result.report[2]
    assert_same_outputs(gm, per_window[0], inputs)


def test_layers_of_different_windows_reading_one_mask_are_reported(per_window):
    """The table says layer 2's window is 4, but it reads layer 0's window-3 mask: refused, not hidden."""
    gm, _, _ = attributed(per_window)
    code = gm.code
    result = select_window_masks(gm, with_layers(per_window[2], {2: {"sliding_window": 4}}))
    assert not result.changed and gm.code == code
    assert "layers [0, 2] read one mask" in result.refused[None]
