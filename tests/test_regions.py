"""dynamo traces each decoder layer variant once (`hetgraph.regions`), and hetgraph's backend inlines
the traced regions again before its passes: trace counts, reuse refused where layers differ, other
backends and gradients untouched, exact logits and greedy decode."""

from __future__ import annotations

import types

import pytest
import torch
from torch._dynamo.utils import compilation_time_metrics

import hetgraph
from hetgraph.backend import HetgraphBackend
from hetgraph.passes._graph import eliminate_dead_code, layer_of
from hetgraph.regions import INVOKE, inline_regions
from references.llama import load_reference
from support.checks import prompts
from support.graphs import count_ops
from support.models import GREEDY, VOCAB, hetero_config, homogeneous_config

PATTERN = [{}, {"skip": ["attention"], "intermediate_size": 96}, {"intermediate_size": 160, "sliding_window": 4}]


def _config(layers: int = 6, **overrides) -> dict:
    per_layer = {i: dict(PATTERN[i % 3]) for i in range(layers) if PATTERN[i % 3]}
    return homogeneous_config(num_hidden_layers=layers, per_layer_config=per_layer, **overrides)


def _trace_count() -> int:
    """Regions dynamo traced so far in this process, by its own timer of a region's trace (not a
    graph's distinct bodies: dynamo installs a traced body equal to an earlier one under the
    earlier's name, so a layer traced again instead of reused leaves no extra body behind)."""
    return len(compilation_time_metrics.get("invoke_subgraph_trace", []))


class _Traces:
    """Records (regions traced for the graph, region calls in it) per graph, before any inlining."""

    def __init__(self):
        self.traced: list[tuple[int, int]] = []
        self._seen = _trace_count()

    def record(self, gm) -> None:
        now = _trace_count()
        self.traced.append((now - self._seen, len(list(gm.graph.find_nodes(op="call_function", target=INVOKE)))))
        self._seen = now


class RecordingHetgraph(HetgraphBackend):
    """The hetgraph backend, recording what dynamo traced before it inlines the regions."""

    def __init__(self):
        super().__init__()
        self.traces = _Traces()
        self.traced = self.traces.traced

    def specialize(self, gm, example_inputs):
        self.traces.record(gm)
        return super().specialize(gm, example_inputs)


class InlineOnly:
    """A backend that inlines the regions and runs the graph as it is (dynamo's side only)."""

    hetgraph_inlines_regions = True

    def __init__(self):
        self.traces = _Traces()
        self.traced = self.traces.traced
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.traces.record(gm)
        inline_regions(gm)
        self.graphs.append(gm)
        return gm.forward


def _ids():
    return prompts(VOCAB, length=7, pad=(0, 3), seed=5)


def test_each_variant_is_traced_once_and_decode_equals_the_reference(checkpoint):
    path = checkpoint(_config(6))  # three variants, two layers each
    model = hetgraph.from_pretrained(path)
    ids, mask = _ids()
    new = 8
    expected = load_reference(path).greedy(ids, new, attention_mask=mask)
    backend = RecordingHetgraph()
    model.forward = torch.compile(model.forward, backend=backend, fullgraph=True)
    cache = hetgraph.make_cache(model, batch_size=2, max_cache_len=ids.shape[1] + new)
    with torch._dynamo.config.patch(inline_single_use_invoke_subgraph=False):
        model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=2, **GREEDY)
    cache.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=new, **GREEDY)
    assert torch.equal(out, expected)
    # Prefill and decode: 3 traces each for 6 layer calls.
    assert backend.traced == [(3, 6), (3, 6)]
    for report in backend.reports:
        assert report.fallback is None
        assert {layer_of(n) for n in report.gm.graph.nodes} >= set(range(6))  # each node tagged with its own layer
        grouping = report.records[-1]
        assert grouping.report[0] == grouping.report[3] == "shares hetgraph_variant_0 with layers [0, 3]"
        assert count_ops(report.gm, INVOKE) == 6  # the passes' own sharing, after the inlining


def test_forty_variants_are_forty_traces():
    layers = 40
    config = homogeneous_config(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, intermediate_size=16,
        per_layer_config={i: {"intermediate_size": 16 + i} for i in range(layers)},
    )  # fmt: skip
    torch.manual_seed(0)
    model = hetgraph.from_config(config)
    ids, mask = _ids()
    backend = InlineOnly()
    with torch.no_grad(), torch._dynamo.config.patch(inline_single_use_invoke_subgraph=False):
        got = torch.compile(model, backend=backend, fullgraph=True)(ids, attention_mask=mask, use_cache=False).logits
        want = model(ids, attention_mask=mask, use_cache=False).logits
    assert backend.traced == [(layers, layers)]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_layer_that_differs_only_in_what_its_code_reads_is_traced_apart():
    torch.manual_seed(0)
    model = hetgraph.from_config(homogeneous_config(num_hidden_layers=4))
    model.model.layers[2].input_layernorm.variance_epsilon = 0.5  # same shapes and spec, other constant
    ids, mask = _ids()
    backend = InlineOnly()
    with torch.no_grad(), torch._dynamo.config.patch(inline_single_use_invoke_subgraph=False):
        got = torch.compile(model, backend=backend, fullgraph=True)(ids, attention_mask=mask, use_cache=False).logits
        want = model(ids, attention_mask=mask, use_cache=False).logits
    assert backend.traced == [(2, 4)]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_other_backends_and_gradients_trace_plain_layers():
    torch.manual_seed(0)
    model = hetgraph.from_config(_config(6))
    ids, mask = _ids()
    traces = _Traces()

    def plain(gm, example_inputs):
        traces.record(gm)
        return gm.forward

    with torch.no_grad():
        want = model(ids, attention_mask=mask, use_cache=False).logits
        got = torch.compile(model, backend=plain, fullgraph=True)(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    backend = InlineOnly()
    loss = torch.compile(model, backend=backend, fullgraph=True)(ids, attention_mask=mask, use_cache=False).logits.sum()
    loss.backward()  # training: the layers are traced as plain modules
    assert traces.traced == [(0, 0)] and backend.traced == [(0, 0)]


def test_a_kernel_chosen_with_kernels_is_still_used_when_compiled():
    """transformers decorates the stock attention with `kernels.use_kernelized_func`; hetgraph's
    layers skip its routing while compiling only when no kernel was chosen (`regions.py`)."""
    torch.manual_seed(0)
    model = hetgraph.from_config(homogeneous_config(num_hidden_layers=2))
    attention = model.model.layers[1].self_attn
    if "_kernel_funcs" not in attention.__dict__:
        pytest.skip("this transformers does not route the attention's functions through `kernels`")
    ids, mask = _ids()
    with torch.no_grad():
        stock = model(ids, attention_mask=mask, use_cache=False).logits
        (kernel,) = attention._kernel_funcs.values()
        # What `kernels.kernelize` sets on the layer's own kernel function: here, no rotation at all.
        kernel.forward = types.MethodType(lambda self, q, k, cos, sin, unsqueeze_dim=1: (q, k), kernel)
        want = model(ids, attention_mask=mask, use_cache=False).logits
        backend = InlineOnly()
        got = torch.compile(model, backend=backend, fullgraph=True)(ids, attention_mask=mask, use_cache=False).logits
    assert not torch.allclose(want, stock, atol=1e-3)  # the chosen kernel changes the logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_gpt_oss_layers_take_the_region_and_reuse_its_trace():
    """GptOss passes `output_router_logits` down to its layers; false, it is a constant of the region."""
    torch.manual_seed(0)
    model = hetgraph.from_config(hetero_config("gpt_oss", per_layer_config={}))
    ids, mask = _ids()
    backend = InlineOnly()
    with torch.no_grad(), torch._dynamo.config.patch(inline_single_use_invoke_subgraph=False):
        got = torch.compile(model, backend=backend, fullgraph=True)(ids, attention_mask=mask, use_cache=False).logits
        want = model(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # One trace for the four layers: without a cache, a sliding layer's window is all in its mask.
    assert backend.traced == [(1, 4)]
    # The inlining leaves no dead node behind (the body's unused tuple items), as dynamo's own graph.
    (gm,) = backend.graphs
    nodes = len(gm.graph.nodes)
    eliminate_dead_code(gm.graph)
    assert len(gm.graph.nodes) == nodes


def test_regions_dynamo_inlined_itself_leave_no_dead_nodes_to_the_passes():
    """A variant called once: dynamo inlines its region itself, with the body's unused nodes (the
    indices of GptOss's `max(...).values`); the first pass to clean up reported them as its own."""
    config = hetero_config("gpt_oss")
    torch.manual_seed(0)
    model = hetgraph.from_config(config)
    ids, mask = _ids()
    backend = RecordingHetgraph()
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(ids, attention_mask=mask, use_cache=False)
    (report,) = backend.reports
    eliminate = next(r for r in report.records if r.name == "eliminate_skipped_blocks")
    removed = {i for i, o in config["per_layer_config"].items() if o.get("skip")}
    assert removed and set(eliminate.report) == removed
