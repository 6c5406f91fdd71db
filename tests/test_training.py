"""Training through the backend: compiled gradients equal eager ones, for every family.

Each config has two identical layers, so in inference `group_layer_variants` shares a variant
between them; with gradients needed it must not (Inductor's buffer reuse around a shared subgraph
corrupted the saved activations: relative gradient errors up to 9e4 while the forward was exact).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx

import hetgraph
from hetgraph.backend import HetgraphBackend
from hetgraph.passes import PassContext
from hetgraph.passes.group_layer_variants import GRAD_REFUSAL, group_layer_variants
from support.checks import assert_gradients_equal, gradients, prompts
from support.models import VOCAB

_SMALL = dict(hidden_size=64, vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, tie_word_embeddings=False)

TRAIN_CONFIGS = {
    # The report's case: layers 1 and 2 identical (pruned width, one KV head).
    "llama": dict(_SMALL, model_type="llama", num_hidden_layers=4, intermediate_size=128, per_layer_config={
        0: {"skip": ["attention"]},
        1: {"intermediate_size": 64, "num_key_value_heads": 1},
        2: {"intermediate_size": 64, "num_key_value_heads": 1},
        3: {"skip": ["mlp"]},
    }),
    # Layers 1 and 2: window 3 (layer 1 is retyped from full), top-1 routing over 4 experts.
    "gpt_oss": dict(_SMALL, model_type="gpt_oss", num_hidden_layers=3, intermediate_size=32, head_dim=16,
                    num_local_experts=4, num_experts_per_tok=2, sliding_window=5, per_layer_config={
        0: {"skip": ["attention"]},
        1: {"num_experts_per_tok": 1, "sliding_window": 3},
        2: {"num_experts_per_tok": 1, "sliding_window": 3},
    }),
    # Layers 1 and 3: chunked MoE layers.
    "llama4_text": dict(_SMALL, model_type="llama4_text", num_hidden_layers=4, intermediate_size=32,
                        intermediate_size_mlp=96, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
                        attention_chunk_size=4, no_rope_layers=[1, 1, 1, 1], moe_layers=[1, 3],
                        per_layer_config={0: {"skip": ["attention"]}}),
    # Mamba layers 0 and 2 identical, attention layers 1 and 3 identical.
    "nemotron_h": dict(_SMALL, model_type="nemotron_h", head_dim=16, intermediate_size=96,
                       layers_block_type=["linear_attention", "full_attention", "linear_attention",
                                          "full_attention", "moe"],
                       n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       moe_shared_expert_intermediate_size=48, mamba_num_heads=8, mamba_head_dim=8,
                       ssm_state_size=16, n_groups=2, conv_kernel=4, chunk_size=8, time_step_floor=0.01,
                       per_layer_config={4: {"num_experts_per_tok": 1}}),
}


def assert_trains_like_eager(model, ids, trainable) -> None:
    """Compiled loss and gradients equal eager's; the graph would share a variant without gradients."""
    loss, want = gradients(model, model, ids, trainable)
    backend = HetgraphBackend()
    got_loss, got = gradients(model, torch.compile(model, backend=backend), ids, trainable)
    torch.testing.assert_close(got_loss, loss, atol=1e-5, rtol=1e-5)
    assert_gradients_equal(got, want)
    (graph,) = backend.reports
    (grouping,) = [r for r in graph.records if r.name == "group_layer_variants"]
    assert grouping.refused == {None: GRAD_REFUSAL} and not grouping.changed
    # The same graph, for inference, shares a variant: the test covers the case that broke.
    work = fx.GraphModule(graph.gm, copy.deepcopy(graph.gm.graph))
    assert group_layer_variants(work, PassContext(spec=graph.spec)).changed, "config has no shared variant"


# The reported case runs by default; the other families (and LoRA) with `-m slow`: each compiles a
# forward and a backward (the default run's budget, see README).
@pytest.mark.parametrize("family", [f if f == "llama" else pytest.param(f, marks=pytest.mark.slow)
                                    for f in TRAIN_CONFIGS])
def test_compiled_gradients_equal_eager(family):
    torch.manual_seed(0)
    model = hetgraph.from_config(TRAIN_CONFIGS[family]).train()
    ids, _ = prompts(VOCAB, batch=2, length=10, pad=(0, 0))
    assert_trains_like_eager(model, ids, dict(model.named_parameters()))


@pytest.mark.slow
def test_lora_after_pruning_trains_like_eager():
    """LLM-Pruner's recovery step: LoRA on a pruned model, compiled with the backend."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = hetgraph.from_config(TRAIN_CONFIGS["llama"])
    targets = hetgraph.lora_targets(base)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    ids, _ = prompts(VOCAB, batch=2, length=10, pad=(0, 0))
    assert_trains_like_eager(model.base_model.model, ids, trainable)


def test_explain_with_gradients_says_why_layers_are_not_shared():
    torch.manual_seed(0)
    model = hetgraph.from_config(TRAIN_CONFIGS["llama"])
    ids, _ = prompts(VOCAB, batch=1, length=8, pad=(0,))
    text = str(hetgraph.explain(model, ids, grad=True))
    assert GRAD_REFUSAL in text and "shares hetgraph_variant_" not in text
