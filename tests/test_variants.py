"""Compile each distinct layer variant once: reuse, non-reuse, many variants, decode, on-disk cache."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import hetgraph
from hetgraph.backend import HetgraphBackend
from hetgraph.passes import group_layer_variants, run_passes
from references.llama import load_reference
from support.graphs import capture, copy_graph, count_ops, outputs
from support.models import GREEDY, homogeneous_config

INVOKE = torch.ops.higher_order.invoke_subgraph
PATTERN = [{}, {"skip": ["attention"], "intermediate_size": 96}, {"intermediate_size": 160, "sliding_window": 4}]


def repeating_config(layers: int = 6, pattern=PATTERN) -> dict:
    per_layer = {i: dict(pattern[i % len(pattern)]) for i in range(layers) if pattern[i % len(pattern)]}
    return homogeneous_config(num_hidden_layers=layers, per_layer_config=per_layer)


def _ids(length=9):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


def _shared(gm):
    return sorted(name for name, _ in gm.named_children() if name.startswith("hetgraph_variant_"))


def test_identical_layers_share_one_subgraph(checkpoint):
    path = checkpoint(repeating_config(6))
    model = hetgraph.from_pretrained(path)
    ids, mask = _ids()
    gm, inputs, ctx = capture(model, ids, attention_mask=mask, use_cache=False)
    reference_out = outputs(copy_graph(gm), inputs)
    gm, records = run_passes(gm, ctx)
    result = records[-1]
    assert result.name == "group_layer_variants" and result.changed and not result.refused
    assert _shared(gm) == ["hetgraph_variant_0", "hetgraph_variant_1", "hetgraph_variant_2"]
    assert count_ops(gm, INVOKE) == 6
    assert result.report[0] == result.report[3] == "shares hetgraph_variant_0 with layers [0, 3]"
    for got, want in zip(outputs(gm, inputs), reference_out):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    code = gm.code
    assert not group_layer_variants(gm, ctx).changed and gm.code == code
    # Compiled, the shared subgraphs give the reference's logits.
    backend = HetgraphBackend()
    with torch.no_grad():
        got = torch.compile(model, backend=backend, fullgraph=True)(ids, attention_mask=mask).logits
    expected = load_reference(path).logits(ids, attention_mask=mask)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=0)
    assert count_ops(backend.reports[0].gm, INVOKE) == 6


def test_layers_that_look_alike_but_differ_are_not_shared():
    # Same weight shapes (q: 8 heads x 8 = 16 heads x 4 = 64 rows), different head split: different code.
    config = homogeneous_config(
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        per_layer_config={1: {"num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 4},
                          3: {"num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 4}},
    )
    model = hetgraph.from_config(config)
    layer0, layer1 = model.model.layers[0], model.model.layers[1]
    assert layer0.self_attn.q_proj.weight.shape == layer1.self_attn.q_proj.weight.shape
    ids, mask = _ids()
    gm, inputs, ctx = capture(model, ids, attention_mask=mask, use_cache=False)
    reference_out = outputs(copy_graph(gm), inputs)
    gm, records = run_passes(gm, ctx)
    report = records[-1].report
    assert report[0] == "shares hetgraph_variant_0 with layers [0, 2]"
    assert report[1] == "shares hetgraph_variant_1 with layers [1, 3]"
    for got, want in zip(outputs(gm, inputs), reference_out):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_many_variants_beyond_the_recompile_limit():
    layers = 40
    config = homogeneous_config(
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=16,
        per_layer_config={i: {"intermediate_size": 16 + i} for i in range(layers)},  # 40 distinct variants
    )
    torch.manual_seed(0)
    model = hetgraph.from_config(config)
    ids, mask = _ids()
    backend = HetgraphBackend()
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        got = torch.compile(model, backend=backend, fullgraph=True)(ids, attention_mask=mask).logits
        want = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    (report,) = backend.reports
    grouping = report.records[-1]
    assert grouping.report[None] == f"{layers} layer variant(s) for {layers} layer(s) with ops"
    assert all(grouping.report[i] == "variant used once: inline" for i in range(layers))


def test_decode_with_shared_variants_two_graphs(checkpoint):
    path = checkpoint(repeating_config(6))
    model = hetgraph.from_pretrained(path)
    ids, mask = _ids(length=6)
    new = 12
    expected = load_reference(path).greedy(ids, new, attention_mask=mask)
    backend = HetgraphBackend()
    model.forward = torch.compile(model.forward, backend=backend, fullgraph=True)
    cache = hetgraph.make_cache(model, batch_size=2, max_cache_len=ids.shape[1] + new)
    model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=2, **GREEDY)
    cache.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=new, **GREEDY)
    assert torch.equal(out, expected)
    assert len(backend.reports) == 2
    for report in backend.reports:
        assert count_ops(report.gm, INVOKE) == 6


@pytest.mark.slow
def test_second_process_reuses_inductor_cache(tmp_path):
    script = textwrap.dedent(
        """
        import torch, hetgraph
        from torch._dynamo.utils import counters
        torch.manual_seed(0)
        config = dict(model_type="llama", hidden_size=64, num_hidden_layers=4, vocab_size=128,
                      intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                      per_layer_config={1: {"skip": ["attention"]}, 3: {"skip": ["attention"]}})
        model = hetgraph.from_config(config)
        with torch.no_grad():
            torch.compile(model, backend="hetgraph")(torch.randint(0, 128, (1, 8)))
        print("HITS", counters["inductor"]["fxgraph_cache_hit"], "MISSES", counters["inductor"]["fxgraph_cache_miss"])
        """
    )
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        words = out.stdout.split()
        runs.append((int(words[words.index("HITS") + 1]), int(words[words.index("MISSES") + 1])))
    assert runs[0] == (0, 1)
    assert runs[1] == (1, 0)
