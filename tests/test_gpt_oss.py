"""GptOss only: its spec and structure (per-layer experts, heads with sinks, head_dim, windows and
removed blocks), its config rules (aliases, layer_types following per-layer windows, eager only).
The checks every family shares (reference, cache, compiled, export) are in tests/test_families.py."""

from __future__ import annotations

import functools

import pytest
import transformers

import hetgraph
from hetgraph import HeteroConfigError
from hetgraph.build import SkippedBlock, SkippedNorm
from hetgraph.contract import model_spec
from references.llama import per_layer_entries
from support.checks import read_config
from support.fixtures import model_fixtures
from support.models import hetero_config as _hetero_config

hetero_config = functools.partial(_hetero_config, "gpt_oss")

family, ckpt, model, ref = model_fixtures("gpt_oss")


# ---- spec and structure -------------------------------------------------------------------------


def test_spec_follows_config(model):
    spec = model_spec(model)
    assert [s.window for s in spec] == [None, ("sliding", 3), ("sliding", 5), ("full", None)]
    # The global layer_types follow the per-layer windows, so the stock layers and caches agree.
    assert model.config.layer_types == ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]
    assert [dict(s.extra).get("num_local_experts") for s in spec] == [3, 4, None, 6]
    assert [dict(s.extra).get("num_experts_per_tok") for s in spec] == [2, 1, None, 2]
    assert model.config._attn_implementation == "eager"  # GptOss has no SDPA path (sinks)


def test_structure(model, ckpt):
    config = read_config(ckpt)
    layers = model.model.layers
    assert type(model) is transformers.GptOssForCausalLM
    for i, (block, norm) in ((0, ("self_attn", "input_layernorm")), (2, ("mlp", "post_attention_layernorm"))):
        assert isinstance(getattr(layers[i], block), SkippedBlock) and isinstance(getattr(layers[i], norm), SkippedNorm)
        assert not [k for k in model.state_dict() if k.startswith(f"model.layers.{i}.{block}.")]
        assert not [k for k in model.state_dict() if k.startswith(f"model.layers.{i}.{norm}.")]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # Per layer, from the config alone: (experts, width) and (heads, kv heads, head_dim).
    for i, (experts, width) in {0: (3, 48), 1: (4, 32), 3: (6, 24)}.items():
        p = f"model.layers.{i}.mlp."
        assert shapes[p + "router.weight"] == (experts, 64)
        assert shapes[p + "experts.gate_up_proj"] == (experts, 64, 2 * width)
        assert shapes[p + "experts.down_proj"] == (experts, width, 64)
        assert shapes[p + "experts.down_proj_bias"] == (experts, 64)
    for i, (heads, kv, dim) in {1: (4, 1, 16), 2: (2, 2, 8), 3: (8, 2, 16)}.items():
        p = f"model.layers.{i}.self_attn."
        assert shapes[p + "q_proj.weight"] == (heads * dim, 64)
        assert shapes[p + "k_proj.weight"] == (kv * dim, 64)
        assert shapes[p + "sinks"] == (heads,)
    assert per_layer_entries(config)[0] == {"num_local_experts": 3, "intermediate_size": 48, "skip": ["attention"]}


# ---- config objects and rules -------------------------------------------------------------------


def test_config_object_with_alias(ref):
    """A transformers config object whose per-layer key is an alias is normalised on hetgraph's copy,
    not left ambiguous; the user's object is not touched."""
    d = hetero_config(layer_types=["sliding_attention"] * 3 + ["full_attention"])  # layer 1 has its own window
    per_layer = d.pop("per_layer_config")
    d.pop("model_type")
    config = transformers.GptOssConfig(**d)
    config.per_layer_config = per_layer
    model = hetgraph.from_config(config)
    assert model.model.layers[0].mlp.router.weight.shape == (3, 64)
    assert "num_experts" not in model.config._heterogeneity_spec.per_layer_overrides[0]
    assert config._heterogeneity_spec.per_layer_overrides[0]["num_experts"] == 3


def test_sdpa_is_refused():
    with pytest.raises(HeteroConfigError, match=r"attn_implementation='sdpa'.*gpt_oss.*allowed: \['eager'\]"):
        hetgraph.from_config(hetero_config(), attn_implementation="sdpa")


def test_layer_types_follow_per_layer_windows():
    d = hetero_config(per_layer_config={0: {"sliding_window": None}, 3: {"sliding_window": 2}})
    model = hetgraph.from_config(d)
    assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    assert [s.window for s in model_spec(model)] == [
        ("full", None), ("full", None), ("sliding", 5), ("sliding", 2)
    ]
