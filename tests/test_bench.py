"""The benchmark harness's own arithmetic and tables (the runs themselves live in benchmarks/, not in tests)."""

from __future__ import annotations

import os

import pytest

import hetgraph
from hetgraph.bench import presets
from hetgraph.bench.driver import exception_line
from hetgraph.bench.roofline import streamed_weight_bytes
from hetgraph.configs import normalize_config
from hetgraph.spec import ModelSpec
from support.models import GPT_OSS, NEMOTRON_H

REPO = os.path.dirname(os.path.dirname(os.path.abspath(hetgraph.__file__)))


def test_decode_streams_only_routed_experts():
    """Per-layer expert counts and top-k (tests/support/models.py's GptOss config): a decode step reads k of E
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


def test_decode_skips_an_embedding_table_of_any_name():
    """NemotronH calls its table `embeddings` (tests/support/models.py's NemotronH config): still one row read;
    its one MoE layer (2: 6 experts, top-1, width 24; up [I, H] + down [H, I], no bias) reads one expert."""
    model = hetgraph.from_config(NEMOTRON_H)
    hidden, vocab = NEMOTRON_H["hidden_size"], NEMOTRON_H["vocab_size"]
    everything = sum(p.nbytes for p in model.parameters())
    unread = 4 * vocab * hidden + (6 - 1) * 4 * (2 * 24 * hidden)
    assert streamed_weight_bytes(model) == everything - unread


@pytest.mark.parametrize("tied", [False, True])
def test_roofline_of_a_tiny_llama_by_hand(tied):
    """Every weight but the embedding table, counted by hand from the config: untied, the table is
    one row per step; tied, it is the LM head and read in full (so the same count)."""
    hidden, vocab, head_dim = 32, 64, 8
    config = dict(
        model_type="llama", hidden_size=hidden, num_hidden_layers=3, vocab_size=vocab, intermediate_size=48,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, tie_word_embeddings=tied,
        per_layer_config={1: {"skip": ["attention"]}, 2: {"num_attention_heads": 2, "intermediate_size": 16}},
    )
    # (heads, KV heads, FFN width) per layer; no heads: attention is removed, with its norm.
    params = 0
    for heads, kv, width in [(4, 2, 48), (0, 0, 48), (2, 2, 16)]:
        if heads:
            params += 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim + hidden  # q, o, k, v, norm
        params += 3 * hidden * width + hidden  # gate, up, down, norm
    params += hidden + vocab * hidden  # final norm, LM head
    model = hetgraph.from_config(config)
    assert streamed_weight_bytes(model) == 4 * params
    assert sum(p.nbytes for p in model.parameters()) == 4 * (params + (0 if tied else vocab * hidden))


_NAMES = [(name, scale) for name in presets.TABLE for scale in (1, 2)]
_NAMES += [(f"{prefix}-{depth}", 1) for prefix in presets.BY_DEPTH for depth in (7, 24)]


@pytest.mark.parametrize("name,scale", _NAMES)
def test_every_preset_row_builds_a_valid_config(name, scale, monkeypatch):
    opened = []

    def recording_open(path, *args, **kwargs):
        opened.append(os.path.abspath(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(presets, "open", recording_open, raising=False)
    preset = presets.make_preset(name, scale)
    assert all(path.startswith(REPO + os.sep) for path in opened), opened
    assert bool(opened) == (name in ("puzzle", "puzzle-8b") or name.startswith("puzzle-"))  # the Super-49B rows
    spec = ModelSpec.from_config(normalize_config(preset.config))
    parent = ModelSpec.from_config(normalize_config(preset.parent))
    assert len(spec) == len(parent) and spec.hidden_size == parent.hidden_size
    assert "per_layer_config" not in preset.parent
    # The control is the parent itself; every other preset has layer variants its parent lacks.
    if name == "homogeneous":
        assert preset.config == preset.parent
    else:
        assert len(spec.variants()) > len(parent.variants())


def test_super49b_pattern_is_read_from_the_package():
    assert os.path.dirname(presets.SUPER_49B_CONFIG) == os.path.join(REPO, "hetgraph", "bench", "configs")
    blocks = presets.super49b_blocks()
    assert len(blocks) == 80
    assert presets.super49b_blocks(20) == blocks[::4]  # subsampled evenly


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown preset 'variants-x'; known: \['puzzle'.*variants-N / puzzle-N"):
        presets.make_preset("variants-x")


def test_worker_error_is_the_exception_line():
    stderr = (
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
        "torch._inductor.exc.InductorError: AssertionError: was not removed\n\n"
        "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace\n"
    )
    assert exception_line(stderr) == "torch._inductor.exc.InductorError: AssertionError: was not removed"
    assert exception_line("killed\n") == "killed"
