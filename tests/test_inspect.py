"""`hetgraph.inspection` and `python -m hetgraph inspect`, checked against real models built from the same config.

The parameter counts are arithmetic on the config; the reference is the numel of the model
`hetgraph.from_config` builds (and of a stock transformers model for the homogeneous parent).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers

import hetgraph
from hetgraph.cli import main
from hetgraph.inspection import inspect_config
from support.models import LLAMA_FAMILIES, hetero_config, homogeneous_config

# Variants beyond the plain hetero config: biases, tied embeddings, "linear" blocks.
_EXTRA = {
    "plain": {},
    "tied": {"tie_word_embeddings": True},
    "bias": {"attention_bias": True, "mlp_bias": True},
}


def _with_linear_blocks(d: dict) -> dict:
    d["per_layer_config"][3]["linear"] = ["attention"]
    d["per_layer_config"][4] = {"linear": ["mlp"], "skip": ["attention"]}
    d["per_layer_config"][5] = {"linear": ["attention", "mlp"]}
    return d


def _configs() -> list:
    return list(_iter_configs())


def _iter_configs():
    for family in LLAMA_FAMILIES:
        for name, extra in _EXTRA.items():
            yield pytest.param(hetero_config(family, **extra), id=f"{family}-{name}")
        yield pytest.param(_with_linear_blocks(hetero_config(family)), id=f"{family}-linear")


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _stock_config(d: dict) -> transformers.PreTrainedConfig:
    """The family's own config class on the global values: its defaults (Qwen3's head_dim=128) apply."""
    d = {k: v for k, v in d.items() if k != "per_layer_config"}
    return transformers.AutoConfig.for_model(d.pop("model_type"), **d)


def _expected_kv_bytes(d: dict, dtype_bytes: int) -> list[int]:
    """Per layer, from the config dict and the stock defaults: 2 * kv_heads * head_dim * bytes, 0 without attention."""
    stock = _stock_config(d)
    # Pruning heads keeps their size: a layer's default head_dim is the global one.
    global_head_dim = getattr(stock, "head_dim", None) or stock.hidden_size // stock.num_attention_heads
    out = []
    for i in range(d["num_hidden_layers"]):
        layer = d.get("per_layer_config", {}).get(i, {})
        if "attention" in layer.get("skip", []) + layer.get("linear", []):
            out.append(0)
            continue
        kv = layer.get("num_key_value_heads") or stock.num_key_value_heads
        out.append(2 * kv * (layer.get("head_dim") or global_head_dim) * dtype_bytes)
    return out


@pytest.mark.parametrize("config", _configs())
def test_parameters_equal_built_model(config):
    report = inspect_config(config)
    model = hetgraph.from_config(config)
    layers = model.model.layers
    assert [r.spec.index for r in report.rows] == list(range(len(layers)))
    for row, layer in zip(report.rows, layers):
        assert row.attention_parameters == _numel(layer.self_attn) + _numel(layer.input_layernorm), row.spec
        assert row.mlp_parameters == _numel(layer.mlp) + _numel(layer.post_attention_layernorm), row.spec
        assert row.parameters == _numel(layer), row.spec
    assert report.totals.parameters == _numel(model)  # parameters() yields a tied weight once
    assert report.totals.layer_parameters == sum(_numel(layer) for layer in layers)


@pytest.mark.parametrize("config", _configs())
def test_rows_describe_each_layer(config):
    report = inspect_config(config)
    for row in report.rows:
        o = config["per_layer_config"].get(row.spec.index, {})
        skipped, linear = o.get("skip", []), o.get("linear", [])
        for block in ("attention", "mlp"):
            kind = "skip" if block in skipped else "linear" if block in linear else "full"
            assert getattr(row.spec, block) == kind
        if row.spec.mlp == "full":
            assert row.spec.intermediate_size == o.get("intermediate_size", config["intermediate_size"])
        else:
            assert row.spec.intermediate_size is None
        if row.spec.attention == "full":
            assert row.spec.num_attention_heads == o.get("num_attention_heads", config["num_attention_heads"])
            assert row.spec.sliding_window == o.get("sliding_window")
            assert row.spec.attention_chunk_size == o.get("attention_chunk_size")
        else:
            assert row.spec.num_attention_heads is None and row.spec.window is None


@pytest.mark.parametrize("dtype, dtype_bytes", [(None, 4), ("bfloat16", 2), ("float16", 2)])
@pytest.mark.parametrize("family", LLAMA_FAMILIES)
def test_kv_bytes_per_token(family, dtype, dtype_bytes):
    config = hetero_config(family, **({"torch_dtype": dtype} if dtype else {}))
    report = inspect_config(config)
    expected = _expected_kv_bytes(config, dtype_bytes)
    assert [r.kv_bytes_per_token for r in report.rows] == expected
    assert report.totals.kv_bytes_per_token == sum(expected)
    assert report.dtype_bytes == dtype_bytes
    assert report.parent.kv_bytes_per_token == _expected_kv_bytes(homogeneous_config(family), dtype_bytes)[0] * 6


@pytest.mark.parametrize("extra", _EXTRA.values(), ids=_EXTRA.keys())
@pytest.mark.parametrize("family", LLAMA_FAMILIES)
def test_parent_equals_stock_model(family, extra):
    report = inspect_config(hetero_config(family, **extra))
    parent = homogeneous_config(family, **extra)
    with torch.device("meta"):
        stock = transformers.AutoModelForCausalLM.from_config(_stock_config(parent))
    assert type(stock).__name__.lower().startswith(family)
    assert report.parent.parameters == _numel(stock)
    assert report.ratio["parameters"] == report.totals.parameters / report.parent.parameters


def test_llama3_70b_dims_without_allocating():
    """Real dimensions: the arithmetic must give Llama-3-70B's published count, in no time and no memory."""
    config = homogeneous_config(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        torch_dtype="bfloat16",
    )
    report = inspect_config(config)
    assert report.totals.parameters == 70_553_706_496
    assert report.totals.kv_bytes_per_token == 80 * 2 * 8 * 128 * 2
    assert report.ratio == {"parameters": 1.0, "kv_bytes_per_token": 1.0}


def test_checkpoint_weights_are_read_only_when_checked(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hetero_config()))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    report = inspect_config(tmp_path, check_weights=False)
    assert report.totals.parameters == inspect_config(hetero_config()).totals.parameters
    assert report.nonfinite is None
    # Checking the weights (the default) reads them, and a corrupt file is an error naming it.
    with pytest.raises(hetgraph.checkpoint.CheckpointError, match=r"model\.safetensors: not a readable"):
        inspect_config(tmp_path)


def test_config_object_and_dict_agree():
    d = hetero_config("qwen3")
    config = hetgraph.from_config(d).config
    assert inspect_config(config).to_dict() == inspect_config(d).to_dict()


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hetgraph", *args], capture_output=True, text=True, timeout=300, check=False
    )


def _assert_table(out: str, config: dict) -> None:
    lines = out.splitlines()
    for i in range(config["num_hidden_layers"]):
        assert any(line.split()[:1] == [str(i)] for line in lines if line.strip()), f"no row for layer {i}"
    total = inspect_config(config).totals
    total_lines = [line for line in lines if line.startswith("total ")]
    assert len(total_lines) == 1
    assert f"{total.parameters:,}" in total_lines[0] and f"{total.kv_bytes_per_token:,}" in total_lines[0]
    assert any(line.startswith("homogeneous parent") for line in lines)


@pytest.mark.slow  # a third CLI subprocess; inspect of checkpoints is tested in-process
def test_cli_on_saved_checkpoint(checkpoint):
    config = hetero_config("qwen3")
    result = _run_cli("inspect", checkpoint(config))
    assert result.returncode == 0, result.stderr
    _assert_table(result.stdout, config)


def test_cli_on_bare_config_json(tmp_path):
    config = hetero_config()
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    result = _run_cli("inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    _assert_table(result.stdout, config)


def test_cli_invalid_config_is_one_line_error(tmp_path):
    config = hetero_config()
    config["per_layer_config"][1] = {"num_key_value_heads": 3}  # 4 heads are not divisible by 3
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    result = _run_cli("inspect", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "layer 1" in lines[0] and "num_key_value_heads=3" in lines[0]


def test_cli_json(tmp_path, capsys):
    config = hetero_config("mistral")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert main(["inspect", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads(json.dumps(inspect_config(path).to_dict()))
    assert [layer["index"] for layer in out["layers"]] == list(range(6))
    assert out["totals"]["parameters"] == _numel(hetgraph.from_config(config))


def test_cli_missing_path(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "config.json" in err
