"""Cutting a model from a homogeneous parent checkpoint: `from_pretrained(path, per_layer_config=...,
prune=...)` and `python -m hetgraph cut`. The oracle: the parent's tensors sliced here by hand,
written as a per-layer checkpoint, and run by the independent reference (`references/llama.py`)."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import hetgraph
from hetgraph import HeteroConfigError
from hetgraph.cli import main as cli_main
from hetgraph.contract import model_spec
from hetgraph.stock_guard import strip_guard
from references.llama import load_reference
from support.checks import ATOL, prompts, read_config
from support.models import VOCAB, homogeneous_config

HEADS, KV, HEAD_DIM, WIDTH = 4, 2, 16, 128


@pytest.fixture(scope="module")
def parent(checkpoint):
    """A homogeneous tiny Llama (6 layers, 4 heads on 2 KV heads, MLP 128), saved as transformers does."""
    return checkpoint(homogeneous_config(), seed=3)


def _hand_cut(parent: str, path, plan: dict, keep: dict) -> str:
    """The cut written by hand: removed blocks' tensors dropped, `keep[(layer, group)]` the kept
    units ("mlp": channels, "heads": query heads, "kv": KV heads) sliced out of the parent's."""
    tensors = load_file(os.path.join(parent, "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if not m:
            out[name] = t
            continue
        i, local = int(m.group(1)), m.group(2)
        skip = plan.get(i, {}).get("skip", [])
        if ("attention" in skip and (local.startswith("self_attn.") or local.startswith("input_layernorm"))) or (
            "mlp" in skip and (local.startswith("mlp.") or local.startswith("post_attention_layernorm"))
        ):
            continue
        if (i, "mlp") in keep and local in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            t = t[keep[i, "mlp"]]
        elif (i, "mlp") in keep and local == "mlp.down_proj.weight":
            t = t[:, keep[i, "mlp"]]
        elif (i, "heads") in keep and local == "self_attn.q_proj.weight":
            t = t[rows(keep[i, "heads"], HEAD_DIM)]
        elif (i, "heads") in keep and local == "self_attn.o_proj.weight":
            t = t[:, rows(keep[i, "heads"], HEAD_DIM)]
        elif (i, "kv") in keep and local in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
            t = t[rows(keep[i, "kv"], HEAD_DIM)]
        out[name] = t.contiguous()
    config = dict(read_config(parent), per_layer_config={str(k): v for k, v in plan.items()})
    os.makedirs(path)
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


def rows(units, size: int) -> torch.Tensor:
    """The rows of `units`, `size` rows each."""
    return torch.cat([torch.arange(u * size, (u + 1) * size) for u in units])


def _assert_same_model(model, reference_path: str) -> None:
    ids, mask = prompts(VOCAB, length=10, pad=(0, 3), seed=1)
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    want = load_reference(reference_path).logits(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)


def test_seed_example_four_attention_blocks_removed(parent, tmp_path):
    """The seed's example on a tiny Llama: attention skipped in 4 of 6 layers."""
    plan = {i: {"skip": ["attention"]} for i in (1, 2, 3, 4)}
    model = hetgraph.from_pretrained(parent, per_layer_config=plan)
    spec = model_spec(model)
    assert [s.attention for s in spec] == ["full", "skip", "skip", "skip", "skip", "full"]
    assert not [n for n, _ in model.named_parameters() if re.match(r"model\.layers\.[1-4]\.self_attn", n)]
    _assert_same_model(model, _hand_cut(parent, tmp_path / "want", plan, {}))


def test_narrowed_blocks_keep_the_first_units(parent, tmp_path):
    """prune="first": MLP channels, whole KV groups and query heads inside them; the plan merged
    over a block removal in the same model."""
    plan = {0: {"intermediate_size": 48}, 2: {"num_attention_heads": 2, "num_key_value_heads": 1},
            3: {"num_attention_heads": 2, "num_key_value_heads": 2}, 5: {"skip": ["mlp"]}}  # fmt: skip
    model = hetgraph.from_pretrained(parent, per_layer_config=plan)
    keep = {(0, "mlp"): list(range(48)), (2, "kv"): [0], (2, "heads"): [0, 1], (3, "heads"): [0, 2]}
    _assert_same_model(model, _hand_cut(parent, tmp_path / "want", plan, keep))


def test_magnitude_and_a_callable_choose_the_kept_units(parent, tmp_path):
    tensors = load_file(os.path.join(parent, "model.safetensors"))
    p = "model.layers.1."
    norms = sum(tensors[p + f"mlp.{m}.weight"].square().sum(1) for m in ("gate_proj", "up_proj"))
    norms = norms + tensors[p + "mlp.down_proj.weight"].square().sum(0)
    top = sorted(torch.topk(norms, 40).indices.tolist())
    plan = {1: {"intermediate_size": 40}}
    model = hetgraph.from_pretrained(parent, per_layer_config=plan, prune="magnitude")
    _assert_same_model(model, _hand_cut(parent, tmp_path / "magnitude", plan, {(1, "mlp"): top}))

    calls = []

    def last_units(layer, group, weights):  # scores rising with the index: the last units stay
        calls.append((layer, group, sorted(weights)))
        return torch.arange(next(iter(weights.values())).shape[0], dtype=torch.float32)

    plan = {1: {"intermediate_size": 40}, 4: {"num_attention_heads": 2, "num_key_value_heads": 1}}
    model = hetgraph.from_pretrained(parent, per_layer_config=plan, prune=last_units)
    keep = {(1, "mlp"): list(range(88, 128)), (4, "kv"): [1], (4, "heads"): [2, 3]}
    _assert_same_model(model, _hand_cut(parent, tmp_path / "callable", plan, keep))
    assert sorted(calls) == [(1, "mlp", ["down_proj", "gate_proj", "up_proj"]),
                             (4, "heads", ["o_proj", "q_proj"]),
                             (4, "kv_heads", ["k_proj", "o_proj", "q_proj", "v_proj"])]  # fmt: skip


@pytest.mark.parametrize(
    "plan,prune,message",
    [
        ({2: {"num_attention_heads": 4, "num_key_value_heads": 1}}, "first",
         "layer 2: 4 query heads on 1 KV heads (4 per KV head) from a parent of 4 on 2 (2 per KV head)"),
        ({1: {"intermediate_size": 256}}, "first", "layer 1: intermediate_size=256 from a parent MLP of 128"),
        ({3: {"linear": ["mlp"]}}, "first",
         "layer 3: the plan makes the mlp block 'linear' but the parent's is 'full'"),
        ({0: {"head_dim": 8, "num_attention_heads": 8, "num_key_value_heads": 2}}, "first",
         "layer 0: head_dim=8 from a parent head_dim of 16"),
        ({0: {"intermediate_size": 64}}, "largest", "prune='largest' is not a criterion"),
        ({0: {"intermediate_size": 64}}, lambda layer, group, w: torch.zeros(3), "returned shape [3]"),
        ({"x": {}}, "first", "per_layer_config key 'x' is not a layer index"),
    ],
    ids=["kv-group-grows", "wider", "linear", "head-dim", "bad-rule", "bad-scores", "bad-key"],
)
def test_a_plan_the_weights_cannot_satisfy_is_an_error_naming_the_layer(parent, plan, prune, message):
    with pytest.raises(HeteroConfigError, match=re.escape(message)):
        hetgraph.from_pretrained(parent, per_layer_config=plan, prune=prune)


def test_cut_command_writes_a_checkpoint_hetgraph_and_the_reference_read(parent, tmp_path, capsys):
    plan = {"1": {"skip": ["attention"]}, "2": {"intermediate_size": 64}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with open(os.path.join(parent, "tokenizer.json"), "w") as f:
        f.write("{}")
    dst = tmp_path / "cut"
    assert cli_main(["cut", parent, str(dst), "--plan", str(tmp_path / "plan.json"), "--prune", "magnitude"]) == 0
    assert (dst / "tokenizer.json").exists()
    saved = hetgraph.from_pretrained(str(dst))
    in_memory = hetgraph.from_pretrained(parent, per_layer_config=plan, prune="magnitude")
    assert model_spec(saved).layers == model_spec(in_memory).layers
    for (name, a), (_, b) in zip(saved.state_dict().items(), in_memory.state_dict().items()):
        assert torch.equal(a, b), name
    _assert_same_model(saved, str(dst))
    capsys.readouterr()
    assert cli_main(["cut", parent, str(dst), "--plan", str(tmp_path / "plan.json")]) == 2
    assert "not an empty directory" in capsys.readouterr().err


# ---- pruned checkpoints saved under their parent's config (LLM-Pruner, FLAP) -------------------------

PRUNED = {0: {"skip": ["attention"]}, 1: {"intermediate_size": 40, "num_attention_heads": 3, "num_key_value_heads": 3},
          3: {"linear": ["mlp"]}, 4: {"skip": ["attention", "mlp"]}}  # fmt: skip


def _under_parent_config(checkpoint, tmp_path) -> tuple[str, str]:
    """(a pruned model's checkpoint, the same tensors with the parent's config.json)."""
    pruned = checkpoint(homogeneous_config(num_key_value_heads=4, per_layer_config=PRUNED), seed=5)
    stripped = tmp_path / "stripped"
    os.makedirs(stripped)
    os.link(os.path.join(pruned, "model.safetensors"), stripped / "model.safetensors")
    config = read_config(pruned)
    del config["per_layer_config"]
    (stripped / "config.json").write_text(json.dumps(config))
    return pruned, str(stripped)


def test_infer_shapes_reads_a_pruned_checkpoint_under_its_parent_config(checkpoint, tmp_path, caplog):
    pruned, stripped = _under_parent_config(checkpoint, tmp_path)
    with pytest.raises(HeteroConfigError, match="model.layers.1.mlp.gate_proj.weight"):
        hetgraph.from_pretrained(stripped)  # the strict check, as before
    with caplog.at_level("WARNING", logger="hetgraph.build"):
        model = hetgraph.from_pretrained(stripped, infer_shapes=True)
    assert "per_layer_config inferred from the tensor shapes" in caplog.text and "'linear': ['mlp']" in caplog.text
    assert model_spec(model).layers == model_spec(hetgraph.from_pretrained(pruned)).layers
    _assert_same_model(model, pruned)

    dst = tmp_path / "converted"
    assert cli_main(["convert", stripped, str(dst), "--infer-shapes", "--quiet"]) == 0
    assert {int(k): v for k, v in strip_guard(read_config(dst))["per_layer_config"].items()} == {
        0: {"skip": ["attention"]}, 1: {"intermediate_size": 40, "num_attention_heads": 3, "num_key_value_heads": 3},
        3: {"linear": ["mlp"]}, 4: {"skip": ["attention", "mlp"]}}  # fmt: skip


def test_infer_shapes_refuses_shapes_that_do_not_decide_the_heads(checkpoint, tmp_path):
    pruned, stripped = _under_parent_config(checkpoint, tmp_path)
    tensors = load_file(os.path.join(stripped, "model.safetensors"))
    tensors["model.layers.2.self_attn.q_proj.weight"] = tensors["model.layers.2.self_attn.q_proj.weight"][:40]
    os.unlink(os.path.join(stripped, "model.safetensors"))
    save_file(tensors, os.path.join(stripped, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HeteroConfigError, match=re.escape("layer 2: self_attn.q_proj.weight is [40, 64]: 40 is not "
                                                          "a multiple of head_dim=16")):
        hetgraph.from_pretrained(stripped, infer_shapes=True)
