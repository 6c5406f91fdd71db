"""What hetgraph writes, read by stock transformers: exact, or refused with an error; never misread."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.heterogeneity import AmbiguousGlobalPerLayerAttributeError

import hetgraph
from hetgraph.stock_guard import GUARD, SWITCH
from support.checks import read_config

_BASE = dict(model_type="llama", hidden_size=64, num_hidden_layers=4, vocab_size=128, intermediate_size=128,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
IDS = torch.arange(1, 11).view(1, 10)

# name -> (per_layer_config, the error stock raises)
REFUSED = {
    "skip only (LLM-Drop)": ({1: {"skip": ["attention"]}, 2: {"skip": ["mlp"]}}, (ValueError, rf"\['{GUARD}'\]")),
    "linear block": ({1: {"linear": ["attention"]}}, (ValueError, rf"\['{GUARD}'\]")),
    "per-layer window": ({2: {"sliding_window": 4}}, (ValueError, rf"\['{GUARD}'\]")),
    "width and KV heads": ({1: {"intermediate_size": 64, "num_key_value_heads": 1}},
                           (AmbiguousGlobalPerLayerAttributeError, "per-layer attribute")),
    "query heads": ({2: {"num_attention_heads": 2}}, (AmbiguousGlobalPerLayerAttributeError, "num_attention_heads")),
    "one layer, skip": ({0: {"skip": ["mlp"]}}, (ValueError, "per_layer_config")),
}


def _saved(tmp_path, per_layer, **overrides):
    torch.manual_seed(0)
    config = dict(_BASE, per_layer_config=per_layer, **overrides)
    model = hetgraph.from_config(config)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("case", list(REFUSED))
def test_stock_transformers_refuses_what_it_would_misread(case, tmp_path):
    per_layer, (error, message) = REFUSED[case]
    model = _saved(tmp_path, per_layer, **({"num_hidden_layers": 1} if case.startswith("one layer") else {}))
    saved = read_config(tmp_path)
    assert SWITCH not in saved  # the ambiguity guard is never switched off in a file
    # The guard stops the config itself; per-layer widths parse, and stop at model construction.
    loads = (AutoConfig.from_pretrained, AutoModelForCausalLM.from_pretrained) if error is ValueError else (
        AutoModelForCausalLM.from_pretrained,)
    for load in loads:
        with pytest.raises(error, match=message):
            load(str(tmp_path))
    # hetgraph itself reads it exactly, and writes it back the same.
    loaded = hetgraph.from_pretrained(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, atol=0, rtol=0)
    loaded.save_pretrained(tmp_path / "again")
    assert read_config(tmp_path / "again")["per_layer_config"] == saved["per_layer_config"]


def test_stock_transformers_loads_a_homogeneous_hetgraph_checkpoint_exactly(tmp_path):
    model = _saved(tmp_path, None)
    assert GUARD not in str(read_config(tmp_path))
    stock = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(stock(IDS).logits, model(IDS).logits, atol=1e-6, rtol=0)


def test_guard_names_what_stock_would_ignore(tmp_path):
    _saved(tmp_path, {1: {"skip": ["attention"]}, 3: {"sliding_window": 4}})
    entries = read_config(tmp_path)["per_layer_config"]
    assert [k for k, v in entries.items() if GUARD in v] == ["1"]
    assert "removed blocks" in entries["1"][GUARD] and "sliding windows" in entries["1"][GUARD]
    assert "hetgraph.from_pretrained" in entries["1"][GUARD]


def test_converted_checkpoint_is_guarded_too(tmp_path):
    from hetgraph.convert import convert

    _saved(tmp_path / "src", {1: {"skip": ["attention"]}})
    convert(str(tmp_path / "src"), str(tmp_path / "dst"), progress=False)
    assert GUARD in read_config(tmp_path / "dst")["per_layer_config"]["1"]
    with pytest.raises(ValueError, match=GUARD):
        AutoConfig.from_pretrained(str(tmp_path / "dst"))
