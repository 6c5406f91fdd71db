"""CUDA checks: run with `bash scripts/test.sh -m gpu` on a machine with a GPU."""

from __future__ import annotations

import pytest
import torch

import hetgraph
from support.models import hetero_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_reduce_overhead_captures_decode_as_cuda_graph():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = hetgraph.from_config(hetero_config("llama"), device="cuda")
    ids = torch.randint(3, 128, (2, 9), device="cuda")
    cache = hetgraph.make_cache(model, batch_size=2, max_cache_len=48)
    expected = model.generate(ids, cache=cache, max_new_tokens=24, do_sample=False, eos_token_id=None)
    model.forward = torch.compile(model.forward, backend="hetgraph", mode="reduce-overhead", fullgraph=True)
    counters.clear()
    for _ in range(2):  # the second run replays the recorded graphs
        cache.reset()
        out = model.generate(ids, cache=cache, max_new_tokens=24, do_sample=False, eos_token_id=None)
        assert torch.equal(out, expected)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] == 0


def test_compiled_logits_on_cuda_match_eager_bf16():
    torch.manual_seed(0)
    model = hetgraph.from_config(hetero_config("qwen3"), device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(3, 128, (2, 16), device="cuda")
    with torch.no_grad():
        want = model(ids).logits.float()
        got = torch.compile(model, backend="hetgraph")(ids).logits.float()
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
