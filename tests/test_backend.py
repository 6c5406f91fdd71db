"""`torch.compile(model, backend="hetgraph")`: registration, options, correctness against the
independent reference, static-cache decode without recompiles, and graceful handling of graphs the
passes do not understand."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch

import hetgraph
from hetgraph.backend import BackendOptions, HetgraphBackend, inductor_patches
from references.llama import load_reference
from support.graphs import assert_ops
from support.models import GREEDY, LLAMA_FAMILIES, VOCAB, hetero_config

SDPA = torch._C._nn.scaled_dot_product_attention


def _ids(batch=2, length=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second row
    return ids, mask


def _graphs(backend: HetgraphBackend):
    """The graphs the backend handed to Inductor, after its passes."""
    return [report.gm for report in backend.reports]


def test_backend_is_registered_on_import():
    assert "hetgraph" in torch._dynamo.list_backends(exclude_tags=())


@pytest.mark.slow  # slow: a fresh interpreter that compiles; the backend's registration is covered in-process
def test_backend_resolves_through_entry_point_without_import(tmp_path):
    script = textwrap.dedent(
        """
        import sys, torch
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()
        ids = torch.randint(0, 128, (1, 6))
        assert "hetgraph" not in sys.modules
        compiled = torch.compile(model, backend="hetgraph")
        with torch.no_grad():
            diff = (compiled(ids).logits - model(ids).logits).abs().max().item()
        assert "hetgraph" in sys.modules, "the entry point should have imported hetgraph"
        print("DIFF", diff)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    diff = float(out.stdout.split("DIFF")[-1])
    assert diff < 1e-4


def test_options_are_validated():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bogus'\]; known options: \['passes', 'inductor', 'strict'\]"):
        BackendOptions.from_options({"bogus": 1})
    with pytest.raises(ValueError, match="unknown pass.*known passes"):
        BackendOptions.from_options({"passes": ["no_such_pass"]})
    with pytest.raises(ValueError, match="not Inductor config options"):
        BackendOptions.from_options({"inductor": {"no_such_flag": True}})
    with pytest.raises(ValueError, match="unknown mode 'fastest'"):
        HetgraphBackend(mode="fastest")
    assert inductor_patches("max-autotune", BackendOptions())["max_autotune"] is True
    assert inductor_patches("reduce-overhead", BackendOptions())["triton.cudagraphs"] is True
    patches = inductor_patches("default", BackendOptions(inductor={"max_autotune": True, "size_asserts": True}))
    assert patches == {"max_autotune": True, "size_asserts": True, "alignment_asserts": False}


@pytest.mark.slow  # two full compiles of one model
def test_restrided_weight_recompiles_without_size_asserts(checkpoint):
    """The backend turns Inductor's per-call size asserts off because dynamo's guards check input
    strides, weights included: a weight restrided in place recompiles and stays right."""
    model = hetgraph.from_pretrained(checkpoint(hetero_config("llama")))
    backend = HetgraphBackend()
    forward = torch.compile(model.forward, backend=backend, fullgraph=True)
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        forward(input_ids=ids)
        weight = model.model.layers[1].mlp.down_proj.weight
        weight.data = weight.data.t().contiguous().t()  # same shape and values, column-major
        torch.testing.assert_close(forward(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert len(backend.reports) == 2


# Llama and Mistral by default; Qwen2 / Qwen3 (the same code) with -m slow.
@pytest.mark.parametrize(
    "family", [f if f in ("llama", "mistral") else pytest.param(f, marks=pytest.mark.slow) for f in LLAMA_FAMILIES]
)
def test_compiled_logits_equal_reference(family, checkpoint):
    path = checkpoint(hetero_config(family))
    model = hetgraph.from_pretrained(path)
    ids, mask = _ids()
    expected = load_reference(path).logits(ids, attention_mask=mask)
    backend = HetgraphBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        got = compiled(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=0)
    # Removed blocks left no zeros behind; every attention-bearing layer kept its one attention op.
    (graph,) = _graphs(backend)
    assert_ops(graph, present={SDPA: 4}, absent=[torch.zeros_like])


def test_compiled_greedy_decode_two_graphs_no_recompile(checkpoint):
    path = checkpoint(hetero_config("llama"))
    model = hetgraph.from_pretrained(path)
    ids, mask = _ids(length=7)
    new = 24  # past every window (3, 4, 5): the window caches wrap
    expected = load_reference(path).greedy(ids, new, attention_mask=mask)
    backend = HetgraphBackend()
    model.forward = torch.compile(model.forward, backend=backend, fullgraph=True)
    cache = hetgraph.make_cache(model, batch_size=2, max_cache_len=ids.shape[1] + new)
    addresses = [(l.keys.data_ptr(), l.values.data_ptr()) for l in cache.layers if l.keys is not None]
    # Warm up: the prefill graph and the decode graph (dynamo counts the second as a recompile).
    model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=2, **GREEDY)
    assert len(backend.reports) == 2
    cache.reset()
    # Then a generation that fills the cache past every window compiles nothing more.
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=new, **GREEDY)
    assert torch.equal(out, expected)
    assert addresses == [(l.keys.data_ptr(), l.values.data_ptr()) for l in cache.layers if l.keys is not None]
    assert len(backend.reports) == 2
    for graph in _graphs(backend):
        _assert_no_host_sync_and_only_cache_mutated(graph)


def _assert_no_host_sync_and_only_cache_mutated(gm):
    for node in gm.graph.nodes:
        assert not (node.op == "call_method" and node.target in ("item", "tolist", "nonzero")), node.format_node()
        assert node.target not in (torch.nonzero, torch.Tensor.item), node.format_node()
    placeholders = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
    for node in gm.graph.nodes:
        mutating = node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("__")
        if mutating and isinstance(node.args[0], torch.fx.Node) and node.args[0].name in placeholders:
            assert "cache" in node.args[0].name, f"non-cache input mutated: {node.format_node()}"


def test_generate_compile_config_uses_backend(checkpoint, monkeypatch):
    from transformers import CompileConfig

    path = checkpoint(hetero_config("qwen3"))
    model = hetgraph.from_pretrained(path)
    ids, mask = _ids(length=6)
    expected = load_reference(path).greedy(ids, 6, attention_mask=mask)
    calls = []
    original = HetgraphBackend.__call__

    def spy(self, gm, example_inputs):
        calls.append(len(gm.graph.nodes))
        return original(self, gm, example_inputs)

    monkeypatch.setattr(HetgraphBackend, "__call__", spy)
    config = CompileConfig(backend="hetgraph", fullgraph=True, mode="default")
    config._compile_all_devices = True  # generate auto-compiles only on accelerators otherwise
    model.generation_config.compile_config = config
    cache = hetgraph.make_cache(model, batch_size=2, max_cache_len=16)
    out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=6, **GREEDY)
    assert torch.equal(out, expected)
    assert calls, "generate did not compile through the hetgraph backend"


@pytest.mark.slow  # a smoke test of one more mode
def test_reduce_overhead_mode_compiles_on_cpu(checkpoint):
    model = hetgraph.from_pretrained(checkpoint(hetero_config("mistral")))
    ids, mask = _ids()
    compiled = torch.compile(model, backend="hetgraph", mode="reduce-overhead")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, attention_mask=mask).logits,
                                   model(ids, attention_mask=mask).logits, atol=1e-4, rtol=0)


def test_plain_transformers_model_compiles_unchanged():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()
    ids, mask = _ids()
    explanation = hetgraph.explain(model, ids, attention_mask=mask)
    (graph,) = explanation.graphs
    assert graph.spec is None and graph.fallback is None
    assert not any(r.changed for r in graph.records)
    assert "not built by hetgraph" in str(explanation)
    compiled = torch.compile(model, backend="hetgraph")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, attention_mask=mask).logits,
                                   model(ids, attention_mask=mask).logits, atol=1e-5, rtol=0)


def test_failing_pass_compiles_graph_unchanged_with_a_warning_naming_it(checkpoint, monkeypatch, caplog):
    import hetgraph.passes as passes_module

    @passes_module.applies_to(passes_module.DYNAMO)
    def specialize_shapes(gm, ctx):
        raise RuntimeError("pattern not understood")

    broken = tuple(specialize_shapes if p.__name__ == "specialize_shapes" else p for p in passes_module.PASSES)
    monkeypatch.setattr(passes_module, "PASSES", broken)
    model = hetgraph.from_pretrained(checkpoint(hetero_config("llama")))
    ids, mask = _ids()
    backend = HetgraphBackend()
    with caplog.at_level(logging.WARNING, logger="hetgraph.backend"):
        compiled = torch.compile(model, backend=backend)
        with torch.no_grad():
            got = compiled(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, model(ids, attention_mask=mask).logits, atol=1e-4, rtol=0)
    assert "compiling the graph unchanged" in caplog.text and "pattern not understood" in caplog.text
    assert backend.reports[0].fallback == (
        "pass specialize_shapes failed on a dynamo graph (after attribute_nodes, eliminate_skipped_blocks, "
        "select_window_masks): RuntimeError: pattern not understood"
    )
    assert "pass specialize_shapes failed" in caplog.text
    torch._dynamo.reset()
    with pytest.raises(Exception, match="pattern not understood"):
        torch.compile(model, backend=HetgraphBackend(options={"strict": True}))(ids)



def test_inductor_failing_on_specialized_graph_compiles_it_unchanged(checkpoint, monkeypatch, caplog):
    import torch._inductor.compile_fx as inductor

    real = inductor.compile_fx

    def refuses_shared_variants(gm, *args, **kwargs):
        if any(n.target is torch.ops.higher_order.invoke_subgraph for n in gm.graph.nodes):
            raise AssertionError("auto_functionalized_v2 was not removed")
        return real(gm, *args, **kwargs)

    monkeypatch.setattr(inductor, "compile_fx", refuses_shared_variants)
    config = hetero_config("llama")
    config["per_layer_config"] = {}  # homogeneous layers: shared variants, which this Inductor refuses
    model = hetgraph.from_pretrained(checkpoint(config))
    ids, mask = _ids()
    backend = HetgraphBackend()
    with caplog.at_level(logging.WARNING, logger="hetgraph.backend"):
        with torch.no_grad():
            got = torch.compile(model, backend=backend)(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, model(ids, attention_mask=mask).logits, atol=1e-4, rtol=0)
    assert backend.reports[0].fallback == "Inductor: AssertionError: auto_functionalized_v2 was not removed"
    assert "compiling the graph unchanged" in caplog.text
    torch._dynamo.reset()
    with pytest.raises(Exception, match="auto_functionalized_v2 was not removed"):
        with torch.no_grad():
            torch.compile(model, backend=HetgraphBackend(options={"strict": True}))(ids)


def test_explain_reports_per_layer(checkpoint):
    model = hetgraph.from_pretrained(checkpoint(hetero_config("llama")))
    ids, mask = _ids()
    explanation = hetgraph.explain(model, ids, attention_mask=mask)
    (graph,) = explanation.graphs
    names = [r.name for r in graph.records]
    assert names == [
        "attribute_nodes",
        "eliminate_skipped_blocks",
        "select_window_masks",
        "specialize_shapes",
        "specialize_attention",
        "specialize_experts",
        "group_layer_variants",
    ]
    eliminate = graph.records[1]
    assert eliminate.changed and set(eliminate.report) == {0, 2, 4}
    assert eliminate.ops_after.get(4, 0) == 0 < eliminate.ops_before[4]
    text = str(explanation)
    for layer in range(6):
        assert f"\n  {layer} " in text
    assert "removed" in text and "mask computation" in text
    # Each attention layer's form, or why not a cheaper one (a short prompt: under one band of keys).
    assert "masked SDPA" in text and "refused by specialize_attention" in text and "band of 32" in text


@pytest.mark.slow  # two compiles of six layers, the second with symbolic sizes (about 60 s on 2 cores)
def test_dynamic_shapes_go_through_every_pass(checkpoint):
    # A second prompt length makes dynamo recompile with symbolic sizes; no pass may fail on them.
    model = hetgraph.from_pretrained(checkpoint(hetero_config("llama")))
    backend = HetgraphBackend(options={"strict": True})
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for length in (8, 11, 13):
            ids, mask = _ids(length=length)
            torch.testing.assert_close(compiled(ids, attention_mask=mask).logits,
                                       model(ids, attention_mask=mask).logits, atol=1e-4, rtol=0)
    assert len(backend.reports) == 2 and all(r.fallback is None for r in backend.reports)
    assert any(isinstance(v, torch.SymInt) for n in backend.reports[1].gm.graph.nodes
               for v in [n.meta.get("example_value")])
