"""Faults injected into checkpoints, conversions and processes: each gives a clear error or a warning,
never a half-loaded model or a silently different one."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import hetgraph
from hetgraph import convert as convert_module
from hetgraph.backend import HetgraphBackend
from hetgraph.checkpoint import INDEX_FILE, SINGLE_FILE
from hetgraph.contract import SPEC_TAG, model_spec
from hetgraph.errors import CheckpointError
from hetgraph.inspection import inspect_config

CONFIG = dict(model_type="llama", hidden_size=64, num_hidden_layers=3, vocab_size=96, intermediate_size=64,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
              per_layer_config={0: {"skip": ["attention"]}, 1: {"intermediate_size": 32, "num_key_value_heads": 1}})
IDS = torch.arange(1, 9).view(1, 8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One checkpoint (single file) and one sharded copy, written once."""
    torch.manual_seed(0)
    model = hetgraph.from_config(CONFIG)
    single = tmp_path_factory.mktemp("single")
    model.save_pretrained(single)
    sharded = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(sharded, max_shard_size="20KB")
    with torch.no_grad():
        logits = model(IDS).logits
    return model, str(single), str(sharded), logits


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _stored(saved, tmp_path) -> tuple[str, str, dict]:
    """A copy of the single-file checkpoint: (directory, its safetensors file, its tensors)."""
    path = _copy(saved[1], tmp_path / "ckpt")
    file = os.path.join(path, SINGLE_FILE)
    return path, file, load_file(file)


def _fails(path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        hetgraph.from_pretrained(path)


# ---- truncated, lying and missing files --------------------------------------------------------------


def _regions(path: str) -> dict[str, int]:
    """Byte offsets inside a safetensors file: within the length prefix, the header, the data."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    size = os.path.getsize(path)
    return {"length prefix": 4, "header": 8 + header_len // 2, "data start": 8 + header_len + 1,
            "data middle": (8 + header_len + size) // 2, "last byte": size - 1}


@pytest.mark.parametrize("region", ["length prefix", "header", "data start", "data middle", "last byte"])
def test_truncated_safetensors_is_an_error_naming_the_file(saved, tmp_path, region):
    path = _copy(saved[1], tmp_path / "ckpt")
    file = os.path.join(path, SINGLE_FILE)
    cut = _regions(file)[region]
    with open(file, "r+b") as f:
        f.truncate(cut)
    _fails(path, rf"{SINGLE_FILE}: (not a readable safetensors file|truncated)")


@pytest.mark.parametrize("cut", [0, 10, -2])
def test_truncated_index_file_is_an_error_naming_it(saved, tmp_path, cut):
    path = _copy(saved[2], tmp_path / "ckpt")
    index = os.path.join(path, INDEX_FILE)
    data = open(index, "rb").read()
    open(index, "wb").write(data[: cut if cut >= 0 else len(data) + cut])
    _fails(path, rf"{INDEX_FILE}: not valid JSON")


def test_stale_index_beside_a_single_file_is_an_error(saved, tmp_path):
    path = _copy(saved[1], tmp_path / "ckpt")
    shutil.copy(os.path.join(saved[2], INDEX_FILE), path)
    _fails(path, rf"both {SINGLE_FILE} and {INDEX_FILE}")


def test_header_that_lies_about_a_shape_is_an_error_naming_the_tensor(saved, tmp_path):
    path, file, tensors = _stored(saved, tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name].reshape(-1, 16)  # same bytes, another shape
    save_file(tensors, file, metadata={"format": "pt"})
    _fails(path, rf"wrong shape: {name}: expected \[32, 64\], found \[128, 16\]")


def test_header_that_lies_about_a_dtype_is_an_error_naming_the_tensor(saved, tmp_path):
    """The header says F16 for data written as F32: the byte count no longer matches the shape."""
    path = _copy(saved[1], tmp_path / "ckpt")
    file = os.path.join(path, SINGLE_FILE)
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header, data = json.loads(f.read(n)), f.read()
    name = "model.norm.weight"
    header[name]["dtype"] = "F16"
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(file, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded + data)
    _fails(path, rf"{SINGLE_FILE}")


def test_missing_shard_is_an_error_naming_it(saved, tmp_path):
    path = _copy(saved[2], tmp_path / "ckpt")
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[1]
    os.remove(os.path.join(path, shard))
    _fails(path, rf"{shard}: shard listed in the index is missing")


def test_index_naming_a_file_that_does_not_exist(saved, tmp_path):
    path = _copy(saved[2], tmp_path / "ckpt")
    index = os.path.join(path, INDEX_FILE)
    data = json.load(open(index))
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = "model-99999-of-99999.safetensors"
    json.dump(data, open(index, "w"))
    _fails(path, r"model-99999-of-99999\.safetensors: shard listed in the index is missing")


def test_nan_and_inf_weights_load_as_stored_and_inspect_flags_them(saved, tmp_path):
    path, file, tensors = _stored(saved, tmp_path)
    name = "model.layers.2.self_attn.q_proj.weight"
    tensors[name][0, :3] = float("nan")
    tensors[name][1, 0] = float("inf")
    save_file(tensors, file, metadata={"format": "pt"})
    model = hetgraph.from_pretrained(path)
    stored = model.state_dict()[name]
    assert int(torch.isnan(stored).sum()) == 3 and int(torch.isinf(stored).sum()) == 1
    report = inspect_config(path)
    assert report.nonfinite == {name: (3, 1)}
    assert f"{name}: 3 NaN, 1 Inf" in report.to_text()
    assert inspect_config(saved[1]).nonfinite == {}
    assert inspect_config(path, check_weights=False).nonfinite is None


# ---- writing: convert interrupted, save into a used directory ---------------------------------------


def test_interrupted_convert_leaves_no_destination(saved, tmp_path, monkeypatch):
    real = convert_module._write_safetensors
    calls = []

    def fail_on_second(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt("interrupted")
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "_write_safetensors", fail_on_second)
    dst = tmp_path / "dst"
    with pytest.raises(KeyboardInterrupt):
        convert_module.convert(saved[2], str(dst), max_shard_size="20KB", progress=False)
    assert len(calls) == 2 and not dst.exists()
    assert os.listdir(tmp_path) == []  # the partial directory is gone too
    monkeypatch.undo()
    convert_module.convert(saved[2], str(dst), max_shard_size="20KB", progress=False)
    with torch.no_grad():
        assert torch.equal(hetgraph.from_pretrained(str(dst))(IDS).logits, saved[3])


def test_save_into_a_directory_holding_another_models_shards(saved, tmp_path):
    path = _copy(saved[2], tmp_path / "ckpt")  # another model's shards, sharded
    (tmp_path / "ckpt" / "adapter_model.safetensors").write_bytes(b"not the model's")  # e.g. a PEFT adapter
    torch.manual_seed(1)
    other = hetgraph.from_config(dict(CONFIG, per_layer_config={2: {"skip": ["mlp"]}}))
    other.save_pretrained(path)
    loaded = hetgraph.from_pretrained(path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, other(IDS).logits)
    assert not os.path.exists(os.path.join(path, INDEX_FILE))
    assert sorted(f for f in os.listdir(path) if f.endswith(".safetensors")) == ["adapter_model.safetensors",
                                                                                SINGLE_FILE]


# ---- processes and models changed after building -----------------------------------------------------


def test_two_models_compiled_in_one_process_do_not_share_state(saved):
    first = saved[0]
    torch.manual_seed(2)
    second = hetgraph.from_config(dict(CONFIG, per_layer_config={0: {"skip": ["mlp"]}, 2: {"sliding_window": 3}}))
    with torch.no_grad():
        alone = [first(IDS).logits, second(IDS).logits]
        a, b = HetgraphBackend(), HetgraphBackend()
        got = [torch.compile(first, backend=a)(IDS).logits, torch.compile(second, backend=b)(IDS).logits]
        again = torch.compile(first, backend=a)(IDS).logits
    for g, want in zip(got + [again], alone + alone[:1]):
        torch.testing.assert_close(g, want, atol=1e-5, rtol=0)
    assert a.reports[0].spec == model_spec(first)
    assert b.reports[0].spec == model_spec(second)


def test_load_state_dict_assign_keeps_the_model_specialized(saved):
    torch.manual_seed(3)
    model = hetgraph.from_config(CONFIG)
    state = {k: v.clone() for k, v in saved[0].state_dict().items()}
    model.load_state_dict(state, assign=True)
    assert all(getattr(p, SPEC_TAG, None) is not None for p in model.parameters())
    backend = HetgraphBackend()
    with torch.no_grad():
        got = torch.compile(model, backend=backend)(IDS).logits
    torch.testing.assert_close(got, saved[3], atol=1e-5, rtol=0)
    (report,) = backend.reports
    assert report.spec is not None and any(r.changed for r in report.records)


def test_to_dtype_keeps_the_model_specialized():
    torch.manual_seed(4)
    model = hetgraph.from_config(CONFIG).to(torch.float64)
    assert all(getattr(p, SPEC_TAG, None) is not None for p in model.parameters())
    backend = HetgraphBackend()
    with torch.no_grad():
        want = model(IDS).logits
        got = torch.compile(model, backend=backend)(IDS).logits
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    (report,) = backend.reports
    assert report.spec is not None and any(r.changed for r in report.records)
