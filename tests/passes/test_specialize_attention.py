"""specialize_attention on a small synthetic graph (tests/support/tiny_stack.py): sliding layers whose
mask hetgraph's hook built get banded attention, a full layer keeps its is_causal SDPA, masks the
hook did not build (or built for another window) are refused with the reason; `changed` is exact, a
second run changes nothing, outputs equal the unrewritten graph's. Real models: tests/test_attention_forms.py."""

from __future__ import annotations

import pytest
import torch

from hetgraph.attention_forms import banded_attention
from hetgraph.passes import specialize_attention
from hetgraph.passes._graph import SDPA, layer_of
from support.graphs import outputs
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
