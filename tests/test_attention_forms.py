"""Attention that costs only what each layer can see (issue 14): the forms, the pass on real models,
and the caches that feed them, each against the masked SDPA or the independent references.

The case models (Llama, Llama4 text, GptOss) have windows 3 and 5 and chunks 3 and 4; a band is 32 keys (block 16), so prompts of
37 tokens (not a multiple of the block) take the banded form and shorter ones keep the masked SDPA
(the other test modules run those). Layer 0 of each has no attention.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from transformers import StaticCache

import hetgraph
from hetgraph.attention import window_mask
from hetgraph.attention_forms import banded_attention, chunked_attention, grouped_decode_attention
from hetgraph.backend import HetgraphBackend
from hetgraph.contract import model_spec
from references import load_reference
from support.checks import ATOL, assert_gradients_equal, gradients, prompts
from support.fixtures import model_fixtures
from support.models import GREEDY, VOCAB

family, ckpt, model, ref = model_fixtures(["llama", "llama4_text", "gpt_oss"])

LONG = 37


def _dense(q, k, v, mask, sinks=None):
    """The masked attention the forms replace: SDPA, or with sinks GptOss's eager formula."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    scores = torch.cat([scores, sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)], dim=-1)
    return torch.softmax(scores, dim=-1)[..., :-1] @ v


# Prompt lengths below, at and above the window and the block; held keys 0 (fresh), fewer than and as
# many as the window; left padding (a row whose first queries see no key); GptOss sinks.
GRID = list(itertools.product([1, 5, 16, 37], [("sliding", 3), ("sliding", 16), ("chunked", 5)], [0, 3, 16],
                              [False, True], [8, 16], [False, True]))


@pytest.mark.parametrize("length,window,held,padded,block,sinks", GRID)
def test_banded_attention_equals_masked_sdpa(length, window, held, padded, block, sinks):
    torch.manual_seed(length * 7 + held)
    past = held + 2 if held else 0  # the held keys sit at positions past - held .. past - 1
    q = torch.randn(2, 4, length, 8)
    k, v = torch.randn(2, 2, held + length, 8), torch.randn(2, 2, held + length, 8)
    padding = None
    if padded:
        padding = torch.ones(2, past + length, dtype=torch.bool)
        padding[1, : past + min(length, 3)] = False
    mask = window_mask(window, torch.arange(length) + past, torch.arange(held + length) + past - held, padding)
    s = torch.randn(4) if sinks else None
    got = banded_attention(q, k, v, mask, extent=window[1], block=block, sinks=s)
    torch.testing.assert_close(got, _dense(q, k, v, mask, s), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_heads,sinks,additive", itertools.product([1, 2, 4], [False, True], [False, True]))
def test_grouped_decode_attention_equals_masked_sdpa(kv_heads, sinks, additive):
    """One query per head; batch row 1 sees only its last 3 keys (left padding); an additive mask
    as GptOss's eager attention adds it."""
    torch.manual_seed(kv_heads)
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, kv_heads, 11, 8), torch.randn(2, kv_heads, 11, 8)
    mask = torch.ones(2, 1, 1, 11, dtype=torch.bool)
    mask[1, ..., :8] = False
    s = torch.randn(4) if sinks else None
    given = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min) if additive else mask
    got = grouped_decode_attention(q, k, v, given, scale=8**-0.5, sinks=s)
    torch.testing.assert_close(got, _dense(q, k, v, mask, s), atol=1e-5, rtol=0)


@pytest.mark.parametrize("length,chunk", itertools.product([1, 4, 5, 13], [4, 5]))
def test_chunked_attention_equals_masked_sdpa(length, chunk):
    torch.manual_seed(length)
    q, k, v = torch.randn(1, 4, length, 8), torch.randn(1, 2, length, 8), torch.randn(1, 2, length, 8)
    mask = window_mask(("chunked", chunk), torch.arange(length), torch.arange(length), None)
    got = chunked_attention(q, k, v, chunk=chunk, enable_gqa=True)
    torch.testing.assert_close(got, _dense(q, k, v, mask), atol=1e-5, rtol=0)


def _forms(backend) -> tuple[dict, dict]:
    (graph,) = backend.reports
    (record,) = [r for r in graph.records if r.name == "specialize_attention"]
    return record.report, record.refused


def test_compiled_long_prompt_takes_the_banded_form_and_matches_the_reference(model, ref):
    """Left padding in a batch of two: windows and chunks banded (GptOss: with its sinks), full
    attention kept, and why (Llama4's NoPE layer is a full one)."""
    ids, mask = prompts(VOCAB, length=LONG, pad=(0, 5), seed=3)
    backend = HetgraphBackend()
    with torch.no_grad():
        got = torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], ref.logits(ids, mask)[real], atol=ATOL, rtol=0)
    report, refused = _forms(backend)
    spec = model_spec(model)
    for s in spec.attention_layers:
        kind, size = spec[s].window
        if kind == "full":
            assert not report[s].startswith("banded") and "padding" in refused[s], (s, report[s])
        else:
            assert report[s].startswith(f"banded attention (extent {size}"), (s, report[s])
        # Grouped heads: the form reads the keys before repeat_kv (GptOss's kept eager attention cannot).
        grouped = spec[s].num_attention_heads > spec[s].num_key_value_heads
        kept_eager = report[s].startswith("eager attention")
        assert ("on the KV heads" in report[s]) == (grouped and not kept_eager), (s, report[s])


@pytest.fixture(scope="module")
def llama(case_checkpoint):
    """(model, reference) of the Llama case: decode and training compile once, for one family here
    (tests/test_families.py and tests/test_training.py cover every family)."""
    path = case_checkpoint("llama")
    return hetgraph.from_pretrained(path), load_reference(path)


def test_compiled_greedy_decode_with_make_cache_from_a_long_prompt(llama):
    """Prefill (banded, fresh ring buffers) then decode over the ring: two graphs, the reference's
    tokens; in decode, every layer with grouped KV heads packs its queries (one mask row per batch
    row: left padding in a batch of two)."""
    model, ref = llama
    ids, mask = prompts(VOCAB, length=LONG, pad=(0, 4), seed=4)
    new = 6
    backend = HetgraphBackend()
    model.forward = torch.compile(model.forward, backend=backend, fullgraph=True)
    try:
        cache = hetgraph.make_cache(model, batch_size=2, max_cache_len=LONG + new)
        out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=new, **GREEDY)
    finally:
        del model.forward
    assert torch.equal(out, ref.greedy(ids, new, mask)), f"\n{out.tolist()}\n{ref.greedy(ids, new, mask).tolist()}"
    assert len(backend.reports) == 2
    (decode,) = [r.report for r in backend.reports[1].records if r.name == "specialize_attention"]
    spec = model_spec(model)
    grouped = [i for i in spec.attention_layers if spec[i].num_attention_heads > spec[i].num_key_value_heads]
    assert len(grouped) == 3 and all(decode[i].startswith("GQA-packed SDPA") for i in grouped), decode
    assert not any(decode[i].startswith("GQA-packed") for i in spec.attention_layers if i not in grouped), decode


@torch.no_grad()
def test_prefill_after_prefill_attends_over_what_the_cache_holds(model, ref):
    """Eager; every family of this module (layer 0 of each holds no attention)."""
    # A second prefill into a cache holding tokens: held window (ring, in position order) + new keys.
    ids, _ = prompts(VOCAB, batch=1, length=LONG + 9, pad=(0,), seed=5)
    want = ref.logits(ids, None)
    cache = hetgraph.make_cache(model, batch_size=1, max_cache_len=ids.shape[1])
    first = model(ids[:, :LONG], cache=cache).logits
    second = model(ids[:, LONG:], cache=cache).logits
    torch.testing.assert_close(torch.cat([first, second], dim=1), want, atol=ATOL, rtol=0)


def test_gradients_through_the_banded_form_equal_eager(case_checkpoint):
    torch.manual_seed(0)
    model = hetgraph.from_pretrained(case_checkpoint("llama")).train()
    ids, _ = prompts(VOCAB, batch=2, length=LONG, pad=(0, 0), seed=6)
    params = dict(model.named_parameters())
    loss, want = gradients(model, model, ids, params)
    backend = HetgraphBackend()
    got_loss, got = gradients(model, torch.compile(model, backend=backend), ids, params)
    torch.testing.assert_close(got_loss, loss, atol=1e-5, rtol=1e-5)
    assert_gradients_equal(got, want)
    report, _ = _forms(backend)
    assert any(form.startswith("banded") for form in report.values()), report


def test_traces_with_transformers_static_cache_when_dynamo_makes_lengths_symbolic(llama):
    """transformers' sliding cache layers keep a Python-int length; dynamo makes it symbolic on the
    second decode step, and the mask annotation must still be a constant (it raised in dynamo)."""
    model, ref = llama
    ids, _ = prompts(VOCAB, batch=1, length=LONG, pad=(0,), seed=7)
    cache = StaticCache(config=model.config, max_cache_len=LONG + 4)
    forward = torch.compile(model.forward, backend="eager", fullgraph=True)
    tokens = ids
    with torch.no_grad():
        for _ in range(4):
            step = tokens if tokens.shape[1] == LONG else tokens[:, -1:]
            logits = forward(input_ids=step, cache=cache).logits[:, -1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(tokens, ref.greedy(ids, 4, None))


@torch.no_grad()
def test_a_prompt_longer_than_the_cache_is_refused_naming_the_layer(model):
    ids, _ = prompts(VOCAB, batch=1, length=12, pad=(0,))
    cache = hetgraph.make_cache(model, batch_size=1, max_cache_len=8)
    full = next(s.index for s in model_spec(model) if s.has_attention and s.window[0] == "full")
    with pytest.raises(ValueError, match=f"layer {full}: a prompt of 12 tokens does not fit its cache of 8 positions"):
        model(ids, cache=cache)


@torch.no_grad()
def test_a_compiled_gpt_oss_decode_step_packs_its_sink_attention_and_matches_the_reference(case_checkpoint):
    """GptOss's eager attention with sinks, one compiled decode step after an eager prefill of a
    left-padded batch of two into `make_cache`: the last position's logits of the reference."""
    path = case_checkpoint("gpt_oss")
    model, ref = hetgraph.from_pretrained(path), load_reference(path)
    ids, mask = prompts(VOCAB, length=12, pad=(0, 4), seed=8)
    cache = hetgraph.make_cache(model, batch_size=2, max_cache_len=16)
    model(ids[:, :-1], attention_mask=mask[:, :-1], cache=cache)
    backend = HetgraphBackend()
    step = torch.compile(model.forward, backend=backend, fullgraph=True)
    got = step(input_ids=ids[:, -1:], attention_mask=mask, cache=cache).logits[:, -1]
    torch.testing.assert_close(got, ref.logits(ids, mask)[:, -1], atol=ATOL, rtol=0)
    report, _ = _forms(backend)
    spec = model_spec(model)
    grouped = [i for i in spec.attention_layers if spec[i].num_attention_heads > spec[i].num_key_value_heads]
    assert grouped and all(report[i].startswith("GQA-packed attention with sinks") for i in grouped), report
