"""Property-based tests: random heterogeneous configs of every family (tests/support/fuzz_configs.py).

Properties: eager == the family's independent reference (logits on a left-padded batch, greedy
decode with `make_cache`); save/load and `convert` round trips are exact; every invalid draw raises
`HeteroConfigError` naming the layer and the attribute; compiled == eager (logits, gradients,
greedy decode); exported == eager. Seeded (derandomized) and bounded: the default run draws a few
configs per family; the `slow` twins draw many more (`bash scripts/test.sh -m slow -k fuzz`).
Shrunk failing cases are kept as regular tests at the end of this file.
"""

from __future__ import annotations

import re
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hetgraph
from hetgraph import HeteroConfigError
from hetgraph.backend import HetgraphBackend
from hetgraph.convert import convert
from references import gpt_oss, llama, llama4, nemotron_h
from support.checks import ATOL, assert_gradients_equal, gradients, prompts
from support.fuzz_configs import FAMILIES, VOCAB, invalid_variations
from support.models import GREEDY

# Each fuzz family's independent reference (tests/references/).
REFERENCES = {"llama": llama, "gpt_oss": gpt_oss, "llama4": llama4, "nemotron_h": nemotron_h}


def fuzz(prop, strategy, examples: int) -> None:
    """Run `prop` on `examples` seeded draws of `strategy` (shrinking on failure)."""
    settings(max_examples=examples, derandomize=True, deadline=None, database=None, print_blob=True,
             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(given(strategy)(prop))()


_INPUTS = st.tuples(st.integers(4, 9), st.integers(0, 3))  # prompt length, left padding of row 1


def _inputs(length: int, pad: int, seed: int = 0):
    return prompts(VOCAB, batch=2, length=length, pad=(0, min(pad, length - 1)), seed=seed)


# ---- eager == reference; save/load and convert round trips -----------------------------------------


def check_eager(family: str, config: dict, inputs) -> None:
    ids, mask = _inputs(*inputs)
    torch.manual_seed(0)
    model = hetgraph.from_config(config)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        ref = REFERENCES[family].load_reference(tmp)
        loaded = hetgraph.from_pretrained(tmp)
        convert(tmp, f"{tmp}/converted", progress=False)
        converted = hetgraph.from_pretrained(f"{tmp}/converted")
    real = mask.bool()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(logits[real], ref.logits(ids, mask)[real].float(), atol=ATOL, rtol=0)
        for other in (loaded, converted):
            assert torch.equal(other(ids, attention_mask=mask).logits, logits)
    new = 4
    cache = hetgraph.make_cache(model, batch_size=2, max_cache_len=ids.shape[1] + new)
    out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=new, **GREEDY)
    assert torch.equal(out, ref.greedy(ids, new, mask))


def _eager_property(family):
    return lambda args: check_eager(family, *args)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fuzz_eager_matches_reference_and_round_trips(family):
    fuzz(_eager_property(family), st.tuples(FAMILIES[family], _INPUTS), examples=3)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fuzz_eager_matches_reference_and_round_trips_long(family):
    fuzz(_eager_property(family), st.tuples(FAMILIES[family], _INPUTS), examples=60)


# ---- invalid draws ---------------------------------------------------------------------------------


def check_invalid(args) -> None:
    config, layer, attribute = args
    with pytest.raises(HeteroConfigError) as err:
        hetgraph.from_config(config)
    message = str(err.value)
    assert re.search(rf"\blayer {layer}\b", message), message
    assert attribute in message, message


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fuzz_invalid_draws_name_layer_and_attribute(family):
    fuzz(check_invalid, invalid_variations(family), examples=15)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fuzz_invalid_draws_name_layer_and_attribute_long(family):
    fuzz(check_invalid, invalid_variations(family), examples=150)


# ---- compiled == eager: logits, gradients, greedy decode; exported == eager --------------------------


def check_compiled(family: str, config: dict, inputs, decode: bool) -> None:
    ids, mask = _inputs(*inputs)
    torch.manual_seed(0)
    model = hetgraph.from_config(config)
    torch._dynamo.reset()
    backend = HetgraphBackend(options={"strict": True})
    compiled = torch.compile(model, backend=backend)
    real = mask.bool()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        got = compiled(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)
    model.train()
    params = dict(model.named_parameters())
    _, want_grads = gradients(model, model, ids, params)
    _, got_grads = gradients(model, compiled, ids, params)
    assert_gradients_equal(got_grads, want_grads)
    model.eval()
    if decode:
        new = 4
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=new, **GREEDY)
        model.forward = torch.compile(model.forward, backend=backend, fullgraph=True)
        cache = hetgraph.make_cache(model, batch_size=2, max_cache_len=ids.shape[1] + new)
        out = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=new, **GREEDY)
        assert torch.equal(out, expected)


def _compiled_property(family, decode):
    return lambda args: check_compiled(family, *args, decode=decode)


def test_fuzz_compiled_matches_eager():
    """The default run: one Llama-family draw, forward and backward (each compile costs ~10-30 s here)."""
    fuzz(_compiled_property("llama", decode=False), st.tuples(FAMILIES["llama"], _INPUTS), examples=1)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fuzz_compiled_matches_eager_long(family):
    fuzz(_compiled_property(family, decode=True), st.tuples(FAMILIES[family], _INPUTS), examples=4)


def check_exported(family: str, config: dict) -> None:
    torch.manual_seed(0)
    model = hetgraph.from_config(config)
    ids, _ = _inputs(6, 0, seed=2)
    new = 4
    with tempfile.TemporaryDirectory() as tmp:
        exported = hetgraph.export(model, tmp, input_ids=ids, decode=True, max_cache_len=ids.shape[1] + new)
        got = hetgraph.generate_with_exported(exported.prefill, exported.decode, ids, new)
    assert torch.equal(got, model.generate(ids, max_new_tokens=new, **GREEDY))


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fuzz_exported_matches_eager_long(family):
    fuzz(lambda config: check_exported(family, config), FAMILIES[family], examples=3)


# ---- shrunk failing cases, kept as regular tests ----------------------------------------------------


def test_a_model_without_any_attention_is_refused():
    """Drawn by the fuzzer: every layer's attention removed made `generate` fail inside transformers."""
    config = dict(model_type="llama", hidden_size=64, num_hidden_layers=2, vocab_size=VOCAB, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2,
                  per_layer_config={0: {"skip": ["attention"]}, 1: {"linear": ["attention"]}})
    with pytest.raises(HeteroConfigError, match=r"no layer of the 2 has attention.*layers \[0, 1\]"):
        hetgraph.from_config(config)


def test_convert_applies_nemotron_h_stored_layout(tmp_path):
    """Drawn by the fuzzer: `convert` read NemotronH's `backbone.` names as unexpected tensors."""
    config = dict(model_type="nemotron_h", hidden_size=64, vocab_size=VOCAB, layers_block_type=["moe", "full_attention"],
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=3, num_experts_per_tok=2,
                  moe_intermediate_size=32, moe_shared_expert_intermediate_size=48, mamba_num_heads=8, mamba_head_dim=8,
                  ssm_state_size=16, n_groups=2, conv_kernel=4, per_layer_config={0: {"n_routed_experts": 4}})
    torch.manual_seed(0)
    model = hetgraph.from_config(config)
    model.save_pretrained(tmp_path / "src")
    convert(str(tmp_path / "src"), str(tmp_path / "dst"), progress=False)
    ids, mask = _inputs(6, 2)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        assert torch.equal(hetgraph.from_pretrained(str(tmp_path / "dst"))(ids, attention_mask=mask).logits, want)


@pytest.mark.parametrize("as_object", [False, True], ids=["dict", "config_object"])
def test_fewer_heads_keep_the_global_head_dim_when_the_config_has_none(as_object):
    """Drawn by the fuzzer: a Qwen2 layer with 2 of 4 heads derived head_dim 64 // 2 = 32 (q_proj 64
    wide) on its own view, so its width depended on whether any layer named a head_dim."""
    config = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, vocab_size=VOCAB, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  per_layer_config={1: {"num_attention_heads": 2}})
    if as_object:
        from transformers import Qwen2Config

        config = Qwen2Config(**config)
        assert getattr(config, "head_dim", None) is None
    model = hetgraph.from_config(config)
    assert [tuple(layer.self_attn.q_proj.weight.shape) for layer in model.model.layers] == [(64, 64), (32, 64)]
    assert model.config.head_dim == 16
    if not as_object:
        check_eager("llama", config, (6, 2))
