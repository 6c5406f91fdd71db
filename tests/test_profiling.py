"""`hetgraph.profile` / `profile_variants` / `LatencyTable`: structure and arithmetic, not timings.

The default tests time with `backend="none"` (eager) and tiny shapes: what they check (rows per
variant, predictions summing the rows, errors, save/load) does not depend on the compiler. The cut
of a compiled graph into per-layer pieces is checked with dynamo's "eager" backend for the pieces;
one slow test profiles through the hetgraph backend and Inductor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch

import hetgraph
from hetgraph.cli import main as cli_main
from hetgraph.configs import model_config_dict, normalize_config, select_layers
from hetgraph.contract import model_spec
from hetgraph.timing import LayerClock, ModelTimer
from support.models import LLAMA4_TEXT, NEMOTRON_H, hetero_config, homogeneous_config

FAST = dict(prompt_len=8, context_len=8, repeats=1, backend="none")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return hetgraph.from_config(hetero_config("llama"))


@pytest.fixture(scope="module")
def table(model):
    return hetgraph.profile(model, **FAST)


def _without_index(s):
    return dataclasses.replace(s, index=0)


@pytest.mark.parametrize("config", [hetero_config("llama"), LLAMA4_TEXT, NEMOTRON_H], ids=["llama", "llama4_text", "nemotron_h"])
def test_select_layers_reindexes_per_layer_config_and_the_family_lists(config):
    spec = hetgraph.ModelSpec.from_config(normalize_config(config))
    layers = [3, 1, 1, 0, 3]
    cut = hetgraph.ModelSpec.from_config(normalize_config(select_layers(config, layers)))
    assert [_without_index(s) for s in cut] == [_without_index(spec[i]) for i in layers]


def test_select_layers_refuses_layers_out_of_range():
    with pytest.raises(hetgraph.HeteroConfigError, match=r"layers \[6\] are invalid; allowed: 0 to 5"):
        select_layers(hetero_config("llama"), [0, 6])


def test_one_row_per_variant_with_its_layers_and_sizes(model, table):
    spec = model_spec(model)
    variants = spec.variants()
    assert len(table.rows) == len(variants)
    assert [r.layers for r in table.rows] == list(variants.values())
    layers = model.model.layers
    for row in table.rows:
        i = row.layers[0]
        assert row.spec == spec[i]
        assert row.parameters == sum(p.numel() for p in layers[i].parameters())
        assert row.weight_bytes == 4 * row.parameters and row.kv_bytes_per_token == spec[i].kv_bytes_per_token(4)
    assert (table.family, table.hidden_size, table.dtype) == ("llama", 64, "float32")
    assert table.shapes == {"prompt_len": 8, "context_len": 8, "batch_size": 1}


def test_predict_sums_the_rows_for_the_model_and_for_a_reordered_one(model, table):
    got = table.predict(model)
    for phase in ("prefill_ms", "decode_ms"):
        assert got[phase] == pytest.approx(table.fixed[phase] + sum(getattr(r, phase) * len(r.layers) for r in table.rows))
    # Another order and count, assembled from the same variants.
    reordered = select_layers(model_config_dict(model.config), [5, 3, 3, 1, 0, 2, 2, 5])
    spec = hetgraph.ModelSpec.from_config(normalize_config(reordered))
    expected = table.fixed["decode_ms"] + sum(table.row(s).decode_ms for s in spec)
    assert table.predict(reordered)["decode_ms"] == pytest.approx(expected)


def test_predict_names_the_layer_whose_variant_is_missing(table):
    other = hetero_config("llama")
    other["per_layer_config"] = {**other["per_layer_config"], 3: {"intermediate_size": 80}}
    with pytest.raises(hetgraph.HeteroConfigError, match=r"layer 3: variant 'attn=full mlp=full .*ffn=80' is not in the table"):
        table.predict(other)
    with pytest.raises(hetgraph.HeteroConfigError, match="the table is for llama with hidden_size=64"):
        table.predict(homogeneous_config("llama", hidden_size=128, num_attention_heads=4))


def test_save_load_round_trip(table, tmp_path):
    table.save(tmp_path / "table.json")
    assert hetgraph.LatencyTable.load(tmp_path / "table.json") == table
    d = json.loads((tmp_path / "table.json").read_text())
    d["format_version"] = 99
    (tmp_path / "newer.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="format_version=99"):
        hetgraph.LatencyTable.load(tmp_path / "newer.json")


def test_structure_is_deterministic_times_are_not_compared(model, table):
    again = hetgraph.profile(model, **FAST)
    assert [(r.spec, r.layers, r.parameters) for r in again.rows] == [(r.spec, r.layers, r.parameters) for r in table.rows]


def test_profile_variants_times_candidates_against_one_parent():
    parent = homogeneous_config("llama")
    candidates = [{"intermediate_size": 48}, {"skip": ["attention"]}, {"num_key_value_heads": 1}]
    table = hetgraph.profile_variants(parent, candidates, **FAST)
    assert [r.spec.describe() for r in table.rows] == [
        "attn=full mlp=full heads=4/2x16 ffn=128",  # the parent's own layer, the anchor
        "attn=full mlp=full heads=4/2x16 ffn=48",
        "attn=skip mlp=full ffn=128",
        "attn=full mlp=full heads=4/1x16 ffn=128",
    ]
    assembled = dict(parent, num_hidden_layers=3, per_layer_config={0: candidates[1], 2: candidates[0]})
    assert set(table.predict(assembled)) == {"prefill_ms", "decode_ms"}
    with pytest.raises(hetgraph.HeteroConfigError, match="must have no per_layer_config"):
        hetgraph.profile_variants(hetero_config("llama"), candidates, **FAST)


def test_cli_profile_writes_the_table(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(homogeneous_config("llama")))
    variants = tmp_path / "variants.json"
    variants.write_text(json.dumps([{"intermediate_size": 48}]))
    out = tmp_path / "out"
    args = ["profile", str(config), "--variants", str(variants), "--out", str(out), "--prompt-len", "8",
            "--context-len", "8", "--repeats", "1", "--backend", "none"]  # fmt: skip
    assert cli_main(args) == 0
    assert hetgraph.LatencyTable.load(out / "table.json").rows[1].spec.intermediate_size == 48
    assert "| attn=full mlp=full heads=4/2x16 ffn=48 |" in (out / "table.md").read_text()
    assert os.path.exists(out / "table.png") or "no plot" in capsys.readouterr().out


@pytest.mark.slow
def test_profile_through_the_hetgraph_backend():
    torch.manual_seed(0)
    config = hetero_config("llama", num_hidden_layers=2, per_layer_config={1: {"intermediate_size": 64}})
    model = hetgraph.from_config(config)
    table = hetgraph.profile(model, prompt_len=16, context_len=16, repeats=3)
    assert table.backend == "hetgraph" and [r.layers for r in table.rows] == [[0], [1]]
    # Each layer's own compiled piece was timed; how well the times predict whole models is
    # benchmarks/profile_accuracy.py's job. The fixed part is a difference (it may be noise-small).
    assert all(r.prefill_ms > 0 and r.decode_ms > 0 for r in table.rows)
    assert all(math.isfinite(v) for v in [*table.fixed.values(), *table.predict(model).values()])


def test_the_layer_clock_cuts_the_compiled_graph_at_each_layer_and_keeps_the_logits(model):
    """`LayerClock.backend` specializes, cuts and compiles per piece; checked here with dynamo's
    "eager" backend for the pieces (the slow test below goes through Inductor)."""
    clock = LayerClock("cpu")
    compiled = torch.compile(model.forward, backend=clock.backend("eager"))
    ids = torch.tensor([[(3 * i + 1) % 128 for i in range(9)]])
    with torch.no_grad():
        compiled(input_ids=ids)  # compiles
        clock.begin("prefill_ms")
        logits = compiled(input_ids=ids).logits
    torch.testing.assert_close(logits, model(input_ids=ids).logits, rtol=0, atol=1e-5)
    (times,) = clock.calls["prefill_ms"]
    # A piece per layer, each timed (unspecialized, even layer 4, whose blocks are removed, still
    # adds its zeros to the residual).
    assert len(times) == len(model_spec(model)) and all(t > 0 for t in times)


def test_the_timer_compiles_each_model_for_the_shapes_it_times():
    """dynamo keeps its automatic-dynamic state per code object, which every model of a family
    shares: a model compiled after another's prefill and decode got a prefill graph of symbolic
    length (slower than the probe's, and on Llama4 a dynamo KeyError), so the timer compiles static."""
    symbolic = []

    def record(gm, example_inputs):
        sizes = [s for x in example_inputs if isinstance(x, torch.Tensor) for s in x.shape]
        symbolic.append(any(isinstance(v, torch.SymInt) for v in [*example_inputs, *sizes]))
        return gm.forward

    timer = ModelTimer(dict(prompt_len=8, context_len=8, batch_size=1), record, 1, torch.float32, "cpu")
    config = hetero_config("llama")
    timer.time_layers(config, config)
    assert len(symbolic) > 4 and not any(symbolic)  # the probe's pieces, then the whole model's two graphs
