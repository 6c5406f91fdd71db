"""`hetgraph.configs`: a config object is read as its config.json dict is, on hetgraph's own copy."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import hetgraph
from hetgraph.contract import model_spec
from support.models import GPT_OSS, LLAMA4_TEXT, hetero_config


def _config_object(config_dict: dict):
    """The stock config class built from the globals, then `per_layer_config` set, as a user writes it."""
    d = dict(config_dict)
    per_layer = d.pop("per_layer_config")
    config = transformers.CONFIG_MAPPING[d["model_type"]](**d)
    config.per_layer_config = per_layer
    return config


# A window (sliding / chunked) on layer 1, which the global `layer_types` calls full: GptOss types
# even layers sliding; Llama4 without a global chunk types every layer full. Mistral reads
# `sliding_window` per layer and has no `layer_types`: the control.
_LLAMA4_NO_GLOBAL_CHUNK = dict(LLAMA4_TEXT, attention_chunk_size=None)
_MISTRAL = hetero_config("mistral", per_layer_config={1: {"sliding_window": 3}, 2: {"intermediate_size": 64}})


@pytest.mark.parametrize(
    "config_dict, layer, window",
    [(GPT_OSS, 1, ("sliding", 3)), (_LLAMA4_NO_GLOBAL_CHUNK, 1, ("chunked", 3)), (_MISTRAL, 1, ("sliding", 3))],
    ids=["gpt_oss", "llama4_text", "mistral"],
)
def test_config_object_with_windows_on_full_layers_is_retyped_on_a_copy(config_dict, layer, window):
    config = _config_object(config_dict)
    before_types = copy.deepcopy(getattr(config, "layer_types", None))
    before_layers = copy.deepcopy(config._heterogeneity_spec.per_layer_overrides)
    torch.manual_seed(0)
    from_object = hetgraph.from_config(config)
    torch.manual_seed(0)
    from_dict = hetgraph.from_config(config_dict)

    assert model_spec(from_object) == model_spec(from_dict)
    assert model_spec(from_object)[layer].window == window
    if before_types is not None:  # retyped on the copy: the stock layer and cache read the type
        assert before_types[layer] == "full_attention" != from_object.config.layer_types[layer]
    # The user's object is never mutated, and the model holds a config of its own.
    assert getattr(config, "layer_types", None) == before_types
    assert config._heterogeneity_spec.per_layer_overrides == before_layers
    assert from_object.config is not config
    ids = torch.randint(0, config_dict["vocab_size"], (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(from_object(ids).logits, from_dict(ids).logits, atol=0, rtol=0)


def test_table_of_a_raw_object_still_refuses_an_ignored_window():
    # ModelSpec.from_config reads the object as it is: there the stock code would ignore the window.
    with pytest.raises(hetgraph.HeteroConfigError, match=r"layer_types\[1\]='full_attention'.*own copy"):
        hetgraph.ModelSpec.from_config(_config_object(GPT_OSS))
