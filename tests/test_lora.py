"""LoRA after pruning (LLM-Pruner's recovery step) with PEFT: `hetgraph.lora_targets` reaches the
linear blocks a stock target list misses; a train step; merge, save, reload. Compiled training
through the backend is `tests/test_training.py::test_lora_after_pruning_trains_like_eager` (slow)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import hetgraph
from support.checks import prompts
from support.models import VOCAB, homogeneous_config

peft = pytest.importorskip("peft")

PLAN = {0: {"skip": ["attention"]}, 1: {"linear": ["attention"], "intermediate_size": 64}, 2: {"linear": ["mlp"]}}
STOCK_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model():
    torch.manual_seed(0)
    return hetgraph.from_config(homogeneous_config(num_hidden_layers=3, per_layer_config=PLAN))


def _adapted(model) -> set[str]:
    return {n.removesuffix(".lora_A") for n, m in model.named_modules() if n.endswith("lora_A")}


def test_lora_targets_reach_every_linear_of_the_layers_and_a_stock_list_misses_linear_blocks():
    targets = hetgraph.lora_targets(_model())
    assert targets == sorted(STOCK_TARGETS + ["linear_attn", "linear_mlp"])
    linears = {n for n, m in _model().named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    ours = peft.get_peft_model(_model(), peft.LoraConfig(r=2, target_modules=targets))
    assert {n.removeprefix("base_model.model.") for n in _adapted(ours)} == linears
    stock = peft.get_peft_model(_model(), peft.LoraConfig(r=2, target_modules=STOCK_TARGETS))
    missed = linears - {n.removeprefix("base_model.model.") for n in _adapted(stock)}
    assert missed == {"model.layers.1.self_attn.linear_attn", "model.layers.2.mlp.linear_mlp"}


def test_lora_trains_merges_saves_and_reloads(tmp_path):
    base = _model()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=hetgraph.lora_targets(base)))
    ids, mask = prompts(VOCAB, batch=2, length=10, pad=(0, 3))
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        trained = model(ids, attention_mask=mask).logits
    assert (trained - before).abs().max() > 1e-3, "the train step changed nothing"
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    reloaded = hetgraph.from_pretrained(str(tmp_path / "merged"))
    real = mask.bool()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, attention_mask=mask).logits[real], trained[real], atol=1e-5, rtol=0)
