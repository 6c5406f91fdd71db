"""Every bad input is a `HeteroConfigError` that says where (layer, attribute, tensor, file) and what."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

import hetgraph
from hetgraph import HeteroConfigError
from support.models import LLAMA_FAMILIES, hetero_config

SUPPORTED_ATTRIBUTES = (
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "sliding_window",
    "attention_chunk_size",
)


def with_layer(family: str, layer: int, **overrides) -> dict:
    """The case config of `family` with `overrides` added to layer `layer`'s entry."""
    config = hetero_config(family)
    config["per_layer_config"].setdefault(layer, {}).update(overrides)
    return config


def build_fails(config, match: str) -> HeteroConfigError:
    model = None
    with pytest.raises(HeteroConfigError, match=match) as info:
        model = hetgraph.from_config(config)
    assert model is None
    return info.value


# ---- invalid configs ----------------------------------------------------------------------------

# (layer, overrides, pattern): the pattern names the layer, the attribute and the value.
BAD_LAYERS = {
    "heads_not_divisible": (3, {"num_attention_heads": 3}, r"layer 3\b.*num_attention_heads=3.*num_key_value_heads=2"),
    "kv_heads_not_divisor": (5, {"num_key_value_heads": 3}, r"layer 5\b.*num_attention_heads=4.*num_key_value_heads=3"),
    "zero_intermediate": (3, {"intermediate_size": 0}, r"layer 3\b.*intermediate_size=0\b.*positive"),
    "negative_kv_heads": (1, {"num_key_value_heads": -1}, r"layer 1\b.*num_key_value_heads=-1\b.*positive"),
    "zero_heads": (5, {"num_attention_heads": 0}, r"layer 5\b.*num_attention_heads=0\b.*positive"),
    "negative_head_dim": (2, {"head_dim": -1}, r"layer 2\b.*head_dim=-1\b.*positive"),
    "zero_window": (5, {"sliding_window": 0}, r"layer 5\b.*sliding_window=0\b.*positive"),
    "negative_chunk": (2, {"attention_chunk_size": -1}, r"layer 2\b.*attention_chunk_size=-1\b.*positive"),
    "float_size": (3, {"intermediate_size": 64.0}, r"layer 3\b.*intermediate_size=64\.0\b.*integer"),
    "string_size": (3, {"num_attention_heads": "2"}, r"layer 3\b.*num_attention_heads='2'.*integer"),
    "bool_size": (0, {"intermediate_size": True}, r"layer 0\b.*intermediate_size=True\b.*integer"),
    "unknown_skip": (3, {"skip": ["attn"]}, r"layer 3\b.*skip.*'attn'.*allowed.*'attention'.*'mlp'"),
    "skip_not_a_list": (3, {"skip": "attention"}, r"layer 3\b.*skip='attention'.*allowed.*'attention'.*'mlp'"),
    "unknown_attribute": (2, {"rope_theta": 5.0}, r"layer 2\b.*rope_theta=5\.0.*allowed"),
    "per_layer_hidden_size": (1, {"hidden_size": 32}, r"layer 1\b.*hidden_size=32\b"),
    "per_layer_vocab_size": (1, {"vocab_size": 64}, r"layer 1\b.*vocab_size=64\b"),
    "window_and_chunk": (1, {"attention_chunk_size": 4}, r"layer 1\b.*sliding_window=3\b.*attention_chunk_size=4\b"),
}


@pytest.mark.parametrize("family", LLAMA_FAMILIES)
@pytest.mark.parametrize("case", list(BAD_LAYERS))
def test_bad_layer_attribute(family, case):
    layer, overrides, pattern = BAD_LAYERS[case]
    build_fails(with_layer(family, layer, **overrides), pattern)


def test_unknown_attribute_lists_supported():
    message = str(build_fails(with_layer("llama", 2, foo=1), r"layer 2\b.*foo=1.*allowed"))
    missing = [a for a in SUPPORTED_ATTRIBUTES + ("skip",) if a not in message]
    assert not missing, f"message does not list {missing}: {message}"


@pytest.mark.parametrize("index", [6, 99, -1])
def test_layer_index_out_of_range(index):
    config = hetero_config("llama")
    config["per_layer_config"][index] = {"intermediate_size": 32}
    build_fails(config, rf"per_layer_config.*(?<![\d-]){index}\b.*out of range.*0.*5")


def test_missing_model_type():
    config = hetero_config("llama")
    del config["model_type"]
    build_fails(config, r"model_type")


def test_unsupported_model_type():
    build_fails(hetero_config("gpt2"), r"model_type 'gpt2'.*supported.*llama.*mistral.*qwen2.*qwen3")


# A transformers config object is validated as well, where transformers itself accepts it.
@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({1: {"num_key_value_heads": 3}}, r"layer 1\b.*num_attention_heads=4.*num_key_value_heads=3"),
        ({2: {"intermediate_size": 0}}, r"layer 2\b.*intermediate_size=0\b"),
        ({2: {"skip": ["mlp", "norm"]}}, r"layer 2\b.*'norm'.*allowed.*'attention'.*'mlp'"),
    ],
)
def test_bad_config_object(overrides, pattern):
    config = LlamaConfig(
        hidden_size=64, num_hidden_layers=4, vocab_size=128, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=None, attention_chunk_size=None, per_layer_config=overrides,
    )  # fmt: skip
    build_fails(config, pattern)


# ---- bad checkpoints ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_ckpt(checkpoint):
    return checkpoint(hetero_config("llama"))


@pytest.fixture
def ckpt(good_ckpt, tmp_path):
    """A private copy of a good checkpoint, to damage."""
    path = tmp_path / "ckpt"
    shutil.copytree(good_ckpt, path)
    return path


def load_fails(path, match: str) -> HeteroConfigError:
    model = None
    with pytest.raises(HeteroConfigError, match=match) as info:
        model = hetgraph.from_pretrained(str(path))
    assert model is None
    return info.value


def test_checkpoint_tensor_problems_in_one_error(ckpt):
    file = ckpt / "model.safetensors"
    tensors = load_file(file)
    missing, unexpected, misshaped = (
        "model.layers.3.mlp.up_proj.weight",  # [48, 64]
        "model.layers.0.self_attn.q_proj.weight",  # layer 0 has no attention
        "model.layers.1.self_attn.k_proj.weight",  # 1 KV head x 16: [16, 64]
    )
    assert tuple(tensors[missing].shape) == (48, 64) and tuple(tensors[misshaped].shape) == (16, 64)
    assert unexpected not in tensors
    del tensors[missing]
    tensors[unexpected] = torch.zeros(64, 64)
    tensors[misshaped] = torch.zeros(32, 64)
    save_file(tensors, file, metadata={"format": "pt"})

    message = str(load_fails(ckpt, re.escape(missing)))
    lines = message.splitlines()

    def line_of(name):
        found = [line for line in lines if name in line]
        assert len(found) == 1, f"{name} should be on exactly one line of:\n{message}"
        return found[0]

    shape = r"[\[(]{}, {}[\])]".format
    assert re.search(r"missing", line_of(missing)) and re.search(shape(48, 64), line_of(missing)), message
    assert re.search(r"unexpected", line_of(unexpected)) and re.search(shape(64, 64), line_of(unexpected)), message
    wrong = line_of(misshaped)
    assert re.search(r"expected " + shape(16, 64), wrong) and re.search(r"found " + shape(32, 64), wrong), message


def _shard(path) -> str:
    with open(path / "model.safetensors.index.json") as f:
        return sorted(set(json.load(f)["weight_map"].values()))[1]


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_truncated_safetensors(ckpt, sharded, tmp_path):
    if sharded:
        hetgraph.from_pretrained(str(ckpt)).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
        ckpt = tmp_path / "sharded"
    name = _shard(ckpt) if sharded else "model.safetensors"
    data = (ckpt / name).read_bytes()
    (ckpt / name).write_bytes(data[:-16])
    load_fails(ckpt, re.escape(name))


@pytest.mark.parametrize("damage", ["garbage_file", "garbage_header"])
def test_corrupt_safetensors(ckpt, damage):
    file = ckpt / "model.safetensors"
    data = bytearray(file.read_bytes())
    if damage == "garbage_file":
        data = bytes(range(256)) * 8
    else:  # keep the 8-byte header length, scribble over the JSON header
        data[8:40] = b"\xff" * 32
    file.write_bytes(bytes(data))
    load_fails(ckpt, re.escape(str(file)))


def test_missing_config_json(ckpt):
    os.remove(ckpt / "config.json")
    load_fails(ckpt, r"config\.json")


def test_directory_without_safetensors(ckpt):
    # A pickle checkpoint must not be loaded instead.
    torch.save(load_file(ckpt / "model.safetensors"), ckpt / "pytorch_model.bin")
    os.remove(ckpt / "model.safetensors")
    load_fails(ckpt, r"safetensors")


def test_missing_shard(ckpt, tmp_path):
    hetgraph.from_pretrained(str(ckpt)).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    name = _shard(tmp_path / "sharded")
    os.remove(tmp_path / "sharded" / name)
    load_fails(tmp_path / "sharded", re.escape(name))
