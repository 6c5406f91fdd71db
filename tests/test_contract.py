"""`hetgraph.contract`: how a model carries its LayerSpec table into the backend, and what happens
when that table is lost on the way."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from torch import nn

import hetgraph
from hetgraph.backend import HetgraphBackend
from hetgraph.contract import LAYER_TAG, SPEC_TAG, attach, model_spec
from support.models import VOCAB, hetero_config


def _replace_every_parameter(model: nn.Module) -> None:
    """What a module swap or a tensor-subclass conversion does: new Parameter objects, no tags."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad))


def _compile_once(model) -> HetgraphBackend:
    backend = HetgraphBackend()
    with torch.no_grad():
        torch.compile(model, backend=backend)(torch.randint(0, VOCAB, (1, 7)))
    return backend


@pytest.mark.slow  # two compiles (the table lost, then restored); the default run's budget
def test_lost_table_warns_and_attach_restores_it(caplog):
    model = hetgraph.from_config(hetero_config("llama"))
    _replace_every_parameter(model)
    assert not any(hasattr(p, SPEC_TAG) for p in model.parameters())
    with caplog.at_level(logging.WARNING, logger="hetgraph.contract"):
        backend = _compile_once(model)
    assert backend.reports[0].spec is None
    assert "no longer carry its LayerSpec table" in caplog.text and "hetgraph.contract.attach" in caplog.text

    caplog.clear()
    torch._dynamo.reset()
    attach(model)  # re-tags from the model's own table
    layers = model.model.layers
    assert all(getattr(p, LAYER_TAG) == i for i, layer in enumerate(layers) for p in layer.parameters())
    with caplog.at_level(logging.WARNING, logger="hetgraph.contract"):
        backend = _compile_once(model)
    assert backend.reports[0].spec == model_spec(model)
    assert any(r.changed for r in backend.reports[0].records)
    assert "LayerSpec table" not in caplog.text


def test_a_model_hetgraph_did_not_build_compiles_without_the_warning(caplog):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="hetgraph.contract"):
        backend = _compile_once(transformers.LlamaForCausalLM(config).eval())
    assert backend.reports[0].spec is None and "LayerSpec table" not in caplog.text
