"""Build, load, save and generate, per family, against the plain-PyTorch reference in `references/llama.py`."""

from __future__ import annotations

import functools
import json
import textwrap

import pytest
import torch
import transformers

import hetgraph
from references import load_reference
from support.checks import assert_greedy_matches, assert_logits_match, read_config
from support.checks import prompts as family_prompts
from support.fixtures import model_fixtures
from support.fresh_python import run_python
from support.models import GREEDY, LLAMA_FAMILIES, VOCAB, hetero_config

prompts = functools.partial(family_prompts, VOCAB)

STOCK_CLASS = {
    "llama": transformers.LlamaForCausalLM,
    "mistral": transformers.MistralForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "qwen3": transformers.Qwen3ForCausalLM,
}
# A removed block takes its pre-norm with it.
BLOCK_MODULES = {"attention": ("self_attn", "input_layernorm"), "mlp": ("mlp", "post_attention_layernorm")}
NEW_TOKENS = 10


# ---- fixtures and helpers -----------------------------------------------------------------------


family, ckpt, model, ref = model_fixtures(LLAMA_FAMILIES)


def layer_settings(config: dict, i: int) -> dict:
    """Layer i's effective attributes and removed blocks, from a config.json dict (global fallback)."""
    over = {int(k): v for k, v in (config.get("per_layer_config") or {}).items()}.get(i, {})
    heads = config["num_attention_heads"]
    glob = {
        "intermediate_size": config["intermediate_size"],
        "num_attention_heads": heads,
        "num_key_value_heads": config.get("num_key_value_heads") or heads,
        # Pruning heads keeps the head size: the default is the parent's head_dim.
        "head_dim": config.get("head_dim") or config["hidden_size"] // heads,
        "sliding_window": config.get("sliding_window"),
        "attention_chunk_size": config.get("attention_chunk_size"),
    }
    settings = {k: over.get(k, v) for k, v in glob.items()}
    settings["skip"] = sorted(over.get("skip", []))
    return settings


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a model of `config` must hold, with its shape, derived from the config alone."""
    family, hidden, vocab = config["model_type"], config["hidden_size"], config["vocab_size"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(config["num_hidden_layers"]):
        s, p = layer_settings(config, i), f"model.layers.{i}."
        if "attention" not in s["skip"]:
            q, kv, d = s["num_attention_heads"] * s["head_dim"], s["num_key_value_heads"] * s["head_dim"], s["head_dim"]
            shapes[p + "input_layernorm.weight"] = (hidden,)
            for name, rows in (("q", q), ("k", kv), ("v", kv)):
                shapes[f"{p}self_attn.{name}_proj.weight"] = (rows, hidden)
                if family == "qwen2":
                    shapes[f"{p}self_attn.{name}_proj.bias"] = (rows,)
            shapes[p + "self_attn.o_proj.weight"] = (hidden, q)
            if family == "qwen3":
                shapes[p + "self_attn.q_norm.weight"] = (d,)
                shapes[p + "self_attn.k_norm.weight"] = (d,)
        if "mlp" not in s["skip"]:
            m = s["intermediate_size"]
            shapes[p + "post_attention_layernorm.weight"] = (hidden,)
            shapes[p + "mlp.gate_proj.weight"] = (m, hidden)
            shapes[p + "mlp.up_proj.weight"] = (m, hidden)
            shapes[p + "mlp.down_proj.weight"] = (hidden, m)
    return shapes


# ---- structure ----------------------------------------------------------------------------------


def test_structure(family, ckpt, model):
    config = hetero_config(family)
    built = hetgraph.from_config(config)
    for m in (built, model):
        assert type(m) is STOCK_CLASS[family]
        layers = m.model.layers
        for i, layer in enumerate(layers):
            skip = config["per_layer_config"].get(i, {}).get("skip", [])
            for name in [module for block in skip for module in BLOCK_MODULES[block]]:
                assert not list(getattr(layer, name).parameters()), f"layer {i}: removed {name} owns parameters"
                assert not list(getattr(layer, name).buffers()), f"layer {i}: removed {name} owns buffers"
                prefix = f"model.layers.{i}.{name}."
                assert not [k for k in m.state_dict() if k.startswith(prefix)], f"state dict has keys under {prefix}"

    want = expected_shapes(read_config(ckpt))
    for m in (built, model):
        got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        wrong = sorted((k, want[k], got[k]) for k in set(want) & set(got) if want[k] != got[k])
        assert not (missing or extra or wrong), f"missing {missing}\nextra {extra}\nwrong shape {wrong}"


def test_case_config_covers_every_feature(family):
    """The cases must really exercise what the other tests claim they do."""
    settings = [layer_settings(hetero_config(family), i) for i in range(hetero_config(family)["num_hidden_layers"])]
    assert "attention" in settings[0]["skip"] and "mlp" not in settings[0]["skip"]
    kept = [s for s in settings if "attention" not in s["skip"]]
    assert any(s["sliding_window"] for s in kept) and any(s["attention_chunk_size"] for s in kept)
    assert len({(s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"]) for s in kept}) > 2
    assert len({s["intermediate_size"] for s in settings if "mlp" not in s["skip"]}) > 2
    assert any(s["skip"] == ["attention", "mlp"] for s in settings)


# ---- forward and generate against the reference -------------------------------------------------


def test_logits_match_reference(model, ref):
    assert_logits_match(model, ref, *prompts(pad=(0, 0)))


def test_logits_match_reference_left_padded(model, ref):
    assert_logits_match(model, ref, *prompts(pad=(0, 5)))


@pytest.mark.parametrize("cache", ["default", "make_cache"])
def test_greedy_generate_matches_reference(model, ref, cache):
    ids, mask = prompts(pad=(0, 4))
    assert_greedy_matches(model, ref, ids, mask, NEW_TOKENS, cache)


@pytest.mark.parametrize("cache", ["default", "make_cache", "none"])
def test_layer0_without_attention_cached_decoding(family, model, ref, cache):
    """Layer 0 holds no attention (and no cache): the past length must not be read from it."""
    assert "attention" in hetero_config(family)["per_layer_config"][0]["skip"]
    ids, _ = prompts(batch=1, length=5, pad=(0,))
    new = 20  # past every window and chunk of the case
    kwargs = {"use_cache": cache != "none"}
    if cache == "make_cache":
        kwargs["cache"] = hetgraph.make_cache(model, batch_size=1, max_cache_len=ids.shape[1] + new)
    out = model.generate(ids, max_new_tokens=new, **GREEDY, **kwargs)
    want = ref.greedy(ids, new)
    assert torch.equal(out, want), f"\ngenerated {out.tolist()}\nreference {want.tolist()}"


# ---- save / load --------------------------------------------------------------------------------


def test_save_load_round_trip(family, ckpt, model, tmp_path):
    model.save_pretrained(tmp_path)
    original, saved = read_config(ckpt), read_config(tmp_path)
    assert saved["per_layer_config"] == original["per_layer_config"]
    # Every override of the case survives, `skip` included (values equal to a global may be folded in).
    for i, over in hetero_config(family)["per_layer_config"].items():
        s = layer_settings(saved, i)
        assert s["skip"] == sorted(over.get("skip", [])), f"layer {i}"
        assert {k: s[k] for k in over if k != "skip"} == {k: v for k, v in over.items() if k != "skip"}, f"layer {i}"
    reloaded = hetgraph.from_pretrained(str(tmp_path))
    assert type(reloaded) is STOCK_CLASS[family]
    ids, mask = prompts(pad=(0, 3))
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits, atol=0, rtol=0
        )


def test_sharded_checkpoint_loads_identically(model, ref, tmp_path):
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    sharded = hetgraph.from_pretrained(str(tmp_path))
    ids, mask = prompts(pad=(0, 3))
    with torch.no_grad():
        torch.testing.assert_close(
            sharded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits, atol=0, rtol=0
        )
    assert_logits_match(sharded, load_reference(str(tmp_path)), ids, mask)


def test_from_pretrained_bf16(family, ckpt, ref):
    m = hetgraph.from_pretrained(ckpt, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    ids, mask = prompts(pad=(0, 3))
    with torch.no_grad():
        logits = m(ids, attention_mask=mask).logits
    real = mask.bool()
    # bf16 keeps ~3 significant digits; the logits of these tiny models are O(0.5).
    torch.testing.assert_close(logits[real].float(), ref.logits(ids, mask)[real], atol=3e-2, rtol=0)
    cache = hetgraph.make_cache(m, batch_size=2, max_cache_len=ids.shape[1] + 3)
    assert {layer.keys.dtype for layer in cache.layers if getattr(layer, "keys", None) is not None} == {torch.bfloat16}
    out = m.generate(ids, attention_mask=mask, max_new_tokens=3, **GREEDY, cache=cache)
    assert out.shape == (2, ids.shape[1] + 3)


# ---- transformers is left alone -----------------------------------------------------------------

_SNAPSHOT = textwrap.dedent(
    """
    import importlib, sys, torch, transformers
    import transformers.cache_utils, transformers.masking_utils, transformers.modeling_utils
    assert "hetgraph" not in sys.modules

    FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
    modules = [transformers.masking_utils, transformers.cache_utils, transformers.modeling_utils]
    classes = [transformers.PreTrainedModel, transformers.GenerationMixin, torch.nn.Module]
    for fam, cap in FAMILIES.items():
        mod = importlib.import_module(f"transformers.models.{fam}.modeling_{fam}")
        modules.append(mod)
        classes += [getattr(mod, cap + suffix) for suffix in ("ForCausalLM", "Model", "DecoderLayer", "Attention")]
    registries = {
        "ALL_ATTENTION_FUNCTIONS": transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS,
        "ALL_MASK_ATTENTION_FUNCTIONS": transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS,
    }

    def snapshot():
        snap = {}
        for obj in modules + classes:
            snap[obj.__module__ + "." + obj.__qualname__ if isinstance(obj, type) else obj.__name__] = dict(vars(obj))
        for name, reg in registries.items():
            snap[name] = dict(reg.items())
        return snap

    def warm_up_transformers():
        # transformers caches some things on its classes on first use (e.g. `Module.smart_apply`);
        # doing the stock work first keeps those out of the comparison.
        from support.models import homogeneous_config
        for fam in FAMILIES:
            cfg = dict(homogeneous_config(fam))
            cfg.pop("model_type")
            model = getattr(transformers, FAMILIES[fam] + "ForCausalLM")(transformers.AutoConfig.for_model(fam, **cfg))
            ids = torch.randint(1, 100, (1, 4))
            model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)

    def diff(before, after):
        changes = []
        for owner, b in before.items():
            a = after[owner]
            for key in sorted(set(a) | set(b)):
                if key not in b:
                    changes.append(f"{owner}.{key}: added")
                elif key not in a:
                    changes.append(f"{owner}.{key}: removed")
                elif a[key] is not b[key]:
                    changes.append(f"{owner}.{key}: replaced")
        return changes
    """
)


@pytest.mark.slow  # tests/test_families.py checks the same for three families by default
def test_import_and_use_do_not_patch_transformers(tmp_path):
    out = tmp_path / "changes.json"
    run_python(
        _SNAPSHOT
        + textwrap.dedent(
            f"""
            import json
            warm_up_transformers()
            before = snapshot()
            import hetgraph
            from support.models import LLAMA_FAMILIES, hetero_config
            after_import = snapshot()
            errors = {{}}
            for fam in LLAMA_FAMILIES:
                try:
                    m = hetgraph.from_config(hetero_config(fam))
                    ids = torch.randint(1, 100, (2, 8))
                    m(ids)
                    m.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0,
                               cache=hetgraph.make_cache(m, batch_size=2, max_cache_len=11))
                except Exception as e:  # reported below, after the patching check it would otherwise hide
                    errors[fam] = repr(e)
            after_use = snapshot()
            json.dump({{"import": diff(before, after_import), "use": diff(before, after_use), "errors": errors}},
                      open({str(out)!r}, "w"))
            """
        )
    )
    result = json.loads(out.read_text())
    assert result["import"] == [] and result["use"] == [], result
    assert result["errors"] == {}, f"building or running a model failed: {result['errors']}"


_PLAIN_LLAMA = textwrap.dedent(
    """
    import sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    def plain_llama_logits(path):
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
        model = LlamaForCausalLM(config).eval()
        hooks = [(name, type(m).__name__) for name, m in model.named_modules()
                 if m._forward_pre_hooks or m._forward_hooks]
        assert not hooks, f"hooks on a plain model: {hooks}"
        assert "create_masks_for_generate" not in vars(model)
        ids = torch.arange(1, 25).reshape(2, 12)
        mask = torch.ones_like(ids); mask[1, :4] = 0
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
        torch.save(logits, path)
    """
)


@pytest.mark.slow  # a fresh interpreter compiling a stock model twice
def test_plain_transformers_model_unaffected_by_hetgraph(tmp_path):
    with_het, without = tmp_path / "with.pt", tmp_path / "without.pt"
    run_python(_PLAIN_LLAMA + f"assert 'hetgraph' not in sys.modules\nplain_llama_logits({str(without)!r})\n")
    run_python(
        _PLAIN_LLAMA
        + textwrap.dedent(
            f"""
            import hetgraph
            from support.models import hetero_config
            hetgraph.from_config(hetero_config("llama"))(torch.randint(1, 100, (1, 6)))
            plain_llama_logits({str(with_het)!r})
            """
        )
    )
    torch.testing.assert_close(torch.load(with_het), torch.load(without), atol=0, rtol=0)
