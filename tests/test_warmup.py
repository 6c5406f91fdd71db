"""Warm starts: `python -m hetgraph warmup` fills a cache directory; a later process that calls
`hetgraph.compile_cache_dir` on it compiles nothing for the same model (at another prompt length)
and gets the eager model's logits; a model that differs in one layer's width, served from the same
directory, compiles its own graphs and gets its own logits."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import hetgraph
from support.models import GREEDY, VOCAB

MAX_CACHE_LEN = 48
SERVE = textwrap.dedent(
    """
    import json, sys, torch, hetgraph
    from torch._dynamo.utils import counters
    path, cache_dir, out = sys.argv[1:]
    hetgraph.compile_cache_dir(cache_dir)
    model = hetgraph.from_pretrained(path)
    ids = torch.tensor([[(7 * i + 3) % 128 for i in range(13)]])
    cache = hetgraph.make_cache(model, batch_size=1, max_cache_len=48)
    model.forward = torch.compile(model.forward, backend="hetgraph", fullgraph=True)
    with torch.no_grad():
        gen = model.generate(ids, cache=cache, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    torch.save({"tokens": gen.sequences, "logits": torch.stack(gen.logits)}, out)
    print(json.dumps({"hits": counters["inductor"]["fxgraph_cache_hit"],
                      "misses": counters["inductor"]["fxgraph_cache_miss"],
                      "graphs": counters["stats"]["unique_graphs"]}))
    """
)


def _config(width: int) -> dict:
    """A sliding layer (banded attention in the prefill graph) and a full layer of the given MLP width."""
    return dict(model_type="llama", hidden_size=64, num_hidden_layers=2, vocab_size=VOCAB, intermediate_size=128,
                num_attention_heads=4, num_key_value_heads=2,
                per_layer_config={0: {"sliding_window": 4}, 1: {"intermediate_size": width}})  # fmt: skip


def _run(args: list[str]) -> str:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _serve(path: str, cache_dir: str, out: str) -> dict:
    stats = json.loads(_run(["-c", SERVE, path, cache_dir, out]).strip().splitlines()[-1])
    return {**stats, **torch.load(out)}


def _eager(path: str) -> dict:
    model = hetgraph.from_pretrained(path)
    ids = torch.tensor([[(7 * i + 3) % 128 for i in range(13)]])
    with torch.no_grad():
        gen = model.generate(ids, cache=hetgraph.make_cache(model, batch_size=1, max_cache_len=MAX_CACHE_LEN),
                             max_new_tokens=6, output_logits=True, return_dict_in_generate=True, **GREEDY)  # fmt: skip
    return {"tokens": gen.sequences, "logits": torch.stack(gen.logits)}


@pytest.mark.slow  # three fresh processes, two cold compiles (about 100 s on 2 cores)
def test_warm_start_compiles_nothing_and_never_serves_another_models_graph(checkpoint, tmp_path):
    model_a, model_b = checkpoint(_config(96)), checkpoint(_config(64))
    cache_dir = str(tmp_path / "compiled")
    report = json.loads(_run(["-m", "hetgraph", "warmup", model_a, "--cache-dir", cache_dir, "--max-cache-len",
                              str(MAX_CACHE_LEN), "--prompt-lens", "8,20"]).split("\na later process")[0])  # fmt: skip
    assert report["graphs_compiled"] == 2 and report["fxgraph_cache_misses"] == 2  # prefill (any length), decode

    warm = _serve(model_a, cache_dir, str(tmp_path / "a.pt"))  # prompt of 13 tokens: not a warmed length
    assert (warm["hits"], warm["misses"]) == (2, 0)
    expected = _eager(model_a)
    assert torch.equal(warm["tokens"], expected["tokens"])
    torch.testing.assert_close(warm["logits"], expected["logits"], rtol=1e-5, atol=1e-5)

    other = _serve(model_b, cache_dir, str(tmp_path / "b.pt"))
    assert other["misses"] >= 1, "a model with another MLP width was served the first model's graphs"
    expected = _eager(model_b)
    assert torch.equal(other["tokens"], expected["tokens"])
    torch.testing.assert_close(other["logits"], expected["logits"], rtol=1e-5, atol=1e-5)


def test_compile_cache_dir_keeps_the_users_dynamic_sources(tmp_path, monkeypatch):
    # Config modules are restored with their own `patch`: monkeypatch's undo deletes a config
    # entry it did not find in the module's __dict__, which broke every later compile in the process.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "before"))
    before = torch.compiler.config.dynamic_sources
    with (
        torch.compiler.config.patch(dynamic_sources="L['x']:0"),
        torch._inductor.config.patch(fx_graph_cache=torch._inductor.config.fx_graph_cache),
        torch._functorch.config.patch(enable_autograd_cache=torch._functorch.config.enable_autograd_cache),
    ):
        path = hetgraph.compile_cache_dir(tmp_path / "cache")
        assert path == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()
        sources = torch.compiler.config.dynamic_sources.split(",")
        assert sources[0] == "L['x']:0" and any("input_ids" in s for s in sources)
        hetgraph.compile_cache_dir(tmp_path / "cache")  # twice: nothing added twice
        assert torch.compiler.config.dynamic_sources.split(",") == sources
    assert torch.compiler.config.dynamic_sources == before


def test_warmup_refuses_prompt_lengths_the_cache_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="prompt_lens=.*max_cache_len - 2 = 14"):
        hetgraph.warmup("never-read", max_cache_len=16, prompt_lens=(4, 15), cache_dir=tmp_path)
