"""`hetgraph.distributed.tp_plan` / `tensor_parallel`: the per-layer plan (no head split, no entry for
a removed or linear block), and two gloo ranks on CPU whose sharded model, eager and compiled with
backend="hetgraph", gives the single-process model's greedy tokens and logits, with each rank's
cache holding its own KV heads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import hetgraph
from hetgraph.distributed import attention_split, pipeline_stage, tp_plan
from support.models import VOCAB

CONFIG = dict(
    model_type="llama", hidden_size=64, num_hidden_layers=6, vocab_size=VOCAB, intermediate_size=128,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    per_layer_config={
        0: {"num_key_value_heads": 1},  # one KV head on two ranks: k/v replicated
        1: {"skip": ["attention"]},
        2: {"num_attention_heads": 3, "num_key_value_heads": 1},  # 3 heads: the attention replicated
        3: {"intermediate_size": 97, "num_attention_heads": 6, "num_key_value_heads": 3},  # width, KV heads: uneven
        4: {"linear": ["mlp"]},
        5: {"skip": ["mlp"], "sliding_window": 4},
    },
)  # fmt: skip

WORKER = textwrap.dedent(
    """
    import json, sys, torch, torch.distributed as dist, hetgraph
    from torch.distributed.device_mesh import init_device_mesh
    from hetgraph.distributed import tensor_parallel
    rank, store, out, config, modes = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
    config["per_layer_config"] = {int(k): v for k, v in config["per_layer_config"].items()}
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = hetgraph.from_config(config)
    ids = torch.tensor([[(5 * i + 1) % 128 for i in range(11)]])
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(ids, cache=hetgraph.make_cache(model, batch_size=1, max_cache_len=32), **greedy)
        tensor_parallel(model, init_device_mesh("cpu", (2,)))
        cache = hetgraph.make_cache(model, batch_size=1, max_cache_len=32)
        runs = {"eager": model.generate(ids, cache=cache, **greedy)}
        if "compiled" in modes:
            model.forward = torch.compile(model.forward, backend="hetgraph", fullgraph=True)
            runs["compiled"] = model.generate(ids, cache=hetgraph.make_cache(model, batch_size=1, max_cache_len=32),
                                              **greedy)
    heads = [None if getattr(layer, "keys", None) is None else layer.keys.shape[1] for layer in cache.layers]
    result = {"cache_kv_heads": heads}
    for name, run in runs.items():
        result[name] = {"same_tokens": torch.equal(run.sequences, ref.sequences),
                        "max_logit_diff": (torch.stack(run.logits) - torch.stack(ref.logits)).abs().max().item()}
    with open(out, "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
    """
)


def _two_ranks(tmp_path, script: str, *args: str, env=None) -> list[dict]:
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(r), str(tmp_path / "store"), str(tmp_path / f"{r}.json"),
                          *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    return [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]


def test_plan_never_splits_a_head_and_skips_removed_and_linear_blocks():
    torch.manual_seed(0)
    model = hetgraph.from_config(CONFIG)
    spec = hetgraph.contract.model_spec(model)
    assert [attention_split(s, 2) for s in spec] == ["kv-replicated", "none", "replicated", "replicated", "sharded",
                                                     "sharded"]  # fmt: skip
    plan = tp_plan(model, 2)
    attn = lambda i, p: f"model.layers.{i}.self_attn.{p}"  # noqa: E731
    assert plan[attn(0, "q_proj")] == plan[attn(0, "q_proj.weight")] == "colwise"
    assert plan[attn(0, "o_proj")] == "rowwise" and attn(0, "k_proj") not in plan and attn(0, "v_proj") not in plan
    assert not any(k.startswith((attn(1, ""), attn(2, ""), attn(3, ""))) for k in plan)  # removed; replicated
    assert plan[attn(4, "k_proj.weight")] == "colwise" and plan["model.layers.3.mlp.down_proj.weight"] == "rowwise"
    assert not any(k.startswith(("model.layers.4.mlp", "model.layers.5.mlp")) for k in plan)  # linear; removed
    assert all(v in ("colwise", "rowwise") for v in plan.values())
    assert attention_split(spec[4], 4) == "replicated"  # 4 query heads, 2 KV heads on 4 ranks


def test_bad_requests_are_errors_before_any_process_group_work(checkpoint):
    torch.manual_seed(0)
    model = hetgraph.from_config(CONFIG)
    refused = (r"layer 2's attention \(3 query heads, 1 KV heads\) does not split over tp_size=2, and "
               r"replicate=False; tp sizes that split it: \[1, 3\]")
    with pytest.raises(hetgraph.HeteroConfigError, match=refused):
        tp_plan(model, 2, replicate=False)
    with pytest.raises(hetgraph.HeteroConfigError, match=r"layer 0's .* tp_size=8"):  # more ranks than any head count
        tp_plan(model, 8, replicate=False)
    assert tp_plan(model, 8)  # replication allowed: only the MLPs split
    with pytest.raises(ValueError, match=r"num_stages=7: a model of 6 layers has 1 to 6 pipeline stages"):
        pipeline_stage(model, 0, 7, split="even")
    assert not torch.distributed.is_initialized()
    # the CLI refuses before init_process_group: with no rendezvous address a started group would fail otherwise
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")
    env.pop("MASTER_ADDR", None)
    path = checkpoint(CONFIG)
    base = [sys.executable, "-m", "hetgraph", "generate", path, "--prompt-ids", "1,2,3", "--max-new-tokens", "2"]
    for extra, message in ((["--tp", "2", "--no-replicate"], "layer 2's attention"),
                           (["--pp", "2", "--split", "5,2"], "2 positive layer counts summing to 6")):  # fmt: skip
        out = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]
        assert "MASTER_ADDR" not in out.stderr


def test_plan_refuses_a_family_it_does_not_split():
    from support.models import hetero_config

    model = hetgraph.from_config(hetero_config("gpt_oss"))
    with pytest.raises(hetgraph.HeteroConfigError, match="family 'gpt_oss' is not supported yet; supported: llama"):
        tp_plan(model, 2)


@pytest.mark.parametrize("modes, attempts", [
    (("eager",), ("cold",)),
    pytest.param(("eager", "compiled"), ("cold",), marks=pytest.mark.slow),  # about 60 s on 2 cores
    pytest.param(("eager", "compiled"), ("cold", "warm"), marks=pytest.mark.slow),
], ids=["eager", "compiled", "compiled-warm"])  # fmt: skip
def test_two_gloo_ranks_give_the_single_process_tokens_and_logits(tmp_path, modes, attempts):
    """Compiled: torch.compile(backend="hetgraph") on the sharded model. With attempts cold, warm: the
    second run with the first run's Inductor cache. The ranks' graphs differ (an MLP width that does
    not divide) under cache keys that do not, so the backend keeps them out of the disk caches (rank
    0 was served rank 1's graph: NaN logits)."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    for attempt in attempts:
        run = tmp_path / attempt
        run.mkdir()
        for result in _two_ranks(run, WORKER, json.dumps(CONFIG), ",".join(modes), env=env):
            assert set(result) - {"cache_kv_heads"} == set(modes), result
            for mode in modes:
                assert result[mode]["same_tokens"] and result[mode]["max_logit_diff"] < 1e-5, (attempt, result)
            # layer 0: its one KV head on both ranks; 2, 3: all (replicated); 4, 5: 2 KV heads split in two
            assert result["cache_kv_heads"] == [1, None, 1, 3, 1, 1], result


PIPELINE_WORKER = textwrap.dedent(
    """
    import json, sys, torch, torch.distributed as dist, hetgraph
    from hetgraph.distributed import pipeline_stage, generate
    rank, store, out, config, source = int(sys.argv[1]), sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
    config["per_layer_config"] = {int(k): v for k, v in config["per_layer_config"].items()}
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = hetgraph.from_config(config)
    ids = torch.tensor([[(5 * i + 1) % 128 for i in range(11)]])
    with torch.no_grad():
        ref = model.generate(ids, cache=hetgraph.make_cache(model, batch_size=1, max_cache_len=32), max_new_tokens=6,
                             do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
                             return_dict_in_generate=True)
    stage = pipeline_stage(model if source == "model" else source, rank, 2, split=[4, 2])
    tokens, logits = generate(stage, ids, 6)
    result = {"layers": list(stage.layers), "same_tokens": torch.equal(tokens, ref.sequences),
              "params": sum(p.numel() for p in stage.model.model.layers.parameters())}
    if logits is not None:
        result["max_logit_diff"] = (logits - torch.stack(ref.logits)).abs().max().item()
    with open(out, "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
    """
)


@pytest.mark.parametrize("source", ["model", "checkpoint"])
def test_two_pipeline_stages_generate_the_single_process_tokens(tmp_path, checkpoint, source):
    path = checkpoint(CONFIG) if source == "checkpoint" else "model"
    first, last = _two_ranks(tmp_path, PIPELINE_WORKER, json.dumps(CONFIG), path)
    assert first["layers"] == [0, 1, 2, 3] and last["layers"] == [4, 5]
    assert first["same_tokens"] and last["same_tokens"], (first, last)
    assert last["max_logit_diff"] < 1e-5, last
    torch.manual_seed(0)
    layers = hetgraph.from_config(CONFIG).model.layers
    for stage, own in ((first, range(0, 4)), (last, range(4, 6))):  # each stage holds only its layers' weights
        assert stage["params"] == sum(p.numel() for i in own for p in layers[i].parameters())


@pytest.mark.slow  # four torchrun / CLI processes, two of them compiling; the parts are tested above
def test_generate_cli_one_process_tp_and_pp_agree_with_eager(checkpoint):
    path = checkpoint(CONFIG)
    model = hetgraph.from_pretrained(path)
    ids = [3, 14, 15, 92, 65, 35, 89]
    with torch.no_grad():
        cache = hetgraph.make_cache(model, batch_size=1, max_cache_len=16)
        expected = model.generate(torch.tensor([ids]), cache=cache, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                  eos_token_id=None)[0].tolist()  # fmt: skip
    command = ["-m", "hetgraph", "generate", path, "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", "5",
               "--json"]  # fmt: skip
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    runs = (([], []), (torchrun, ["--tp", "2"]), (torchrun, ["--pp", "2", "--split", "even"]),
            (torchrun, ["--pp", "2", "--split", "3,3", "--compile"]))
    for prefix, extra in runs:
        out = subprocess.run([sys.executable, *prefix, *command, *extra], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, (extra, out.stderr[-3000:])
        report = json.loads(out.stdout.strip().splitlines()[-1])
        assert report["tokens"] == expected and report["ms_per_token"] > 0, extra
        if "--pp" in extra:
            assert report["stages"] == ([[0, 3], [3, 6]]), report
    refused = subprocess.run([sys.executable, *command, "--pp", "2"], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "torchrun --nproc-per-node 2" in refused.stderr
