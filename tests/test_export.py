"""`hetgraph.export`: torch.export programs and AOTInductor packages of the specialized graph.

Structure is read from the saved programs' own `nn_module_stack` metadata (not hetgraph's tags);
numbers are checked against the independent reference and `model.generate`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import torch

import hetgraph
import hetgraph.runtime
from hetgraph.cli import main
from hetgraph.contract import model_spec
from hetgraph.export.trace import _trace, specialize
from hetgraph.export.wrappers import _Logits
from hetgraph.passes import EXPORT, passes_for
from hetgraph.runtime import FORMAT_VERSION, generate_with_exported, read_metadata
from support.fixtures import model_fixtures
from support.fresh_python import run_python
from support.models import GREEDY, VOCAB, hetero_config
from support.models import LLAMA_FAMILIES as FAMILIES

BATCH, PROMPT, NEW, CACHE = 2, 6, 14, 24
SDPA = torch.ops.aten.scaled_dot_product_attention.default
# Modules of a decoder layer that belong to each block: removed with it.
BLOCK_MODULES = {"attention": {"self_attn", "input_layernorm"}, "mlp": {"mlp", "post_attention_layernorm"}}
_IN_LAYER = re.compile(r"layers\.(\d+)(?:\.(\w+))?")


def prompt(length=PROMPT, batch=BATCH, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def where(node) -> tuple[int | None, str | None]:
    """(layer, submodule of the layer or None for the layer's own code) from the node's nn_module_stack."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values()]
    match = _IN_LAYER.search(paths[-1]) if paths else None
    return (int(match.group(1)), match.group(2)) if match else (None, None)


def calls(ep):
    return [n for n in ep.graph.nodes if n.op == "call_function"]


def per_layer(ep, op) -> dict[int, int]:
    return dict(Counter(where(n)[0] for n in calls(ep) if n.target == op and where(n)[0] is not None))


def config_layers(config: dict) -> list[dict]:
    """Per layer, from a config.json dict alone: removed blocks, and the KV shape a cache holds."""
    heads = config["num_attention_heads"]
    layers = []
    for i in range(config["num_hidden_layers"]):
        over = config["per_layer_config"].get(str(i), {})
        removed = set(over.get("skip", []))
        sliding = over.get("sliding_window", config.get("sliding_window"))
        window = sliding or over.get("attention_chunk_size")
        head_dim = over.get("head_dim", config.get("head_dim") or config["hidden_size"] // heads)
        kv = (over.get("num_key_value_heads", config["num_key_value_heads"]), head_dim)
        layers.append({"removed": removed, "window": window, "sliding": bool(sliding), "kv": kv})
    return layers


# Llama (full, sliding and chunked layers, removed blocks) by default; Mistral, Qwen2 and Qwen3 build
# on the same export code and run with -m slow.
family, ckpt, model, ref = model_fixtures(
    [f if f == "llama" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]
)


@pytest.fixture(scope="module")
def config(ckpt):
    """The checkpoint's config.json: the family's defaults written out (Qwen3's head_dim=128)."""
    with open(os.path.join(ckpt, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def prefill(model, tmp_path_factory):
    return hetgraph.export(model, tmp_path_factory.mktemp("prefill"), input_ids=prompt())


@pytest.fixture(scope="module")
def decode(model, tmp_path_factory):
    return hetgraph.export(
        model, tmp_path_factory.mktemp("decode"), decode=True, batch_size=BATCH, max_cache_len=CACHE
    )


def assert_specialized(ep, config, prefill: bool = True):
    """One attention op per attention-bearing layer, except the sliding layers of a prefill program
    (any prompt length): banded attention, unfolded keys and no SDPA; no op of a removed block; the
    residual adds of kept ones."""
    layers = config_layers(config)
    attention = {i for i, layer in enumerate(layers) if "attention" not in layer["removed"]}
    banded = {i for i in attention if layers[i]["sliding"]} if prefill else set()
    assert per_layer(ep, SDPA) == {i: 1 for i in attention - banded}
    unfolds = Counter(where(n)[0] for n in calls(ep) if n.target == torch.ops.aten.unfold.default)
    assert set(unfolds) == banded, f"layers with unfolded (banded) keys: {sorted(unfolds)}, sliding: {sorted(banded)}"
    assert not [n for n in calls(ep) if n.target == torch.ops.aten.zeros_like.default]
    ops = Counter(where(n)[0] for n in calls(ep))
    for i, layer in enumerate(layers):
        gone = set().union(*(BLOCK_MODULES[b] for b in layer["removed"]))
        leftover = [n.name for n in calls(ep) if where(n)[0] == i and where(n)[1] in gone]
        assert not leftover, f"layer {i}: ops of removed blocks {layer['removed']}: {leftover}"
        adds = [n for n in calls(ep) if where(n) == (i, None) and n.target == torch.ops.aten.add.Tensor]
        assert len(adds) == 2 - len(layer["removed"]), f"layer {i}: residual adds"
        if len(layer["removed"]) == 2:
            assert ops[i] == 0, f"layer {i} has no block left but {ops[i]} ops"


def test_prefill_program_is_specialized(prefill, config):
    assert_specialized(torch.export.load(prefill.prefill), config)


@torch.no_grad()
def test_prefill_program_matches_reference(prefill, ref):
    program = torch.export.load(prefill.prefill).module()
    for length in (1, PROMPT, 17):  # any prompt length up to the maximum, not only the traced one
        ids = prompt(length)
        torch.testing.assert_close(program(ids), ref.logits(ids), atol=1e-4, rtol=0)


def test_decode_programs_are_specialized(decode, config):
    assert_specialized(torch.export.load(decode.prefill), config)
    step = torch.export.load(decode.decode)
    assert_specialized(step, config, prefill=False)
    # The cache writes survive the passes' dead-code elimination: keys, values and length per attention layer.
    mutating = [n for n in calls(step) if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable]
    writes = Counter(where(n)[0] for n in mutating)
    attention = [i for i, layer in enumerate(config_layers(config)) if "attention" not in layer["removed"]]
    assert dict(writes) == {i: 3 for i in attention}


@torch.no_grad()
def test_decode_state_holds_each_layers_kv(decode, config):
    _, state = torch.export.load(decode.prefill).module()(prompt())
    expected = {}
    for i, layer in enumerate(config_layers(config)):
        if "attention" not in layer["removed"]:
            shape = (BATCH, layer["kv"][0], min(layer["window"] or CACHE, CACHE), layer["kv"][1])
            expected.update({f"layers.{i}.keys": shape, f"layers.{i}.values": shape, f"layers.{i}.length": ()})
    assert {name: tuple(t.shape) for name, t in state.items()} == expected
    assert all(int(state[name]) == PROMPT for name in state if name.endswith("length"))
    # The prompt length stays symbolic over the export range (1 .. max_cache_len) in the Llama families.
    meta = read_metadata(decode.prefill)
    assert (meta["min_prompt_len"], meta["max_prompt_len"]) == (1, CACHE)


def test_decode_generates_like_generate(decode, model, ref):
    """Windows (3, 5) and chunks (4) wrap several times; layer 0 holds no attention."""
    ids = prompt()
    out = generate_with_exported(decode.prefill, decode.decode, ids, NEW)
    want = model.generate(ids, max_new_tokens=NEW, **GREEDY)
    assert torch.equal(out, want), f"\nexported {out.tolist()}\ngenerate {want.tolist()}"
    assert torch.equal(out, ref.greedy(ids, NEW))


def test_passes_on_exported_graph_change_exactly_once(model):
    """The eliminate pass changes the exported graph, a second run changes nothing, outputs are unchanged."""
    ids = prompt()
    ep, records = _trace(model, _Logits(model), (ids,), None)
    changed = {r.name: r.changed for r in records}
    assert changed["eliminate_skipped_blocks"], changed
    assert not any(r.changed for r in specialize(ep, model_spec(model))[1])
    assert [p.__name__ for p in passes_for(EXPORT)] == [r.name for r in records]
    raw = torch.export.export(_Logits(model), (ids,), strict=False)
    assert [n for n in calls(raw) if n.target == torch.ops.aten.zeros_like.default], "the case needs removed blocks"
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(ids), raw.module()(ids), rtol=0, atol=0)


@pytest.fixture(scope="module")
def llama(checkpoint, tmp_path_factory):
    """The llama case, exported both ways, with what the model itself says."""
    path = checkpoint(hetero_config("llama"))
    model = hetgraph.from_pretrained(path)
    out = tmp_path_factory.mktemp("llama")
    prefill = hetgraph.export(model, out / "prefill", input_ids=prompt())
    decode = hetgraph.export(model, out / "decode", decode=True, batch_size=BATCH, max_cache_len=CACHE)
    return model, prefill, decode, out


_WITHOUT_HETGRAPH = textwrap.dedent(
    """
    import importlib.util, sys, torch
    prefill_only, prefill, decode, ids_file, out_file, runtime_file = sys.argv[1:]
    ids = torch.load(ids_file)
    with torch.no_grad():
        logits = torch.export.load(prefill_only).module()(ids)
        # The README's loop: the cache is a dict of tensors that decode updates in place.
        step_logits, state = torch.export.load(prefill).module()(ids)
        step = torch.export.load(decode).module()
        token = step_logits[:, -1].argmax(-1, keepdim=True)
        tokens = [ids, token]
        for _ in range(NEW - 1):
            token = step(token, state)[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
    # hetgraph's runtime module, loaded from its file alone: what a user copies next to the programs.
    spec = importlib.util.spec_from_file_location("copied_runtime", runtime_file)
    runtime = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runtime)
    generated = runtime.generate_with_exported(prefill, decode, ids, NEW)
    meta = runtime.read_metadata(prefill)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("hetgraph", "transformers"))
    torch.save({"logits": logits, "tokens": torch.cat(tokens, 1), "generated": generated, "meta": meta,
                "leaked": leaked}, out_file)
    """
).replace("NEW", str(NEW))


@pytest.mark.slow  # slow: a fresh interpreter that exports and runs; the default run's budget
def test_programs_run_without_hetgraph(llama):
    model, prefill, decode, out = llama
    ids = prompt()
    torch.save(ids, out / "ids.pt")
    script = out / "run.py"
    script.write_text(_WITHOUT_HETGRAPH)
    paths = [prefill.prefill, decode.prefill, decode.decode, out / "ids.pt", out / "o.pt", hetgraph.runtime.__file__]
    proc = subprocess.run([sys.executable, script, *paths], capture_output=True, text=True, cwd=out, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out / "o.pt")
    assert got["leaked"] == []
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], model(ids).logits, atol=1e-5, rtol=0)
    assert torch.equal(got["tokens"], model.generate(ids, max_new_tokens=NEW, **GREEDY))
    assert torch.equal(got["generated"], got["tokens"])
    assert got["meta"] == read_metadata(decode.prefill)
    assert (got["meta"]["format_version"], got["meta"]["program"]) == (FORMAT_VERSION, "prefill")


# ---- where the programs go: one .pt2 file, or a directory ----------------------------------------


def test_pt2_path_writes_that_one_file(llama, tmp_path):
    """The README's promise: `hetgraph.export(model, "model.pt2", input_ids=ids)` writes the file
    `model.pt2`, loadable with `torch.export.load`."""
    model = llama[0]
    path = str(tmp_path / "sub" / "model.pt2")  # a str, as the README writes it; the folder is created
    result = hetgraph.export(model, path, input_ids=prompt())
    assert os.listdir(tmp_path / "sub") == ["model.pt2"] and os.path.isfile(path)
    assert (result.prefill, result.decode, result.prefill_package) == (path, None, None)
    ids = prompt(9)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(path).module()(ids), model(ids).logits, atol=1e-5, rtol=0)
    meta = read_metadata(path)
    assert (meta["format_version"], meta["program"], meta["batch_size"]) == (FORMAT_VERSION, "prefill", BATCH)


def test_pt2_path_package_lands_next_to_it(llama, tmp_path, monkeypatch):
    """`package=True` with a file path: `model.aoti.pt2` beside `model.pt2` (the compile is stubbed:
    test_package_runs_like_the_program compiles for real, into a directory)."""
    compiled = {}

    def fake_package(ep, file, meta):
        compiled[file] = json.loads(meta)
        return file

    monkeypatch.setattr(hetgraph.export.write, "_package", fake_package)
    path = tmp_path / "model.pt2"
    result = hetgraph.export(llama[0], path, input_ids=prompt(), package=True)
    package = str(tmp_path / "model.aoti.pt2")
    assert (result.prefill, result.prefill_package) == (str(path), package)
    assert list(compiled) == [package] and compiled[package] == read_metadata(path)
    assert os.listdir(tmp_path) == ["model.pt2"]


def test_pt2_path_refuses_decode_and_directories(llama, tmp_path):
    model = llama[0]
    with pytest.raises(ValueError, match=r"decode=True writes two programs .* needs a directory, got the file path"):
        hetgraph.export(model, tmp_path / "model.pt2", input_ids=prompt(), decode=True, max_cache_len=CACHE)
    assert not os.listdir(tmp_path)
    (tmp_path / "old.pt2").mkdir()  # what an export to "old.pt2" wrote before file paths existed
    with pytest.raises(ValueError, match=r"old.pt2' is a directory; a path ending in .pt2 names the one file"):
        hetgraph.export(model, tmp_path / "old.pt2", input_ids=prompt())
    assert os.listdir(tmp_path) == ["old.pt2"] and not os.listdir(tmp_path / "old.pt2")


def test_directory_path_keeps_one_file_per_program(prefill, decode):
    assert sorted(os.listdir(os.path.dirname(prefill.prefill))) == ["prefill.pt2"]
    assert sorted(os.listdir(os.path.dirname(decode.prefill))) == ["decode.pt2", "prefill.pt2"]
    assert [read_metadata(p)["program"] for p in (decode.prefill, decode.decode)] == ["prefill", "decode"]


def test_hetgraph_export_is_the_function_and_the_module():
    """After `import hetgraph`, `hetgraph.export(...)` exports and `hetgraph.export.read_metadata`
    (the README's spelling) is the runtime's; a fresh interpreter, so only `import hetgraph` ran."""
    run_python(textwrap.dedent(
        """
        import hetgraph, hetgraph.runtime as runtime
        from hetgraph.export import export
        assert callable(hetgraph.export) and "export" in hetgraph.__all__
        assert hetgraph.export.read_metadata is runtime.read_metadata
        assert hetgraph.export.generate_with_exported is hetgraph.generate_with_exported is runtime.generate_with_exported
        assert hetgraph.export.export is export
        try:
            hetgraph.export(object(), "x.pt2", decode=True)
        except ValueError as e:  # the call reached export's own checks
            assert "needs a directory" in str(e), e
        else:
            raise AssertionError("hetgraph.export(...) did not call export")
        """
    ))


@pytest.mark.slow
def test_package_runs_like_the_program(llama, tmp_path):
    """The one AOTInductor compile of the default suite: the plain prefill program."""
    model, _, _, _ = llama
    result = hetgraph.export(model, tmp_path, input_ids=prompt(), package=True)
    assert result.prefill_package == str(tmp_path / "prefill.aoti.pt2")
    package = torch._inductor.aoti_load_package(result.prefill_package)
    program = torch.export.load(result.prefill).module()
    with torch.no_grad():
        for length in (1, PROMPT, 11):
            ids = prompt(length)
            torch.testing.assert_close(package(ids), program(ids), atol=1e-4, rtol=0)
    assert json.loads(package.get_metadata()["hetgraph.json"])["batch_size"] == BATCH
    # With its input checks on, a package names expected and given shapes (and still takes 1-token prompts).
    env = dict(os.environ, AOTI_RUNTIME_CHECK_INPUTS="1")
    args = [sys.executable, "-c", _PACKAGE_WRONG_BATCH, result.prefill_package]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-2:] == ["ok (2, 1, 128)", "input_handles[0]: unmatched dim value at 0, expected: 2, but got: 3"]


_PACKAGE_WRONG_BATCH = textwrap.dedent(
    """
    import sys, torch
    package = torch._inductor.aoti_load_package(sys.argv[1])
    print("ok", tuple(package(torch.zeros(2, 1, dtype=torch.long)).shape))
    try:
        package(torch.zeros(3, 4, dtype=torch.long))
    except RuntimeError as e:
        print(str(e).strip())
    """
)


@pytest.mark.slow
def test_decode_packages_generate_like_generate(llama, tmp_path):
    model, _, _, _ = llama
    result = hetgraph.export(model, tmp_path, decode=True, batch_size=BATCH, max_cache_len=CACHE, package=True)
    ids = prompt()
    out = generate_with_exported(result.prefill_package, result.decode_package, ids, NEW)
    assert torch.equal(out, model.generate(ids, max_new_tokens=NEW, **GREEDY))


# ---- bad input -----------------------------------------------------------------------------------


def test_export_refuses_shapes_it_cannot_serve(llama, tmp_path):
    model = llama[0]
    with pytest.raises(ValueError, match=r"7 tokens \(shape \(2, 7\)\); max_cache_len=6 serves at most 6"):
        hetgraph.export(model, tmp_path, input_ids=prompt(7), decode=True, max_cache_len=6)
    with pytest.raises(ValueError, match=r"input_ids has batch 2 \(shape \(2, 6\)\), batch_size=3"):
        hetgraph.export(model, tmp_path, input_ids=prompt(), batch_size=3)
    with pytest.raises(ValueError, match="decode=True needs max_cache_len"):
        hetgraph.export(model, tmp_path, decode=True)
    with pytest.raises(ValueError, match=r"\[batch, prompt_len\] tensor, got \(6,\)"):
        hetgraph.export(model, tmp_path, input_ids=prompt()[0])
    with pytest.raises(TypeError, match="not built by hetgraph"):
        hetgraph.export(torch.nn.Linear(2, 2), tmp_path)
    assert not os.listdir(tmp_path)


def test_loaded_programs_name_expected_and_given_shapes(llama):
    _, prefill, decode, _ = llama
    program = torch.export.load(prefill.prefill).module()  # torch.export's own checks
    with pytest.raises(RuntimeError, match=r"args\[0\].shape\[0\] to be equal to 2, but got 3"):
        program(prompt(batch=3))
    with pytest.raises(RuntimeError, match=r"args\[0\].shape\[1\] to be <= 256, but got 300"):
        program(prompt(300))
    prefill_step, step = (torch.export.load(p).module() for p in (decode.prefill, decode.decode))
    _, state = prefill_step(prompt())
    with pytest.raises(RuntimeError, match=r"args\[0\].shape\[1\] to be equal to 1, but got 2"):
        step(prompt(2), state)
    state["layers.1.keys"] = state["layers.1.keys"][:, :, :2]
    with pytest.raises(RuntimeError, match=r"\['layers.1.keys'\].shape\[2\] to be equal to 3, but got 2"):
        step(prompt(1), state)
    with pytest.raises(ValueError, match=r"serve batch 2, input_ids has shape \(3, 6\)"):
        generate_with_exported(decode.prefill, decode.decode, prompt(batch=3), 4)
    with pytest.raises(ValueError, match=r"prompts of up to 24 tokens, input_ids has shape \(2, 25\)"):
        generate_with_exported(decode.prefill, decode.decode, prompt(25), 1)
    with pytest.raises(ValueError, match=r"need 26 cache positions; max_cache_len=24"):
        generate_with_exported(decode.prefill, decode.decode, prompt(), 21)


# ---- command line ---------------------------------------------------------------------------------


@pytest.mark.slow  # export and show-graph again, through the CLI
def test_cli_export_and_show_graph(llama, checkpoint, tmp_path, capsys):
    src = checkpoint(hetero_config("llama"))
    out = tmp_path / "out"
    code = main(["export", src, "--out", str(out), "--decode", "--batch-size", "1", "--max-cache-len", "16"])
    assert code == 0
    assert sorted(os.listdir(out)) == ["decode.pt2", "prefill.pt2"]
    ids = prompt(batch=1)
    model = hetgraph.from_pretrained(src)
    got = generate_with_exported(str(out / "prefill.pt2"), str(out / "decode.pt2"), ids, 5)
    assert torch.equal(got, model.generate(ids, max_new_tokens=5, **GREEDY))
    capsys.readouterr()

    assert main(["export", src, "--out", str(tmp_path / "bad"), "--decode"]) == 2
    assert "needs max_cache_len" in capsys.readouterr().err

    assert main(["show-graph", src]) == 0
    text = capsys.readouterr().out
    spec = model_spec(model)
    blocks = re.split(r"^layer (\d+): ", text, flags=re.M)
    listing = {int(blocks[k]): blocks[k + 1] for k in range(1, len(blocks), 2)}
    assert sorted(listing) == list(range(len(spec)))
    # The window layers (1, 5) are banded (matmuls over unfolded keys), the chunked and full ones SDPA.
    forms = {1: "banded attention", 2: "per-chunk is_causal SDPA", 3: "is_causal SDPA", 5: "banded attention"}
    for i, s in enumerate(spec):
        assert listing[i].startswith(s.describe())
        assert ("form: " in listing[i]) == s.has_attention == (i in forms), listing[i]
        assert f"form: {forms.get(i)}" in listing[i] or i not in forms, listing[i]
        assert ("scaled_dot_product_attention x1" in listing[i]) == ("SDPA" in forms.get(i, ""))
        assert ("unfold x1" in listing[i]) == ("banded" in forms.get(i, ""))
    assert "attention (" not in listing[0] and "mlp (" in listing[0]  # the removed block's ops are gone
    assert "(no ops)" in listing[4]
    assert "2 SDPA op(s) for 4 attention layer(s)" in text
