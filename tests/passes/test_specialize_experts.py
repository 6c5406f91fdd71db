"""specialize_experts on the dynamo graph of a real (tiny) Llama4 text model, whose MoE layers compute
every expert on every token: each proven block is routed (top-k rows through a grouped matmul) and
the outputs equal the unrewritten graph's to fp32 rounding, in a prefill and in a decode step; a block
that differs from the proven graph (scores outside the top k not -inf) stays dense and says why, and
nothing is routed when gradients are needed. Compiled against the independent reference:
tests/test_attention_forms.py (Llama4 long prompts) and tests/test_families.py (greedy decode)."""

from __future__ import annotations

import math

import pytest
import torch

import hetgraph
from hetgraph.contract import context_from_inputs
from hetgraph.passes import attribute_nodes, run_passes, specialize_experts
from hetgraph.passes._graph import layer_of
from hetgraph.passes.specialize_experts import GRAD_REFUSAL
from support.graphs import capture, copy_graph, outputs
from support.models import VOCAB, hetero_config

FALLBACK = "_fallback"  # hetgraph.expert_forms' CPU grouped matmul


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return hetgraph.from_config(hetero_config("llama4_text"))  # MoE layers 1 (top-2 of 3) and 3 (top-1 of 4)


def _attributed(model, *args, **kwargs):
    gm, inputs, ctx = capture(model, *args, **kwargs)
    attribute_nodes(gm, ctx)
    return gm, inputs, ctx, copy_graph(gm)


def _close(gm, reference, inputs):
    """Equal outputs to fp32 rounding, each graph run on its own copy of the inputs (a decode step
    writes its cache tensors and advances their lengths in place)."""
    def fresh():
        return [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]

    for got, want in zip(outputs(gm, fresh()), outputs(reference, fresh())):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def _calls(gm, name):
    return [layer_of(n) for n in gm.graph.nodes if getattr(n.target, "__name__", None) == name]


def test_routes_every_dense_moe_block(model):
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    gm, inputs, ctx, reference = _attributed(model, ids, attention_mask=mask, use_cache=False)
    assert _calls(gm, "bmm") == [1, 1, 3, 3]
    result = specialize_experts(gm, ctx)
    assert result.changed and not result.refused
    assert result.report == {1: "routed experts: top-2 of 3 per token through grouped_mm",
                             3: "routed experts: top-1 of 4 per token through grouped_mm"}
    assert _calls(gm, "bmm") == [] and _calls(gm, FALLBACK) == [1, 1, 3, 3]
    assert _calls(gm, "routed_rows") == [1, 3] and _calls(gm, "add_rows") == [1, 3]
    _close(gm, reference, inputs)
    code = gm.code
    again = specialize_experts(gm, ctx)
    assert not again.changed and gm.code == code


def test_routes_a_decode_step(model):
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    cache = hetgraph.make_cache(model, batch_size=1, max_cache_len=8)
    with torch.no_grad():
        step = model(ids, cache=cache).logits[:, -1:].argmax(-1)
    gm, inputs, ctx, reference = _attributed(model, step, cache=cache)
    assert set(specialize_experts(gm, ctx).report) == {1, 3}
    _close(gm, reference, inputs)


def test_a_block_whose_other_scores_are_not_minus_inf_stays_dense(model):
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    gm, inputs, ctx, _ = _attributed(model, ids, use_cache=False)
    fill = next(n for n in gm.graph.nodes if n.target is torch.full_like and layer_of(n) == 1)
    assert fill.args[1] == -math.inf
    fill.args = (fill.args[0], 0.0)  # sigmoid(0) = 0.5: every expert then weighs in
    gm.recompile()
    changed = copy_graph(gm)
    result = specialize_experts(gm, ctx)
    assert set(result.report) == {3}
    assert result.refused == {1: "dense experts kept: the scores outside the top k are not -inf "
                                 "(so not zero after the sigmoid)"}
    assert _calls(gm, "bmm") == [1, 1]
    _close(gm, changed, inputs)


def test_nothing_is_routed_when_gradients_are_needed(model):
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    gm, _, ctx, _ = _attributed(model, ids, use_cache=False)
    code = gm.code
    result = specialize_experts(gm, type(ctx)(spec=ctx.spec, input_layers=ctx.input_layers, needs_grad=True))
    assert not result.changed and result.refused == {None: GRAD_REFUSAL} and gm.code == code
    assert _calls(gm, "bmm") == [1, 1, 3, 3]  # the dense experts, as dynamo traced them


def test_symbolic_prompt_length_through_every_pass(model):
    """`dynamic=True`: the prompt length is a symbol and dynamo traces float attributes (the SDPA
    scale) as graph inputs; every pass still runs, the experts are routed over T*k symbolic rows."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True, dynamic=True)(torch.zeros((1, 7), dtype=torch.long))
    (gm, inputs), = graphs
    reference = copy_graph(gm)
    with torch.no_grad():  # the pass context reads grad mode, as the backend's does
        gm, records = run_passes(gm, context_from_inputs(gm, inputs))
    experts = next(r for r in records if r.name == "specialize_experts")
    assert set(experts.report) == {1, 3} and not experts.refused
    assert any(isinstance(n.meta.get("example_value"), torch.SymInt) for n in gm.graph.nodes)
    _close(gm, reference, [int(i.node.hint) if isinstance(i, torch.SymInt) else i for i in inputs])
