"""The benchmark harness's own arithmetic (the runs themselves live in benchmarks/, not in tests)."""

from __future__ import annotations

import hetgraph
from hetgraph.bench import _exception_line, streamed_weight_bytes
from test_gpt_oss import CONFIG as GPT_OSS


def test_decode_streams_only_routed_experts():
    """Per-layer expert counts and top-k (tests/test_gpt_oss.py's config): a decode step reads k of E
    experts of each MoE layer, computed here from the config's numbers alone."""
    model = hetgraph.from_config(GPT_OSS)
    hidden = GPT_OSS["hidden_size"]
    everything = sum(p.nbytes for name, p in model.named_parameters() if "embed_tokens" not in name)

    def expert_bytes(inter):  # gate_up [H, 2I] + bias [2I] + down [I, H] + bias [H], fp32
        return 4 * (hidden * 2 * inter + 2 * inter + inter * hidden + hidden)

    # (experts, top-k, expert width) of layers 0, 1, 3 (layer 2 has no MLP).
    moe = [(3, 2, 48), (4, 1, 32), (6, 2, 24)]
    unread = sum((experts - k) * expert_bytes(inter) for experts, k, inter in moe)
    assert streamed_weight_bytes(model) == everything - unread


def test_worker_error_is_the_exception_line():
    stderr = (
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
        "torch._inductor.exc.InductorError: AssertionError: was not removed\n\n"
        "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace\n"
    )
    assert _exception_line(stderr) == "torch._inductor.exc.InductorError: AssertionError: was not removed"
    assert _exception_line("killed\n") == "killed"
