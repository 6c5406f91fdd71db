"""`from_pretrained(path, device_map=...)`: maps resolved to whole modules, "auto" balanced by
weight bytes over the devices (resolved on a skeleton with pretend GPUs: this machine has none),
`max_memory`, a tied head kept with its embedding, clear errors for bad maps, and a mapped model
on this machine's one device computing what the plain one does, with its cache beside each layer."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import hetgraph
from hetgraph.build import build_skeleton
from hetgraph.configs import config_from_dict
from hetgraph.partition import split_layers
from hetgraph.placement import placement_units, resolve_device_map
from support.fixtures import model_fixtures
from support.models import GREEDY, hetero_config

family, ckpt, model, ref = model_fixtures("llama")


def _skeleton(**overrides):
    return build_skeleton(config_from_dict(hetero_config("llama", **overrides)), None)[0]


def _pretend_gpus(n):
    return (mock.patch("torch.cuda.is_available", return_value=True),
            mock.patch("torch.cuda.device_count", return_value=n))  # fmt: skip


def _layer_bytes(skeleton):
    return [sum(p.numel() * 4 for p in layer.parameters()) for layer in skeleton.model.layers]


@pytest.mark.parametrize("gpus", [2, 3])
def test_auto_splits_layers_over_devices_by_min_max_weight_bytes(gpus):
    skeleton = _skeleton()
    a, b = _pretend_gpus(gpus)
    with a, b:
        placed = resolve_device_map(skeleton, "model", "auto", dtype=torch.float32)
    assert list(placed) == placement_units(skeleton, "model")
    layers = [placed[f"model.layers.{i}"].index for i in range(len(skeleton.model.layers))]
    assert layers == sorted(layers) and set(layers) == set(range(gpus))  # contiguous, every device used
    costs = _layer_bytes(skeleton)
    embed = skeleton.model.embed_tokens.weight.numel() * 4
    head = sum(p.numel() * 4 for p in [*skeleton.lm_head.parameters(), *skeleton.model.norm.parameters()])
    held = [sum(c for c, d in zip(costs, layers) if d == k) for k in range(gpus)]
    held[0] += embed
    held[-1] += head
    best = split_layers(costs, gpus, first=embed, last=head)
    assert max(held) == max(sum(costs[i] for i in r) + (embed if k == 0 else 0) + (head if k == gpus - 1 else 0)
                            for k, r in enumerate(best))  # fmt: skip
    assert placed["model.embed_tokens"].index == 0 and placed["model.rotary_emb"].index == 0
    assert placed["model.norm"].index == placed["lm_head"].index == gpus - 1


def test_max_memory_caps_each_device_and_an_impossible_cap_says_so():
    skeleton = _skeleton()
    costs = _layer_bytes(skeleton)
    fixed = skeleton.model.embed_tokens.weight.numel() * 4
    cap = fixed + max(costs) * 2
    a, b = _pretend_gpus(4)
    with a, b:
        placed = resolve_device_map(skeleton, "model", "auto", dtype=torch.float32, max_memory={0: cap, 1: cap, 2: cap})
        held = {}
        for i, c in enumerate(costs):
            held[placed[f"model.layers.{i}"]] = held.get(placed[f"model.layers.{i}"], 0) + c
        assert set(d.index for d in held) <= {0, 1, 2} and max(held.values()) <= cap - fixed
        with pytest.raises(ValueError, match=r"do not fit max_memory.*smallest cap that works"):
            resolve_device_map(skeleton, "model", "auto", dtype=torch.float32, max_memory={0: "10KB", 1: "10KB"})


def test_a_tied_head_stays_with_its_embedding():
    skeleton = _skeleton(tie_word_embeddings=True)
    a, b = _pretend_gpus(2)
    with a, b:
        placed = resolve_device_map(skeleton, "model", "auto", dtype=torch.float32)
        assert placed["lm_head"] == placed["model.embed_tokens"] == torch.device("cuda", 0)
        assert placed["model.norm"] == torch.device("cuda", 1)
        with pytest.raises(ValueError, match=r"tied to the embedding.*model.embed_tokens -> cuda:0.*lm_head -> cuda:1"):
            resolve_device_map(skeleton, "model", {"": 0, "lm_head": 1}, dtype=torch.float32)


@pytest.mark.parametrize("device_map, message", [
    ({"": "cpu", "model.layers.1.mlp": "cpu"}, r"'model.layers.1.mlp' is inside 'model.layers.1'.*map the whole"),
    ({"model.decoder": "cpu"}, r"'model.decoder' is not a module of LlamaForCausalLM"),
    ({"model": "cpu"}, r"no entry places 'lm_head'"),
    ({"": "cuda:3"}, r"'' -> cuda:3: this machine has 0 CUDA devices"),
    ({"": "disk"}, r"offloading to disk is not supported"),
    ({"": "nowhere"}, r"'' -> 'nowhere' is not a device"),
])  # fmt: skip
def test_bad_maps_are_errors_naming_the_key(ckpt, device_map, message):
    with pytest.raises(ValueError, match=message):
        hetgraph.from_pretrained(ckpt, device_map=device_map)


def test_device_and_device_map_together_are_refused(ckpt):
    with pytest.raises(ValueError, match="give one of them"):
        hetgraph.from_pretrained(ckpt, device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="max_memory goes with device_map"):
        hetgraph.from_pretrained(ckpt, max_memory={"cpu": "1GiB"})


@pytest.mark.parametrize("device_map", ["auto", "cpu", {"model": "cpu", "lm_head": torch.device("cpu")}])
def test_a_mapped_model_computes_what_the_plain_one_does(ckpt, model, device_map):
    mapped = hetgraph.from_pretrained(ckpt, device_map=device_map)
    assert not hasattr(mapped, "hf_device_map")  # one device: no hooks, as transformers' own loading
    ids = torch.randint(1, 100, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(mapped(ids).logits, model(ids).logits, rtol=0, atol=0)
    cache = hetgraph.make_cache(mapped, batch_size=1, max_cache_len=24)
    out = mapped.generate(ids[:1], max_new_tokens=4, cache=cache, **GREEDY)
    assert torch.equal(out, model.generate(ids[:1], max_new_tokens=4, **GREEDY))
    held = [layer.keys.device for layer in cache.layers if getattr(layer, "keys", None) is not None]
    assert held and all(d == torch.device("cpu") for d in held)


def test_a_layer_on_another_device_moves_only_its_own_mask():
    """`dispatch`'s input hooks leave the model's per-window masks alone; the layer's forward moves
    the one it uses (moving the dict would copy every window's mask to every layer's device)."""
    from hetgraph import attention
    from hetgraph.placement import _to_device

    meta = torch.device("meta")
    masks = {("full", None): torch.ones(1, 1, 3, 3, dtype=torch.bool), ("sliding", 2): torch.zeros(1, 1, 3, 3)}
    kwargs = {attention.MASKS_KWARG: masks, "position_ids": torch.arange(3)}
    args, kwargs = _to_device(meta)(None, (torch.ones(1, 3, 8),), kwargs)
    assert args[0].is_meta and kwargs["position_ids"].is_meta
    assert kwargs[attention.MASKS_KWARG] is masks and not any(m.is_meta for m in masks.values())
    attention.LayerInputs(("sliding", 2), None).pick(kwargs, args[0].device)
    assert kwargs["attention_mask"].is_meta and kwargs["attention_mask"].dtype == torch.float32
    assert attention.MASKS_KWARG not in kwargs
