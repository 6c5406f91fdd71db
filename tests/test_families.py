"""One suite for GptOss, Llama4 text and NemotronH, parametrized over a per-family case table: each
family's tiny heterogeneous model (tests/support/models.py) against its own plain-PyTorch reference
(tests/references/): logits, greedy generate (cached and not), save/load, invalid configs, compiled
decode and forward, exported decode. And what holds for every family at once: building and running
them leaves transformers' classes and modules exactly as they were; `inspect` reports them.

What only one family has (its structure, its own config rules) lives in tests/test_<family>.py.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import hetgraph
from hetgraph import HeteroConfigError
from hetgraph.contract import model_spec
from hetgraph.export import generate_with_exported, read_metadata
from hetgraph.inspection import inspect_config
from support.checks import (
    assert_compiled_decode,
    assert_compiled_logits,
    assert_exported_decode,
    assert_greedy_matches,
    assert_logits_match,
    assert_save_load_round_trip,
    assert_stateless_layers_hold_dummies,
    assert_uncached_greedy_matches,
    prompts,
)
from support.fixtures import model_fixtures
from support.fresh_python import run_python
from support.models import VOCAB, hetero_config

FAMILIES = ("gpt_oss", "llama4_text", "nemotron_h")


def _nemotron_h_export_specializes_prompt_length(exported) -> None:
    # The stock chunked scan makes export specialize the prompt length (6, one chunk): the metadata
    # says so, and a prompt of another length is refused before it reaches the program.
    meta = read_metadata(exported.prefill)
    assert (meta["min_prompt_len"], meta["max_prompt_len"]) == (6, 6)
    with pytest.raises(ValueError, match=r"serve prompts of 6 tokens, input_ids has shape \(2, 5\)"):
        generate_with_exported(exported.prefill, exported.decode, torch.ones(2, 5, dtype=torch.long), 3)


@dataclass(frozen=True)
class Case:
    """What the shared suite checks differently per family."""

    # Per-layer entries a save writes (without hetgraph's note for stock readers), layer -> entry.
    saved_entries: dict[int, dict]
    # Invalid per-layer overrides: name -> (layer, override, pattern the HeteroConfigError matches).
    bad: dict[str, tuple[int, dict, str]]
    # Layers whose removed blocks `eliminate_skipped_blocks` rewrote in the compiled prefill graph.
    eliminated: frozenset[int] | None = None
    # The experts run the default implementation (grouped_mm; its fp32 CPU fallback op) in the decode graph.
    grouped_mm_experts: bool = False
    # The compiled forward holds no `zeros_like` (removed blocks left nothing behind).
    compiled_without_zeros: bool = False
    # More checks of the exported programs.
    check_export: Callable | None = None


CASES = {
    "gpt_oss": Case(
        saved_entries={0: {"num_local_experts": 3, "intermediate_size": 48, "skip": ["attention"]}},
        bad={
            "per_layer_hidden_size": (1, {"hidden_size": 32}, r"layer 1\b.*hidden_size=32\b"),
            "per_layer_vocab_size": (1, {"vocab_size": 64}, r"layer 1\b.*vocab_size=64\b"),
            "per_layer_layer_types": (1, {"layer_types": ["full_attention"] * 4}, r"layer 1\b.*layer_types.*cannot vary"),
            "unknown_skip": (1, {"skip": ["mixer"]}, r"layer 1\b.*unknown block 'mixer'.*'attention', 'mlp'"),
            "linear_not_supported": (1, {"linear": ["mlp"]}, r"layer 1\b.*linear.*unknown block 'mlp'; allowed: \[\]"),
            "chunk_not_supported": (1, {"attention_chunk_size": 4}, r"layer 1\b.*attention_chunk_size.*not a supported"),
            "top_k_above_experts": (3, {"num_experts_per_tok": 7},
                                    r"layer 3\b.*num_experts_per_tok=7.*num_local_experts=6"),
            "zero_experts": (1, {"num_experts": 0}, r"layer 1\b.*num_local_experts=0\b.*positive"),
            "zero_window": (1, {"sliding_window": 0}, r"layer 1\b.*sliding_window=0\b.*positive"),
        },
        eliminated=frozenset({0, 2}),
        grouped_mm_experts=True,
        compiled_without_zeros=True,
    ),
    "llama4_text": Case(
        saved_entries={0: {"intermediate_size_mlp": 48, "skip": ["attention"]}},
        bad={
            "per_layer_hidden_size": (1, {"hidden_size": 32}, r"layer 1\b.*hidden_size=32\b"),
            "per_layer_vocab_size": (1, {"vocab_size": 64}, r"layer 1\b.*vocab_size=64\b"),
            "per_layer_moe_layers": (1, {"moe_layers": [1]}, r"layer 1\b.*moe_layers.*cannot vary"),
            "per_layer_no_rope_layers": (1, {"no_rope_layers": [1, 1, 1, 1]}, r"layer 1\b.*no_rope_layers.*cannot vary"),
            "chunk_on_nope_layer": (3, {"attention_chunk_size": 2}, r"layer 3\b.*attention_chunk_size=2.*NoPE"),
            "sliding_not_supported": (1, {"sliding_window": 4}, r"layer 1\b.*sliding_window.*not a supported"),
            "top_k_above_experts": (1, {"num_experts_per_tok": 4},
                                    r"layer 1\b.*num_experts_per_tok=4.*num_local_experts=3"),
            "unknown_skip": (1, {"skip": ["feed_forward"]},
                             r"layer 1\b.*unknown block 'feed_forward'.*'attention', 'mlp'"),
        },
        eliminated=frozenset({0, 2}),
        compiled_without_zeros=True,
    ),
    "nemotron_h": Case(
        saved_entries={0: {"skip": ["attention"]}, 4: {"intermediate_size": 48}},
        bad={
            "mismatched_skip_name": (1, {"skip": ["attention"]},
                                     r"layer 1: skip 'attention' does not match.*mamba.*'mixer', 'mamba'"),
            "mlp_skip_on_attention": (3, {"skip": ["mlp"]}, r"layer 3: skip 'mlp' does not match.*attention"),
            "unknown_skip": (3, {"skip": ["self_attn"]}, r"layer 3\b.*unknown block 'self_attn'.*'mixer'"),
            "per_layer_block_types": (1, {"layer_types": ["mlp"] * 6}, r"layer 1\b.*layers_block_type.*cannot vary"),
            "per_layer_hidden_size": (1, {"hidden_size": 32}, r"layer 1\b.*hidden_size=32\b"),
            "per_layer_vocab_size": (1, {"vocab_size": 64}, r"layer 1\b.*vocab_size=64\b"),
            "mamba_heads_not_grouped": (5, {"mamba_num_heads": 7}, r"layer 5\b.*mamba_num_heads=7.*n_groups=2"),
            "top_k_above_experts": (2, {"num_experts_per_tok": 7},
                                    r"layer 2\b.*num_experts_per_tok=7.*n_routed_experts=6"),
            "zero_state": (1, {"ssm_state_size": 0}, r"layer 1\b.*ssm_state_size=0\b.*positive"),
        },
        grouped_mm_experts=True,
        check_export=_nemotron_h_export_specializes_prompt_length,
    ),
}

family, ckpt, model, ref = model_fixtures(FAMILIES)


# ---- forward and generate against the reference -------------------------------------------------


@pytest.mark.parametrize("pad", [(0, 0), (0, 5)])
def test_logits_match_reference(model, ref, pad):
    assert_logits_match(model, ref, *prompts(VOCAB, pad=pad))


@pytest.mark.parametrize("cache", ["default", "make_cache"])
def test_greedy_generate_matches_reference(model, ref, cache):
    ids, mask = prompts(VOCAB, pad=(0, 4))
    out = assert_greedy_matches(model, ref, ids, mask, new=16, cache=cache)  # past every window and chunk
    assert_stateless_layers_hold_dummies(model, out.past_key_values)


def test_layer0_without_attention_decodes_without_cache(model, ref):
    assert_uncached_greedy_matches(model, ref, VOCAB)


def test_save_load_round_trip(family, model, ckpt, tmp_path):
    assert_save_load_round_trip(model, ckpt, tmp_path, VOCAB, CASES[family].saved_entries)


# ---- invalid configs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_type, case", [pytest.param(f, name, id=f"{f}-{name}") for f in FAMILIES for name in CASES[f].bad]
)
def test_bad_config(model_type, case):
    layer, overrides, pattern = CASES[model_type].bad[case]
    d = hetero_config(model_type)
    d["per_layer_config"][layer] = {**d["per_layer_config"].get(layer, {}), **overrides}
    with pytest.raises(HeteroConfigError, match=pattern):
        hetgraph.from_config(d)


# ---- compiled -----------------------------------------------------------------------------------


# One family in the default run; the others compile the same path (about 45 s each on 2 cores).
@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=[] if f == "nemotron_h" else pytest.mark.slow) for f in FAMILIES], indirect=True
)
def test_compiled_greedy_decode_two_graphs_no_recompile(family, ckpt, ref):
    case = CASES[family]
    backend = assert_compiled_decode(ckpt, ref, VOCAB)
    if case.eliminated is not None:
        eliminate = next(r for r in backend.reports[0].records if r.name == "eliminate_skipped_blocks")
        assert eliminate.changed and set(eliminate.report) == case.eliminated  # the removed blocks left no ops
    if case.grouped_mm_experts:
        graphs = [g for g in backend.reports[1].gm.modules() if isinstance(g, torch.fx.GraphModule)]
        assert any("grouped_mm" in str(n.target) for g in graphs for n in g.graph.nodes)


@pytest.mark.slow
def test_compiled_logits_equal_reference(family, ckpt, ref):
    report = assert_compiled_logits(ckpt, ref, VOCAB)
    if CASES[family].compiled_without_zeros:
        assert not [n for n in report.gm.graph.nodes if n.target is torch.zeros_like]


# ---- export -------------------------------------------------------------------------------------


# Export is checked on every family in the slow run; by default on NemotronH, whose mamba states
# are the state the Llama families' tests (tests/test_export.py) do not cover.
@pytest.mark.parametrize(
    "family",
    [pytest.param("gpt_oss", marks=pytest.mark.slow), pytest.param("llama4_text", marks=pytest.mark.slow), "nemotron_h"],
    scope="module",
)
def test_exported_decode_matches_reference(family, model, ref, tmp_path):
    exported = assert_exported_decode(model, ref, VOCAB, tmp_path)
    if CASES[family].check_export is not None:
        CASES[family].check_export(exported)


# ---- every family at once -----------------------------------------------------------------------

_CHECK = textwrap.dedent(
    """
    import importlib, json, sys, torch, transformers
    import transformers.cache_utils, transformers.masking_utils, transformers.modeling_utils
    assert "hetgraph" not in sys.modules
    from support.models import hetero_config

    def gpt_oss(): return hetero_config("gpt_oss")
    def llama4(): return hetero_config("llama4_text")
    def nemotron_h(): return hetero_config("nemotron_h")

    MODULES = {"gpt_oss": "GptOss", "llama4": "Llama4", "nemotron_h": "NemotronH"}
    owners = [transformers.masking_utils, transformers.cache_utils, transformers.modeling_utils,
              transformers.PreTrainedModel, transformers.GenerationMixin, torch.nn.Module]
    for name, cap in MODULES.items():
        mod = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        owners.append(mod)
        owners += [v for k, v in vars(mod).items() if isinstance(v, type) and k.startswith(cap)]

    def snapshot():
        return {getattr(o, "__qualname__", o.__name__) + "@" + o.__module__ if isinstance(o, type) else o.__name__:
                dict(vars(o)) for o in owners}

    def diff(before, after):
        # `__slotnames__` is the stdlib's cache of a class's slots, written by the first `copy.copy` of an instance.
        return [f"{owner}.{key}" for owner, b in before.items() for key in set(b) | set(after[owner])
                if b.get(key, None) is not after[owner].get(key, None) and key != "__slotnames__"]

    def use(config):
        m = hetgraph.from_config(config)
        ids = torch.randint(1, 100, (2, 6))
        m(ids)
        m.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0,
                   cache=hetgraph.make_cache(m, batch_size=2, max_cache_len=9))

    # transformers caches a few things on first use (e.g. `smart_apply`): do the stock work first.
    for name, cap in MODULES.items():
        cfg = {"gpt_oss": gpt_oss, "llama4": llama4, "nemotron_h": nemotron_h}[name]()
        cfg.pop("per_layer_config")
        model_type = cfg.pop("model_type")
        stock = getattr(transformers, cap + "ForCausalLM")(transformers.AutoConfig.for_model(model_type, **cfg))
        stock.generate(torch.randint(1, 100, (1, 4)), max_new_tokens=2, do_sample=False, pad_token_id=0)
    before = snapshot()
    import hetgraph
    errors = {}
    for name, config in (("gpt_oss", gpt_oss()), ("llama4", llama4()), ("nemotron_h", nemotron_h())):
        try:
            use(config)
        except Exception as e:  # reported, after the patching check it would otherwise hide
            errors[name] = repr(e)
    json.dump({"changes": diff(before, snapshot()), "errors": errors}, open(OUT, "w"))
    """
)


def test_building_and_running_do_not_patch_transformers(tmp_path):
    out = tmp_path / "result.json"
    run_python(f"OUT = {str(out)!r}\n" + _CHECK)
    result = json.loads(out.read_text())
    assert result == {"changes": [], "errors": {}}, result


@pytest.mark.parametrize("model_type", FAMILIES)
def test_inspect_reports_each_layer(model_type):
    """Parameter counts come from the LayerSpec table and a skeleton on the meta device: no storage."""
    d = hetero_config(model_type)
    report = inspect_config(d)
    model = hetgraph.from_config(d)
    layers = model.model.layers
    assert len(report.rows) == len(layers)
    for row, layer in zip(report.rows, layers):
        assert row.parameters == sum(p.numel() for p in layer.parameters()), row.spec
    embeddings = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model.layers."))
    assert report.totals.parameters == sum(p.numel() for p in model.parameters())
    assert report.other_parameters == embeddings
    assert report.totals.kv_bytes_per_token == sum(s.kv_bytes_per_token(4) for s in model_spec(model))
    assert report.parent.parameters > report.totals.parameters
    assert "layer" in report.to_text()
