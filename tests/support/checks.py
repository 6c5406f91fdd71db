"""Checks a model runs against its independent plain-PyTorch reference (tests/references/), the same
for every family, written once: logits, greedy decoding (cached, uncached, compiled, exported), save/load
round trips; the prompts they use; and compiled-versus-eager gradients.
"""

from __future__ import annotations

import json
import os

import torch
from transformers.cache_utils import DummyLayer

import hetgraph
from hetgraph.backend import HetgraphBackend
from hetgraph.contract import model_spec
from references.llama import per_layer_entries
from support.models import GREEDY

ATOL = 1e-4


def prompts(vocab: int, batch=2, length=12, pad=(0, 4), seed=0):
    """Random ids [B, T] and a left-padding mask (row b has pad[b] leading pad tokens, id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for b, n in enumerate(pad):
        mask[b, :n] = 0
        ids[b, :n] = 0
    return ids, mask


def read_config(path) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


@torch.no_grad()
def assert_logits_match(model, ref, ids, mask=None):
    got = model(ids, attention_mask=mask).logits
    want = ref.logits(ids, mask)
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(got[real].float(), want[real].float(), atol=ATOL, rtol=0)


def assert_greedy_matches(model, ref, ids, mask, new: int, cache: str):
    """`generate` with transformers' default cache or `make_cache` equals the reference's greedy recompute."""
    kwargs = {}
    if cache == "make_cache":
        kwargs["cache"] = hetgraph.make_cache(model, batch_size=ids.shape[0], max_cache_len=ids.shape[1] + new)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, return_dict_in_generate=True, **GREEDY, **kwargs)
    want = ref.greedy(ids, new, mask)
    assert torch.equal(out.sequences, want), f"\ngenerated {out.sequences.tolist()}\nreference {want.tolist()}"
    return out


def assert_uncached_greedy_matches(model, ref, vocab: int, new: int = 12):
    """`generate` without a cache (each step recomputes the whole prefix) equals the reference."""
    ids, _ = prompts(vocab, batch=1, length=5, pad=(0,))
    out = model.generate(ids, max_new_tokens=new, use_cache=False, **GREEDY)
    assert torch.equal(out, ref.greedy(ids, new))


def assert_stateless_layers_hold_dummies(model, cache):
    """Layers without attention (or mamba state) hold a `DummyLayer`, whichever cache generate used."""
    spec = model_spec(model)
    for s in spec:
        if not s.has_attention and not s.has_mamba:
            assert isinstance(cache.layers[s.index], DummyLayer), (s.index, type(cache.layers[s.index]).__name__)


def assert_save_load_round_trip(model, ckpt, tmp_path, vocab: int, expected_per_layer: dict):
    model.save_pretrained(tmp_path)
    saved = read_config(tmp_path)
    assert saved["per_layer_config"] == read_config(ckpt)["per_layer_config"]
    entries = per_layer_entries(saved)  # without hetgraph's note for stock readers
    for i, over in expected_per_layer.items():
        assert entries[i] == over, f"layer {i}"
    reloaded = hetgraph.from_pretrained(str(tmp_path))
    assert type(reloaded) is type(model)
    assert model_spec(reloaded) == model_spec(model)
    ids, mask = prompts(vocab, pad=(0, 3))
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits, atol=0, rtol=0
        )


def assert_compiled_decode(path: str, ref, vocab: int, new: int = 32):
    """Compiled greedy decode (backend="hetgraph", fullgraph) equals the reference, logits included,
    in two graphs (prefill, decode) that no later step recompiles, with the cache at fixed addresses."""
    model = hetgraph.from_pretrained(path)
    ids, mask = prompts(vocab, length=7, pad=(0, 3), seed=1)
    expected = ref.greedy(ids, new, mask)
    backend = HetgraphBackend()
    model.forward = torch.compile(model.forward, backend=backend, fullgraph=True)
    cache = hetgraph.make_cache(model, batch_size=2, max_cache_len=ids.shape[1] + new)
    addresses = _state_addresses(cache)
    # Warm up: the prefill graph and the decode graph (dynamo counts the second as a recompile).
    model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=2, **GREEDY)
    assert len(backend.reports) == 2
    cache.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=new, output_logits=True,
                             return_dict_in_generate=True, **GREEDY)
    assert torch.equal(out.sequences, expected), f"\ngenerated {out.sequences.tolist()}\nreference {expected.tolist()}"
    # Each step's logits (the prefill's last position, then every decode step) equal the reference's.
    full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], dim=1)
    want = ref.logits(expected, full_mask)
    got = torch.stack(out.logits, dim=1)  # [B, new, V]
    torch.testing.assert_close(got.float(), want[:, ids.shape[1] - 1 : -1].float(), atol=ATOL, rtol=0)
    assert len(backend.reports) == 2
    assert _state_addresses(cache) == addresses
    for report in backend.reports:
        assert report.fallback is None, report.fallback
    return backend


def _state_addresses(cache) -> list:
    addresses = []
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            addresses.append((layer.keys.data_ptr(), layer.values.data_ptr()))
        for states in (getattr(layer, "conv_states", None), getattr(layer, "recurrent_states", None)):
            if states:
                addresses.extend(t.data_ptr() for t in states.values() if t is not None)
    return addresses


def assert_compiled_logits(path: str, ref, vocab: int):
    """One compiled forward (backend="hetgraph", fullgraph) equals the reference on a left-padded batch."""
    model = hetgraph.from_pretrained(path)
    ids, mask = prompts(vocab, length=9, pad=(0, 3), seed=1)
    backend = HetgraphBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        got = compiled(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real].float(), ref.logits(ids, mask)[real].float(), atol=ATOL, rtol=0)
    (report,) = backend.reports
    assert report.fallback is None, report.fallback
    return report


def assert_exported_decode(model, ref, vocab: int, path, new: int = 10):
    """`export(decode=True)`: the programs' greedy loop equals the reference, and the state they carry
    is exactly `make_cache`'s tensors (names per layer, shapes, dtypes)."""
    from hetgraph.export import generate_with_exported

    ids, _ = prompts(vocab, length=6, pad=(0, 0), seed=2)
    max_cache_len = ids.shape[1] + new
    exported = hetgraph.export(model, path, input_ids=ids, decode=True, max_cache_len=max_cache_len)
    got = generate_with_exported(exported.prefill, exported.decode, ids, new)
    want = ref.greedy(ids, new, None)
    assert torch.equal(got, want), f"\nexported  {got.tolist()}\nreference {want.tolist()}"
    cache = hetgraph.make_cache(model, batch_size=2, max_cache_len=max_cache_len)
    _, state = torch.export.load(exported.prefill).module()(ids)
    expected = {}
    for i, layer in enumerate(cache.layers):
        if getattr(layer, "keys", None) is not None:
            expected[f"layers.{i}.keys"] = layer.keys
            expected[f"layers.{i}.values"] = layer.values
            expected[f"layers.{i}.length"] = layer.cumulative_length
        if getattr(layer, "conv_states", None):
            expected[f"layers.{i}.conv_states"] = layer.conv_states[0]
            expected[f"layers.{i}.recurrent_states"] = layer.recurrent_states[0]
    assert {k: (tuple(v.shape), v.dtype) for k, v in state.items()} == {
        k: (tuple(v.shape), v.dtype) for k, v in expected.items()
    }
    return exported


def gradients(model, forward, ids, params) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of `forward(ids, labels=ids)` and the gradients it leaves on `params` (name -> parameter)."""
    model.zero_grad(set_to_none=True)
    loss = forward(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in params.items() if p.grad is not None}


def assert_gradients_equal(got: dict, want: dict) -> None:
    """1e-4 relative per tensor, plus 1e-7 absolute: a router's gradient can cancel to ~1e-10."""
    assert got.keys() == want.keys()
    for name, g in want.items():
        diff, scale = (got[name] - g).norm().item(), g.norm().item()
        assert diff <= 1e-4 * scale + 1e-7, f"{name}: gradient off by {diff:.3g} (norm {scale:.3g})"
