"""Other checkpoint layouts: Nemotron-NAS (`block_configs`) and LLM-Drop (drop lists), the "linear"
block kind they bring, and `convert`. Checkpoints are written here by hand in each format's own
layout; the oracle is `references/llama.py`, which reads those layouts itself."""

from __future__ import annotations

import functools
import gc
import json
import os
import re
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaForCausalLM
from transformers.cache_utils import DummyLayer, StaticLayer

import hetgraph
from hetgraph import HeteroConfigError, formats
from hetgraph.backend import HetgraphBackend
from hetgraph.bench.presets import SUPER_49B_CONFIG
from hetgraph.checkpoint import TensorIndex
from hetgraph.cli import main as cli_main
from hetgraph.contract import model_spec
from hetgraph.convert import convert
from hetgraph.errors import CheckpointError
from hetgraph.formats.nemotron_nas import ffn_width
from hetgraph.inspection import inspect_config
from hetgraph.passes._graph import SDPA, tag
from references import load_reference as load_any_reference
from references.llama import load_reference
from support.checks import ATOL, read_config
from support.checks import prompts as family_prompts
from support.models import GREEDY, VOCAB, homogeneous_config

# The real Llama-3.3-Nemotron-Super-49B config.json, shipped with the benchmarks' presets.
SUPER_49B = SUPER_49B_CONFIG
HIDDEN, HEADS, HEAD_DIM = 64, 4, 16

# ---- a tiny Nemotron-NAS checkpoint with every block kind -----------------------------------------


def _attn(kind):
    """A DeciLM attention config: an int is n_heads_in_group; "no_op" / "linear"; unsupported fields off."""
    fields = dict(n_heads_in_group=None, no_op=False, replace_with_linear=False, sparsify=None, window_length=None,
                  num_sink_tokens=None, use_prefill_window_in_sink_attention=False, unshifted_sink=False)
    if kind == "no_op":
        fields["no_op"] = True
    elif kind == "linear":
        fields["replace_with_linear"] = True
    else:
        fields["n_heads_in_group"] = kind
    return fields


def _ffn(kind):
    fields = dict(ffn_mult=None, no_op=False, replace_with_linear=False, sparsify=None)
    if kind == "no_op":
        fields["no_op"] = True
    elif kind == "linear":
        fields["replace_with_linear"] = True
    else:
        fields["ffn_mult"] = kind
    return fields


# (attention, ffn) per layer, with the KV heads and MLP width the format defines, worked out by hand:
# width = int(2 * ffn_mult * 64 / 3) rounded up to a multiple of 256.
LAYERS = [
    # attention, ffn,     kv heads, width
    ("no_op", 6.0, None, 256),  # layer 0 without attention; 256 exactly: no rounding
    (1, 6.5, 4, 512),  # 277 -> 512; multi-head
    (2, "linear", 2, None),
    ("linear", 13.0, None, 768),  # 554 -> 768
    (4, "no_op", 1, None),
    ("no_op", "no_op", None, None),  # both removed: the layer is empty
    ("linear", "linear", None, None),
    (2, 1.0, 2, 256),  # 42 -> 256
]


def nemotron_config(layers=LAYERS) -> dict:
    return {
        "architectures": ["DeciLMForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig",
                     "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"},
        "model_type": "nemotron-nas",
        "block_configs": [{"attention": _attn(a), "ffn": _ffn(f)} for a, f, _, _ in layers],
        "hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_hidden_layers": len(layers),
        "num_key_value_heads": None, "intermediate_size": None, "vocab_size": VOCAB,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "attention_bias": False, "mlp_bias": False,
        "max_position_embeddings": 256, "rope_theta": 10000.0, "tie_word_embeddings": False,
        # llama3 scaling with a short original context, so that it changes the low frequencies here.
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32},
        "torch_dtype": "float32",
    }  # fmt: skip


def nemotron_tensors(layers=LAYERS) -> dict[str, tuple[int, ...]]:
    """DeciLM's tensor names and shapes: a no-op block has none, its norm included."""
    h, shapes = HIDDEN, {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
                         "lm_head.weight": (VOCAB, HIDDEN)}
    for i, (attn, ffn, kv, width) in enumerate(layers):
        p = f"model.layers.{i}."
        if attn != "no_op":
            shapes[p + "input_layernorm.weight"] = (h,)
        if attn == "linear":
            shapes[p + "self_attn.linear_attn.weight"] = (h, h)
        elif attn != "no_op":
            shapes[p + "self_attn.q_proj.weight"] = (HEADS * HEAD_DIM, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv * HEAD_DIM, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv * HEAD_DIM, h)
            shapes[p + "self_attn.o_proj.weight"] = (h, HEADS * HEAD_DIM)
        if ffn != "no_op":
            shapes[p + "post_attention_layernorm.weight"] = (h,)
        if ffn == "linear":
            shapes[p + "mlp.linear_mlp.weight"] = (h, h)
        elif ffn != "no_op":
            shapes[p + "mlp.gate_proj.weight"] = (width, h)
            shapes[p + "mlp.up_proj.weight"] = (width, h)
            shapes[p + "mlp.down_proj.weight"] = (h, width)
    return shapes


def write_checkpoint(path, config: dict, shapes: dict, seed: int = 0) -> str:
    """config.json plus random weights: norms near 1, matrices large enough for decisive logits."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in sorted(shapes.items()):
        if name.endswith("norm.weight"):
            tensors[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            tensors[name] = (1.0 if "embed" in name else 0.15) * torch.randn(shape, generator=g)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return str(path)


@pytest.fixture(scope="module")
def nemotron_ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("nemotron"), nemotron_config(), nemotron_tensors())


@pytest.fixture(scope="module")
def nemotron(nemotron_ckpt):
    return hetgraph.from_pretrained(nemotron_ckpt)


@pytest.fixture(scope="module")
def nemotron_ref(nemotron_ckpt):
    return load_reference(nemotron_ckpt)


prompts = functools.partial(family_prompts, VOCAB, length=10, pad=(0, 3))


def assert_logits_match(got, want, mask):
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)


# ---- Nemotron-NAS: structure, eager, caches ---------------------------------------------------------


def test_ffn_mult_rounding_gives_the_published_widths():
    # Llama-3.3-Nemotron-Super-49B (hidden 8192): ffn_mult -> its published MLP widths.
    published = {0.5: 2816, 1.0: 5632, 1.3125: 7168, 2.625: 14336, 3.28125: 17920, 5.25: 28672}
    assert {m: ffn_width(m, 8192) for m in published} == published
    assert [ffn_width(m, HIDDEN) for m in (6.0, 6.5, 13.0, 1.0)] == [256, 512, 768, 256]
    # DeciLM rounds ffn_mult to 6 decimals before the width (unrounded, this would give 21760).
    assert ffn_width(3.9376835, 8192) == 21504


def test_nemotron_loads_onto_stock_llama_with_every_block_kind(nemotron_ckpt, nemotron):
    assert type(nemotron) is LlamaForCausalLM
    spec = model_spec(nemotron)
    kinds = {"no_op": "skip", "linear": "linear"}
    for s, (attn, ffn, kv, width) in zip(spec, LAYERS):
        assert s.attention == kinds.get(attn, "full"), s
        assert s.mlp == kinds.get(ffn, "full"), s
        assert s.num_key_value_heads == kv and s.intermediate_size == width, s
        assert s.num_attention_heads == (HEADS if kv else None)
    params = dict(nemotron.named_parameters())
    assert set(params) == set(nemotron_tensors()), "hetgraph's names are DeciLM's names"
    # The parent is the largest layer: most KV heads, widest MLP.
    assert nemotron.config._getattr_without_heterogeneous_validation("num_key_value_heads") == 4
    assert nemotron.config._getattr_without_heterogeneous_validation("intermediate_size") == 768
    # inspect counts, from the config alone, the parameters the model really has (linear blocks included).
    report = inspect_config(nemotron_ckpt)
    assert [r.spec for r in report.rows] == list(spec)
    assert report.totals.parameters == sum(p.numel() for p in nemotron.parameters())
    assert "attention blocks: 4 full, 2 skip, 2 linear; mlp blocks: 4 full, 2 skip, 2 linear" in report.to_text()


def test_nemotron_logits_match_reference(nemotron, nemotron_ref):
    ids, mask = prompts()
    with torch.no_grad():
        got = nemotron(ids, attention_mask=mask).logits
    assert_logits_match(got, nemotron_ref.logits(ids, mask), mask)


@pytest.mark.parametrize("cache", ["default", "make_cache"])
def test_nemotron_greedy_generate_matches_reference(nemotron, nemotron_ref, cache):
    ids, mask = prompts()
    new = 12
    kwargs = {}
    if cache == "make_cache":
        kwargs["cache"] = hetgraph.make_cache(nemotron, batch_size=2, max_cache_len=ids.shape[1] + new)
    out = nemotron.generate(ids, attention_mask=mask, max_new_tokens=new, **GREEDY, **kwargs)
    want = nemotron_ref.greedy(ids, new, attention_mask=mask)
    assert torch.equal(out, want), f"\ngenerated {out.tolist()}\nreference {want.tolist()}"


def test_make_cache_holds_no_kv_for_linear_or_removed_attention(nemotron):
    cache = hetgraph.make_cache(nemotron, batch_size=2, max_cache_len=16)
    for layer, (attn, _, kv, _) in zip(cache.layers, LAYERS):
        if kv is None:  # no-op or linear attention
            assert isinstance(layer, DummyLayer)
        else:
            assert isinstance(layer, StaticLayer) and layer.keys.shape == (2, kv, 16, HEAD_DIM)
    assert cache.nbytes == 2 * 16 * 2 * HEAD_DIM * 4 * (4 + 2 + 1 + 2)  # K and V, fp32


# ---- compiled ---------------------------------------------------------------------------------------


def test_nemotron_compiled_prefill_and_decode_match_reference(nemotron_ckpt, nemotron_ref):
    """One compile of the forward for prefill and one for decode, against the reference's logits and tokens."""
    model = hetgraph.from_pretrained(nemotron_ckpt)
    backend = HetgraphBackend(options={"strict": True})
    forward = torch.compile(model.forward, backend=backend, fullgraph=True)
    ids, _ = prompts(batch=1, pad=(0,))
    new = 10
    cache = hetgraph.make_cache(model, batch_size=1, max_cache_len=ids.shape[1] + new)
    with torch.no_grad():
        logits = forward(input_ids=ids, cache=cache).logits
        torch.testing.assert_close(logits, nemotron_ref.logits(ids), atol=ATOL, rtol=0)
        out = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
        for _ in range(new - 1):
            out = torch.cat([out, forward(input_ids=out[:, -1:], cache=cache).logits.argmax(-1)], dim=1)
    assert torch.equal(out, nemotron_ref.greedy(ids, new))
    assert len(backend.reports) == 2  # prefill and decode

    prefill = backend.reports[0]
    assert not any(r.refused.get(i) for r in prefill.records for i in range(len(LAYERS))), [
        (r.name, r.refused) for r in prefill.records
    ]
    nodes = list(prefill.gm.graph.nodes)
    attention = sorted(tag(n).layer for n in nodes if n.target in SDPA and tag(n))
    assert attention == [1, 2, 4, 7]  # no attention op for no-op or linear attention
    linear = sorted(
        (tag(n).layer, tag(n).block) for n in nodes
        if tag(n) and tag(n).module_name in ("linear_attn", "linear_mlp") and n.target is torch._C._nn.linear
    )  # fmt: skip
    assert linear == [(2, "mlp"), (3, "attention"), (6, "attention"), (6, "mlp")]
    assert not any(n.target is torch.zeros_like for n in nodes)
    assert not any(tag(n) and tag(n).layer == 5 for n in nodes), "layer 5 has no blocks: no ops"


# ---- save_pretrained and convert --------------------------------------------------------------------


def test_save_pretrained_writes_per_layer_config_that_reloads_identically(nemotron, nemotron_ref, tmp_path):
    nemotron.save_pretrained(tmp_path)
    saved = read_config(tmp_path)
    assert saved["model_type"] == "llama" and saved["architectures"] == ["LlamaForCausalLM"]
    for key in ("block_configs", "auto_map", "rope_scaling"):
        assert key not in saved
    layers = {int(k): v for k, v in saved["per_layer_config"].items()}
    assert layers[0]["skip"] == ["attention"] and layers[2]["linear"] == ["mlp"]
    assert layers[5]["skip"] == ["attention", "mlp"] and layers[6]["linear"] == ["attention", "mlp"]
    assert layers[4] == {"num_key_value_heads": 1, "skip": ["mlp"]}
    # The per-layer layout means the same model to the reference as the block_configs did.
    _assert_reads_as(str(tmp_path), nemotron)


def _assert_reads_as(path: str, nemotron) -> None:
    """`path` loads to `nemotron`'s table and exact logits, and the reference reads it to them too."""
    reloaded = hetgraph.from_pretrained(path)
    assert model_spec(reloaded).layers == model_spec(nemotron).layers
    ids, mask = prompts()
    with torch.no_grad():
        got = reloaded(ids, attention_mask=mask).logits
        torch.testing.assert_close(got, nemotron(ids, attention_mask=mask).logits, atol=0, rtol=0)
    assert_logits_match(got, load_reference(path).logits(ids, mask), mask)


def _assert_same_tensors(a: str, b: str) -> None:
    with safe_open(os.path.join(a, "model.safetensors"), framework="pt") as f, \
            safe_open(os.path.join(b, "model.safetensors"), framework="pt") as g:  # fmt: skip
        assert set(f.keys()) == set(g.keys())
        for name in g.keys():
            assert torch.equal(f.get_tensor(name), g.get_tensor(name)), name


@pytest.mark.slow
def test_convert_round_trip_sharded_one_tensor_at_a_time(nemotron_ckpt, nemotron, tmp_path, monkeypatch):
    alive: list[weakref.ref] = []
    original = TensorIndex.load

    def load_one_at_a_time(self, name):
        gc.collect()
        assert all(ref() is None for ref in alive), "convert held an earlier tensor while reading the next"
        tensor = original(self, name)
        alive.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(TensorIndex, "load", load_one_at_a_time)
    dst = tmp_path / "converted"
    written = convert(nemotron_ckpt, str(dst), max_shard_size="40KB", progress=False)
    monkeypatch.undo()

    shards = sorted(p.name for p in dst.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    expected_files = [*shards, "model.safetensors.index.json", "config.json"]
    assert sorted(os.path.basename(p) for p in written) == sorted(expected_files)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(nemotron_tensors())
    for shard in shards:  # each shard within the limit unless it holds a single larger tensor
        with safe_open(str(dst / shard), framework="pt") as f:
            sizes = [f.get_tensor(k).nbytes for k in f.keys()]
        assert sum(sizes) <= 40_000 or len(sizes) == 1
    config = read_config(dst)
    assert config["model_type"] == "llama" and "block_configs" not in config and "auto_map" not in config

    converted = hetgraph.from_pretrained(str(dst))
    ids, mask = prompts()
    with torch.no_grad():
        got = converted(ids, attention_mask=mask).logits
        torch.testing.assert_close(got, nemotron(ids, attention_mask=mask).logits, atol=0, rtol=0)
    assert_logits_match(got, load_reference(str(dst)).logits(ids, mask), mask)


def test_convert_command_single_file_and_refuses_to_overwrite(nemotron_ckpt, tmp_path, capsys):
    dst = tmp_path / "out"
    assert cli_main(["convert", nemotron_ckpt, str(dst), "--quiet"]) == 0
    assert (dst / "model.safetensors").exists() and not (dst / "model.safetensors.index.json").exists()
    _assert_same_tensors(str(dst), nemotron_ckpt)
    # Converting the per-layer checkpoint again is a plain copy of the layout.
    again = tmp_path / "again"
    assert cli_main(["convert", str(dst), str(again), "--quiet"]) == 0
    assert read_config(again)["per_layer_config"] == read_config(dst)["per_layer_config"]
    capsys.readouterr()
    assert cli_main(["convert", nemotron_ckpt, str(dst), "--quiet"]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert cli_main(["convert", nemotron_ckpt, str(tmp_path / "x"), "--max-shard-size", "lots"]) == 2
    assert "not a size" in capsys.readouterr().err


# ---- Nemotron-NAS: errors ---------------------------------------------------------------------------


def _mutated(mutate) -> dict:
    d = nemotron_config()
    mutate(d)
    return d


MALFORMED = {
    "too few blocks": (lambda d: d["block_configs"].pop(), r"block_configs has 7 entries but num_hidden_layers=8"),
    "not a list": (lambda d: d.update(block_configs={"0": {}}), r"block_configs=\{'0': \{\}\} must be a list"),
    "block not a mapping": (lambda d: d["block_configs"].__setitem__(4, [1]), r"block_configs\[4\]: must be a mapping"),
    "missing ffn": (lambda d: d["block_configs"][3].pop("ffn"), r"block_configs\[3\]: missing 'ffn'"),
    "missing n_heads_in_group": (
        lambda d: d["block_configs"][1]["attention"].pop("n_heads_in_group"),
        r"block_configs\[1\]\.attention: missing n_heads_in_group",
    ),
    "n_heads_in_group not a divisor": (
        lambda d: d["block_configs"][7]["attention"].update(n_heads_in_group=3),
        r"block_configs\[7\]\.attention: n_heads_in_group=3 is invalid; allowed: a positive divisor of "
        r"num_attention_heads=4",
    ),
    "ffn_mult wrong type": (
        lambda d: d["block_configs"][7]["ffn"].update(ffn_mult="5.25"),
        r"block_configs\[7\]\.ffn: ffn_mult='5.25' is invalid",
    ),
    "missing ffn_mult": (
        lambda d: d["block_configs"][0]["ffn"].pop("ffn_mult"),
        r"block_configs\[0\]\.ffn: missing ffn_mult",
    ),
    "no_op not a bool": (
        lambda d: d["block_configs"][2]["attention"].update(no_op="yes"),
        r"block_configs\[2\]\.attention: no_op='yes' must be true or false",
    ),
    "no_op and linear": (
        lambda d: d["block_configs"][6]["ffn"].update(no_op=True),
        r"block_configs\[6\]\.ffn: no_op and replace_with_linear are both true",
    ),
    "with per_layer_config": (
        lambda d: d.update(per_layer_config={"0": {"skip": ["mlp"]}}),
        r"either block_configs or per_layer_config",
    ),
}

UNSUPPORTED = {
    "window_length": (
        lambda d: d["block_configs"][1]["attention"].update(window_length=128),
        r"block_configs\[1\]\.attention: window_length=128 is not supported by hetgraph; allowed: None",
    ),
    "sink tokens": (
        lambda d: d["block_configs"][2]["attention"].update(num_sink_tokens=4),
        r"block_configs\[2\]\.attention: num_sink_tokens=4 is not supported",
    ),
    "unshifted sink": (
        lambda d: d["block_configs"][2]["attention"].update(unshifted_sink=True),
        r"block_configs\[2\]\.attention: unshifted_sink=True is not supported",
    ),
    "sparsify ffn": (
        lambda d: d["block_configs"][3]["ffn"].update(sparsify=["up_proj"]),
        r"block_configs\[3\]\.ffn: sparsify=\['up_proj'\] is not supported",
    ),
    "unknown field": (
        lambda d: d["block_configs"][7]["ffn"].update(gated=False),
        r"block_configs\[7\]\.ffn: unknown field gated=False",
    ),
    "parallel blocks": (
        lambda d: d["block_configs"][5].update(parallel_blocks=[{}]),
        r"block_configs\[5\]: parallel_blocks=\[\{\}\] is not supported",
    ),
    "rope type": (
        lambda d: d.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
        r"rope_scaling type 'yarn' is not supported; allowed: \['default', 'llama3'\]",
    ),
}


@pytest.mark.parametrize("mutate, message", [*MALFORMED.values(), *UNSUPPORTED.values()],
                         ids=[*MALFORMED, *UNSUPPORTED])  # fmt: skip
def test_bad_block_configs_name_the_block_and_field(mutate, message):
    config = _mutated(mutate)
    with pytest.raises(hetgraph.HeteroConfigError, match=message):
        hetgraph.from_config(config)
    with pytest.raises(hetgraph.HeteroConfigError, match=message):
        inspect_config(config)


def test_null_unknown_fields_are_accepted():
    config = _mutated(lambda d: d["block_configs"][1]["attention"].update(some_future_field=None))
    assert model_spec(hetgraph.from_config(config))[1].num_key_value_heads == 4


@pytest.mark.parametrize(
    "shapes, message",
    [
        pytest.param(
            lambda s: s.update({f"model.layers.3.mlp.{p}_proj.weight": (512, HIDDEN) for p in ("gate", "up")}),
            r"wrong shape: model\.layers\.3\.mlp\.gate_proj\.weight: expected \[768, 64\], found \[512, 64\]",
            id="mlp width not ffn_mult's",
        ),
        pytest.param(
            lambda s: s.update({"model.layers.5.input_layernorm.weight": (HIDDEN,)}),
            r"unexpected: model\.layers\.5\.input_layernorm\.weight",
            id="no-op block with a norm",
        ),
        pytest.param(
            lambda s: s.pop("model.layers.6.mlp.linear_mlp.weight"),
            r"missing: model\.layers\.6\.mlp\.linear_mlp\.weight \(expected shape \[64, 64\]\)",
            id="linear block without its weight",
        ),
    ],
)
def test_checkpoint_not_matching_block_configs_names_the_tensor(tmp_path, shapes, message):
    tensors = nemotron_tensors()
    shapes(tensors)
    path = write_checkpoint(tmp_path, nemotron_config(), tensors)
    with pytest.raises(CheckpointError, match=message):
        hetgraph.from_pretrained(path)
    with pytest.raises(CheckpointError, match=message):
        convert(path, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists(), "nothing is written before every tensor is checked"


# ---- LLM-Drop -------------------------------------------------------------------------------------


def _llm_drop(family: str, attn, mlp, *, keep_dropped_weights: bool, tmp_path, checkpoint) -> tuple[str, list]:
    """A stock checkpoint with LLM-Drop's lists in its config; optionally without the dropped blocks' tensors."""
    base = checkpoint(homogeneous_config(family, num_hidden_layers=5, sliding_window=None), seed=3)
    config = read_config(base)
    config.update(drop_attn_list=attn, drop_mlp_list=mlp, auto_map={"AutoConfig": "configuration_dropped_llama.X"})
    with safe_open(os.path.join(base, "model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    dropped = [n for n in shapes if formats.llm_drop.weight_name(config, n) is None]
    if not keep_dropped_weights:
        shapes = {k: v for k, v in shapes.items() if k not in dropped}
    return write_checkpoint(tmp_path, config, shapes), dropped


@pytest.mark.parametrize(
    "family, attn, mlp, keep, attn_idx, mlp_idx",
    [
        # Indices, as LLM-Drop's recipe writes them into the unpruned model's config: its weights still there.
        ("llama", [0, 3], [3], True, [0, 3], [3]),
        # One bool per layer, as LLM-Drop's config class saves them, with the dropped tensors gone.
        ("mistral", [True, False, True, False, False], [False, False, False, False, True], False, [0, 2], [4]),
    ],
)
def test_llm_drop_loads_with_blocks_removed(family, attn, mlp, keep, attn_idx, mlp_idx, tmp_path, checkpoint):
    path, dropped = _llm_drop(family, attn, mlp, keep_dropped_weights=keep, tmp_path=tmp_path, checkpoint=checkpoint)
    model = hetgraph.from_pretrained(path)
    spec = model_spec(model)
    assert [s.index for s in spec if s.attention == "skip"] == attn_idx
    assert [s.index for s in spec if s.mlp == "skip"] == mlp_idx
    assert all(s.attention != "linear" and s.mlp != "linear" for s in spec)
    names = dict(model.named_parameters())
    assert not set(dropped) & set(names), "dropped blocks own no parameters"
    assert len(dropped) == 5 * len(attn_idx) + 4 * len(mlp_idx)  # q, k, v, o, norm; gate, up, down, norm

    ref = load_reference(path, strict=not keep)
    if keep:  # the reference, too, has nothing to do with the dropped blocks' leftover tensors
        assert ref.unused_keys == sorted(dropped)
    ids, mask = prompts()
    with torch.no_grad():
        assert_logits_match(model(ids, attention_mask=mask).logits, ref.logits(ids, mask), mask)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=8, **GREEDY)
    assert torch.equal(out, ref.greedy(ids, 8, attention_mask=mask))

    converted = tmp_path / "converted"
    convert(path, str(converted), progress=False)
    saved = read_config(converted)
    assert "drop_attn_list" not in saved and "auto_map" not in saved
    assert {int(k): sorted(v["skip"]) for k, v in saved["per_layer_config"].items()} == {
        i: sorted(b for b, idx in (("attention", attn_idx), ("mlp", mlp_idx)) if i in idx)
        for i in sorted(set(attn_idx) | set(mlp_idx))
    }
    reloaded = hetgraph.from_pretrained(str(converted))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize(
    "attn, message",
    [
        ([5], r"drop_attn_list\[0\]=5 is not a layer index; allowed: integers 0 to 4"),
        ([1, -1], r"drop_attn_list\[1\]=-1 is not a layer index"),
        ([True, False], r"drop_attn_list has 2 bools but num_hidden_layers=5"),
        ([1, True], r"drop_attn_list\[1\]=True is not a layer index"),
        ("0,1", r"drop_attn_list='0,1' must be a list"),
    ],
)
def test_llm_drop_bad_indices(attn, message):
    config = homogeneous_config("llama", num_hidden_layers=5, drop_attn_list=attn, drop_mlp_list=[])
    with pytest.raises(hetgraph.HeteroConfigError, match=message):
        hetgraph.from_config(config)


def test_llm_drop_merges_with_per_layer_config():
    config = homogeneous_config(
        "llama", num_hidden_layers=4, drop_attn_list=[1], drop_mlp_list=[1, 2],
        per_layer_config={"1": {"skip": ["mlp"]}, "2": {"intermediate_size": 64}},
    )  # fmt: skip
    spec = model_spec(hetgraph.from_config(config))
    assert [(s.attention, s.mlp, s.intermediate_size) for s in spec] == [
        ("full", "full", 128), ("skip", "skip", None), ("full", "skip", None), ("full", "full", 128),
    ]  # fmt: skip


def test_renamed_index_reads_the_stored_tensor(tmp_path):
    save_file({"old.weight": torch.arange(6.0).view(2, 3), "gone": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    index = TensorIndex.open(str(tmp_path)).rename(lambda name: {"old.weight": "new.weight"}.get(name))
    assert index.shapes == {"new.weight": (2, 3)}
    assert torch.equal(index.load("new.weight"), torch.arange(6.0).view(2, 3))


def test_stacked_index_reads_the_parts_in_order_and_only_complete_groups(tmp_path):
    parts = {f"e.{k}.w": torch.full((2,), float(k)) for k in (1, 0, 2)}
    save_file({**parts, "f.0.w": torch.zeros(2), "f.2.w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    index = TensorIndex.open(str(tmp_path)).stack(re.compile(r"(?P<m>\w)\.(?P<index>\d+)\.w"), "{m}.w")
    # e: parts 0..2, stacked in index order; f: 0 and 2 only, so left under their stored names.
    assert index.shapes == {"e.w": (3, 2), "f.0.w": (2,), "f.2.w": (2,)}
    assert torch.equal(index.load("e.w"), torch.tensor([[0.0, 0], [1, 1], [2, 2]]))
    assert index.files["e.w"] == str(tmp_path / "model.safetensors")


def test_rename_refuses_two_stored_tensors_on_one_name(tmp_path):
    save_file({"a.w": torch.zeros(1), "b.w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'a.w' and 'b.w' both map to 'w'"):
        TensorIndex.open(str(tmp_path)).rename(lambda name: "w")


# ---- inspect on the real Super-49B config -----------------------------------------------------------


def test_inspect_super_49b_bare_config(capsys):
    report = inspect_config(SUPER_49B)
    assert report.layout == "nemotron-nas" and len(report.rows) == 80
    no_attention = [r.spec.index for r in report.rows if r.spec.attention == "skip"]
    assert len(no_attention) == 31 and all(r.spec.mlp == "full" for r in report.rows)
    widths = [r.spec.intermediate_size for r in report.rows]
    assert sorted(set(widths)) == [2816, 5632, 7168, 14336, 17920, 28672]
    assert widths[0] == 14336 and widths[1] == 28672 and widths[11] == 17920 and widths[62] == 2816
    assert {(r.spec.num_attention_heads, r.spec.num_key_value_heads, r.spec.head_dim) for r in report.rows
            if r.spec.attention == "full"} == {(64, 8, 128)}  # fmt: skip
    # bf16 KV: 49 attention layers x K and V x 8 heads x 128 x 2 bytes; the parent (Llama-3.3-70B dims) has 80.
    assert report.totals.kv_bytes_per_token == 49 * 2 * 8 * 128 * 2
    assert report.parent.kv_bytes_per_token == 80 * 2 * 8 * 128 * 2
    # Llama-3.3-70B: 80 x (attention 8192 x (8192 + 2 x 1024) x 2 ... ) = 70.55B parameters.
    assert report.parent.parameters == 70_553_706_496
    assert 49.8e9 < report.totals.parameters < 49.9e9
    assert cli_main(["inspect", SUPER_49B]) == 0
    out = capsys.readouterr().out
    assert "read from the nemotron-nas layout" in out and "attention blocks: 49 full, 31 skip, 0 linear" in out


# ---- the Puzzle layouts: NemotronH-Puzzle and gpt-oss-puzzle `block_configs` -----------------------

# (block_configs entries, the per_layer_config they mean, written by hand), on the tiny case globals.
NEMOTRON_H_PUZZLE = (
    [{"block_type": "attention"}, {"block_type": "mamba"},
     {"block_type": "moe", "n_routed_experts": 6, "num_experts_per_tok": 1, "moe_intermediate_size": 24,
      "moe_shared_expert_intermediate_size": None}, {"block_type": "attention", "num_key_value_heads": 1},
     {"block_type": "mlp", "intermediate_size": 48}, {"block_type": "moe", "moe_intermediate_size": 32}],
    ["full_attention", "linear_attention", "moe", "full_attention", "mlp", "moe"],
    {2: {"n_routed_experts": 6, "num_experts_per_tok": 1, "moe_intermediate_size": 24}, 3: {"num_key_value_heads": 1},
     4: {"intermediate_size": 48}},
)
GPT_OSS_PUZZLE = (
    [{"num_local_experts": 4, "sliding_window": 5}, {"num_local_experts": 4, "sliding_window": None},
     {"num_local_experts": 2, "sliding_window": 3}, {"num_local_experts": 2, "sliding_window": None}],
    ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    {2: {"num_local_experts": 2, "sliding_window": 3}, 3: {"num_local_experts": 2}},
)  # fmt: skip


def _puzzle_pair(checkpoint, tmp_path, family: str):
    """(the per-layer checkpoint the Puzzle layout means, the same tensors under the Puzzle config)."""
    from support.models import OTHER_FAMILIES

    base = {k: v for k, v in OTHER_FAMILIES[family].items() if k != "per_layer_config"}
    blocks, types, per_layer = NEMOTRON_H_PUZZLE if family == "nemotron_h" else GPT_OSS_PUZZLE
    type_key = "layers_block_type" if family == "nemotron_h" else "layer_types"
    meant = checkpoint({**base, type_key: types, "num_hidden_layers": len(types), "per_layer_config": per_layer})
    puzzle = tmp_path / "puzzle"
    os.makedirs(puzzle)
    with safe_open(os.path.join(meant, "model.safetensors"), framework="pt") as f:
        # Puzzle stores `model.*` where stock NemotronH stores `backbone.*`; add what is not read.
        tensors = {k.replace("backbone.", "model.", 1): f.get_tensor(k) for k in f.keys()}
    if family == "nemotron_h":
        tensors["mtp.layers.0.norm.weight"] = torch.ones(base["hidden_size"])
        config = {**{k: v for k, v in base.items() if k != "layers_block_type"}, "model_type": "nemotron_h_puzzle",
                  "architectures": ["NemotronHPuzzleForCausalLM"], "num_hidden_layers": None, "block_configs": blocks,
                  "num_nextn_predict_layers": 1, "mtp_block_configs": [{"block_type": "attention"}]}
    else:
        tensors["model.layers.1.self_attn.k_scale"] = torch.ones(())
        config = {**base, "model_type": "gpt_oss_puzzle", "architectures": ["GptOssPuzzleForCausalLM"],
                  "layer_types": types, "block_configs": blocks}
    save_file(tensors, os.path.join(puzzle, "model.safetensors"), metadata={"format": "pt"})
    (puzzle / "config.json").write_text(json.dumps(config))
    return meant, str(puzzle)


@pytest.mark.parametrize("family", ["nemotron_h", "gpt_oss"])
def test_puzzle_layouts_load_as_the_per_layer_model_they_mean(checkpoint, tmp_path, family):
    """The reference runs the per-layer checkpoint written from the hand-made reading above."""
    meant, puzzle = _puzzle_pair(checkpoint, tmp_path, family)
    model = hetgraph.from_pretrained(puzzle)
    assert model_spec(model).layers == model_spec(hetgraph.from_pretrained(meant)).layers
    ids, mask = family_prompts(VOCAB, length=10, pad=(0, 3), seed=4)
    with torch.no_grad():
        got = model(ids, attention_mask=mask).logits
    assert_logits_match(got, load_any_reference(meant).logits(ids, mask), mask)
    assert inspect_config(puzzle).layout == f"{family}_puzzle"


@pytest.mark.parametrize(
    "family,change,message",
    [
        ("gpt_oss", {"quantization_config": {"quant_method": "mxfp4"}}, "MXFP4 expert weights"),
        ("gpt_oss", {"layer_types": ["full_attention"] * 4}, "disagrees with block_configs' windows"),
        ("nemotron_h", {"hybrid_override_pattern": "M*E*-E"}, "disagrees with block_configs' block types"),
        ("nemotron_h", {"block_configs": [{"block_type": "attention", "sliding_window": 8}] * 6},
         "block_configs[0]: field sliding_window=8 is not supported"),
        ("nemotron_h", {"block_configs": [{"block_type": "moe", "moe_latent_size": 16 + i} for i in range(6)]},
         "block_configs[1]: moe_latent_size=17 differs"),
        ("nemotron_h", {"block_configs": [{"block_type": "conv"}] * 6}, "block_type='conv' is not a NemotronH block"),
    ],
    ids=["mxfp4", "layer-types", "pattern", "window", "latent", "block-type"],
)
def test_puzzle_layouts_refuse_what_they_cannot_read_naming_the_field(checkpoint, tmp_path, family, change, message):
    _, puzzle = _puzzle_pair(checkpoint, tmp_path, family)
    config = {**read_config(puzzle), **change}
    with pytest.raises(HeteroConfigError, match=re.escape(message)):
        hetgraph.from_config(config)


def test_an_unknown_block_configs_layout_is_named_not_taken_for_nemotron_nas(tmp_path):
    d = {"model_type": "qwen3_puzzle", "hidden_size": 64, "vocab_size": 128, "num_attention_heads": 4,
         "block_configs": [{"num_key_value_heads": 2}]}  # fmt: skip
    want = r"`block_configs` but model_type='qwen3_puzzle'.*does not read that layout"
    with pytest.raises(HeteroConfigError, match=want) as err:
        hetgraph.from_config(d)
    assert "n_heads_in_group" not in str(err.value) and "ffn_mult" not in str(err.value)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(HeteroConfigError, match=want):
        inspect_config(str(tmp_path))


def test_nemotron_nas_is_detected_by_model_type_or_architecture():
    from hetgraph import formats

    d = nemotron_config()
    assert formats.detect(d).name == "nemotron-nas"
    assert formats.detect({**d, "model_type": "deci"}).name == "nemotron-nas"
    assert formats.detect({**d, "model_type": None}).name == "nemotron-nas"  # DeciLMForCausalLM
    assert formats.detect({**d, "model_type": None, "architectures": None, "block_configs": None}) is None


# ---- writing the Nemotron-NAS layout (what serving engines read) ------------------------------------


def _meaning(block: dict, hidden: int = HIDDEN) -> tuple:
    """What one block config means, read independently: (attention, KV heads, ffn, MLP width)."""
    attn, ffn = block["attention"], block["ffn"]
    kinds = ["no_op" if sub["no_op"] else "linear" if sub["replace_with_linear"] else "full" for sub in (attn, ffn)]
    kv = HEADS // attn["n_heads_in_group"] if kinds[0] == "full" else None
    width = -(-int(2 * round(ffn["ffn_mult"], 6) * hidden / 3) // 256) * 256 if kinds[1] == "full" else None
    return kinds[0], kv, kinds[1], width


def test_convert_to_nemotron_nas_writes_what_the_layout_means_and_round_trips(nemotron_ckpt, nemotron, tmp_path):
    """nemotron-nas -> per-layer -> nemotron-nas: the same blocks by DeciLM's meaning (ffn_mult may be
    another number for the same width), the same tensors, and the reference reading the written
    block_configs itself computes hetgraph's logits; hetgraph reads it back to the same table."""
    per_layer, nas = tmp_path / "per-layer", tmp_path / "nas"
    convert(nemotron_ckpt, str(per_layer), progress=False)
    convert(str(per_layer), str(nas), to="nemotron-nas", progress=False)
    written, original = read_config(nas), read_config(nemotron_ckpt)
    assert written["model_type"] == "nemotron-nas" and written["architectures"] == ["DeciLMForCausalLM"]
    assert "per_layer_config" not in written and "rope_parameters" not in written
    assert written["rope_scaling"] == original["rope_scaling"] and written["rope_theta"] == original["rope_theta"]
    assert [_meaning(b) for b in written["block_configs"]] == [_meaning(b) for b in original["block_configs"]]
    kind = {"no_op": "no_op", "linear": "linear"}
    assert [_meaning(b) for b in written["block_configs"]] == [
        (kind.get(a, "full"), kv, kind.get(f, "full"), w) for a, f, kv, w in LAYERS]  # fmt: skip
    _assert_same_tensors(str(nas), nemotron_ckpt)
    _assert_reads_as(str(nas), nemotron)


def _saved(tmp_path, name: str, **config) -> str:
    model = hetgraph.from_config(homogeneous_config(**config))
    path = str(tmp_path / name)
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "config,message",
    [
        (dict(intermediate_size=256, per_layer_config={1: {"num_attention_heads": 2, "num_key_value_heads": 2}}),
         "layer 1 has num_attention_heads=2"),
        (dict(intermediate_size=256, per_layer_config={2: {"sliding_window": 4}}), "layer 2 has a sliding window of 4"),
        (dict(intermediate_size=256, per_layer_config={3: {"intermediate_size": 97}}),
         "layer 3 has intermediate_size=97"),
        (dict(family="qwen2", intermediate_size=256), "model_type='qwen2' cannot be written"),
    ],
    ids=["query-heads", "window", "width", "family"],
)
def test_convert_to_nemotron_nas_refuses_what_the_layout_cannot_express(tmp_path, config, message):
    """Named, before anything is written."""
    src = _saved(tmp_path, "src", **config)
    dst = tmp_path / "nas"
    with pytest.raises(HeteroConfigError, match=re.escape(message)):
        convert(src, str(dst), to="nemotron-nas", progress=False)
    assert not dst.exists() and sorted(os.listdir(tmp_path)) == ["src"]


def test_convert_command_writes_nemotron_nas_from_a_hetgraph_model(tmp_path, capsys):
    """A model built from per_layer_config (KV heads, widths, removed and linear blocks) through the
    CLI; engines' reading of the file (the reference's) gives hetgraph's logits."""
    plan = {0: {"skip": ["attention"]}, 1: {"num_key_value_heads": 1, "intermediate_size": 512},
            2: {"linear": ["mlp"]}, 3: {"skip": ["mlp"], "num_key_value_heads": 4}}  # fmt: skip
    src = _saved(tmp_path, "src", num_hidden_layers=4, intermediate_size=256, per_layer_config=plan)
    dst = tmp_path / "nas"
    assert cli_main(["convert", src, str(dst), "--to", "nemotron-nas", "--quiet"]) == 0
    blocks = read_config(dst)["block_configs"]
    assert [_meaning(b) for b in blocks] == [("no_op", None, "full", 256), ("full", 1, "full", 512),
                                             ("full", 2, "linear", None), ("full", 4, "no_op", None)]
    model = hetgraph.from_pretrained(src)
    ids, mask = prompts()
    with torch.no_grad():
        assert_logits_match(model(ids, attention_mask=mask).logits, load_reference(str(dst)).logits(ids, mask), mask)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli_main(["convert", src, str(tmp_path / "x"), "--to", "gguf"])
    assert exit_.value.code == 2 and "invalid choice: 'gguf'" in capsys.readouterr().err
