"""Export the specialized graphs: torch.export programs (`.pt2`) and AOTInductor packages.

    hetgraph.export(model, "out", input_ids=ids)                       # out/prefill.pt2
    hetgraph.export(model, "out", decode=True, batch_size=1, max_cache_len=256)  # + out/decode.pt2
    hetgraph.export(model, "out", package=True)                        # + out/prefill.aoti.pt2

Each program is `torch.export.export` of a small wrapper around the model (hooks included, so the
per-window masks and per-head-dim RoPE are traced in), then hetgraph's passes run on the exported
aten graph: removed blocks leave no op, one mask per distinct window. The programs are plain
torch: `torch.export.load(path).module()` runs them in a process that never imports hetgraph, and
refuses inputs of other shapes with torch's message naming the expected and the given size.

Programs (B is fixed at export; T may be 1 .. the export's maximum prompt length; with mamba
layers (NemotronH) the prefill serves exactly the example prompt's length, which the metadata's
`min_prompt_len` / `max_prompt_len` say):

* `prefill.pt2` without `decode`: `(input_ids[B, T]) -> logits[B, T, V]`.
* with `decode=True`, the cache is explicit state, a dict of tensors the caller holds:
  `prefill.pt2`: `(input_ids[B, T]) -> (logits[B, T, V], state)`, where `state` is a fresh cache
  filled with the prompt: per attention layer i, `layers.{i}.keys` / `layers.{i}.values`
  `[B, kv_heads_i, min(window_i, max_cache_len), head_dim_i]` and `layers.{i}.length` (an int64
  scalar, the tokens seen); per mamba layer i (NemotronH), `layers.{i}.conv_states`
  `[B, conv_dim_i, conv_kernel]` and `layers.{i}.recurrent_states` `[B, heads_i, head_dim_i, state]`
  (fp32); the same layout as `hetgraph.make_cache`.
  `decode.pt2`: `(input_ids[B, 1], state) -> logits[B, 1, V]`; it updates `state` in place.
  `generate_with_exported` is the greedy loop over the two. Prompts in a batch share one length
  (no padding mask).

AOTInductor packages specialize on input strides (pass contiguous int64 `input_ids`) and check
input shapes only with `AOTI_RUNTIME_CHECK_INPUTS=1` in the environment; `.pt2` programs always do.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import DummyLayer, LinearAttentionLayer, StaticLayer

from hetgraph.build import model_spec
from hetgraph.passes import PASSES, PassContext, PassRecord, run_passes
from hetgraph.passes._graph import compute_nodes, tag

logger = logging.getLogger(__name__)

METADATA = "hetgraph.json"  # extra file in each .pt2: what the program serves
# Every pass but group_layer_variants: its shared submodules are not part of an ExportedProgram's signature.
EXPORT_PASSES = tuple(p for p in PASSES if p.__name__ != "group_layer_variants")
# Dtype and device assertions export inserts: checks, not compute; left out of listings.
_BOOKKEEPING = {torch.ops.aten._assert_tensor_metadata.default}


@dataclass
class Exported:
    """What `export` wrote, and the programs it wrote them from."""

    prefill: str
    decode: str | None = None
    prefill_package: str | None = None
    decode_package: str | None = None
    programs: dict[str, torch.export.ExportedProgram] = field(default_factory=dict)
    records: dict[str, list[PassRecord]] = field(default_factory=dict)  # program -> what each pass did


class _Logits(nn.Module):
    """The logits of an uncached forward: the prefill program without decode."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class _CachedLM(nn.Module):
    """A forward over a `make_cache` cache whose tensors are the caller's `state` dict."""

    continues = False  # True for decode: the state holds a prompt already (mamba layers then take their step path)

    def __init__(self, model: nn.Module, batch_size: int, max_cache_len: int):
        from hetgraph.cache import make_cache

        super().__init__()
        self.model = model
        # The layout (which layers hold which shapes) is make_cache's; its tensors are swapped per call.
        self.cache = make_cache(model, batch_size=batch_size, max_cache_len=max_cache_len)
        carried = (StaticLayer, LinearAttentionLayer, DummyLayer)
        layers = self.cache.layers
        other = [f"layer {i}: {type(x).__name__}" for i, x in enumerate(layers) if not isinstance(x, carried)]
        if other:
            raise NotImplementedError(
                f"export(decode=True) carries attention caches (StaticLayer, StaticWindowLayer) and mamba "
                f"states (LinearAttentionLayer) as state; not yet {other}"
            )
        self.held = {i: lay for i, lay in enumerate(layers) if not isinstance(lay, DummyLayer)}

    @staticmethod
    def _tensors(layer) -> dict[str, torch.Tensor]:
        """The tensors a cache layer carries between calls, by state name."""
        if isinstance(layer, LinearAttentionLayer):
            return {"conv_states": layer.conv_states[0], "recurrent_states": layer.recurrent_states[0]}
        return {"keys": layer.keys, "values": layer.values, "length": layer.cumulative_length}

    def state_layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {
            f"layers.{i}.{name}": (tuple(t.shape), t.dtype)
            for i, layer in self.held.items()
            for name, t in self._tensors(layer).items()
        }

    def new_state(self) -> dict[str, torch.Tensor]:
        device = self.model.device
        return {name: torch.zeros(shape, dtype=dt, device=device) for name, (shape, dt) in self.state_layout().items()}

    def step(self, input_ids: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        for i, layer in self.held.items():
            if isinstance(layer, LinearAttentionLayer):
                layer.conv_states[0] = state[f"layers.{i}.conv_states"]
                layer.recurrent_states[0] = state[f"layers.{i}.recurrent_states"]
                layer.has_previous_state[0] = self.continues
            else:
                layer.keys, layer.values = state[f"layers.{i}.keys"], state[f"layers.{i}.values"]
                layer.cumulative_length = state[f"layers.{i}.length"]
        return self.model(input_ids=input_ids, cache=self.cache, use_cache=True).logits


class _Prefill(_CachedLM):
    def forward(self, input_ids: torch.Tensor):
        state = self.new_state()
        return self.step(input_ids, state), state


class _Decode(_CachedLM):
    continues = True

    def forward(self, input_ids: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.step(input_ids, state)


def specialize(ep: torch.export.ExportedProgram, spec) -> list[PassRecord]:
    """Run hetgraph's passes on an exported program's graph, in place; the program stays valid."""
    _, records = run_passes(ep.graph_module, PassContext(spec=spec), EXPORT_PASSES)
    for record in records:
        for layer, reason in record.refused.items():
            logger.info("hetgraph export %s: layer %s: %s", record.name, layer, reason)
    ep.graph_module.recompile()
    ep.validate()
    return records


def _example_ids(input_ids, batch_size: int, max_len: int, device) -> torch.Tensor:
    """A contiguous prompt of at least 2 tokens: export specializes a dimension traced at size 1."""
    if input_ids is None or input_ids.shape[1] < 2:
        return torch.zeros((batch_size, min(2, max_len)), dtype=torch.long, device=device)
    return input_ids.to(device).contiguous()


def _check_request(input_ids, decode, batch_size, max_cache_len, max_positions) -> tuple[int, int]:
    """(batch_size, longest prompt) the programs will serve, or a ValueError saying why not."""
    if input_ids is not None and (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2):
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"export: input_ids must be a [batch, prompt_len] tensor, got {shape}")
    if decode and max_cache_len is None:
        raise ValueError("export: decode=True needs max_cache_len (the positions each full-attention layer holds)")
    for name, value in (("batch_size", batch_size), ("max_cache_len", max_cache_len)):
        if value is not None and value <= 0:
            raise ValueError(f"export: {name}={value} must be positive")
    given_batch = None if input_ids is None else input_ids.shape[0]
    if batch_size is not None and given_batch is not None and batch_size != given_batch:
        shape = tuple(input_ids.shape)
        raise ValueError(f"export: input_ids has batch {given_batch} (shape {shape}), batch_size={batch_size}")
    max_len = min(max_cache_len or max_positions, max_positions)
    if input_ids is not None and input_ids.shape[1] > max_len:
        limit = f"max_cache_len={max_cache_len}" if max_cache_len else f"max_position_embeddings={max_positions}"
        raise ValueError(
            f"export: input_ids has {input_ids.shape[1]} tokens (shape {tuple(input_ids.shape)}); "
            f"{limit} serves at most {max_len}"
        )
    return batch_size or given_batch or 1, max_len


def _plan(model, input_ids, decode, batch_size, max_cache_len) -> tuple[list, dict]:
    """The programs to trace, as (name, wrapper, example args, dynamic shapes), and what they serve."""
    spec = model_spec(model)
    max_positions = model.config._getattr_without_heterogeneous_validation("max_position_embeddings")
    batch, max_len = _check_request(input_ids, decode, batch_size, max_cache_len, max_positions)
    example = _example_ids(input_ids, batch, max_len, model.device)
    prompt_dims = ({1: torch.export.Dim.AUTO(min=1, max=max_len)},)
    mamba = [s.index for s in spec if s.has_mamba]
    if mamba:
        # The stock chunked scan guards on the number of chunks, which export's range constraints
        # do not record (a program traced at one chunk claims longer prompts, then fails on them):
        # the prefill serves exactly the example's prompt length.
        if input_ids is None:
            raise ValueError(
                f"export: layers {mamba} are mamba mixers, whose prefill serves one prompt length: "
                f"pass input_ids of that length"
            )
        prompt_dims = None
    meta = {"batch_size": batch, "max_prompt_len": max_len, "max_cache_len": max_cache_len}
    meta["vocab_size"] = spec.vocab_size
    if not decode:
        return [("prefill", _Logits(model), (example,), prompt_dims)], meta
    prefill = _Prefill(model, batch, max_cache_len)
    meta["state"] = {name: list(shape) for name, (shape, _) in prefill.state_layout().items()}
    step_ids = torch.zeros((batch, 1), dtype=torch.long, device=model.device)
    decode_step = _Decode(model, batch, max_cache_len)
    state = prefill.new_state()
    return [("prefill", prefill, (example,), prompt_dims), ("decode", decode_step, (step_ids, state), None)], meta


def _trace(model, wrapper: nn.Module, args: tuple, dynamic_shapes) -> tuple[torch.export.ExportedProgram, list]:
    with torch.no_grad():
        ep = torch.export.export(wrapper, args, dynamic_shapes=dynamic_shapes, strict=False)
    return ep, specialize(ep, model_spec(model))


def prefill_program(model: nn.Module, *, input_ids: torch.Tensor | None = None):
    """The specialized prefill program `(input_ids) -> logits`, in memory, and what each pass did."""
    (job,), _ = _plan(model, input_ids, False, None, None)
    return _trace(model, *job[1:])


def export(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_ids: torch.Tensor | None = None,
    decode: bool = False,
    batch_size: int | None = None,
    max_cache_len: int | None = None,
    package: bool = False,
    progress: bool = False,
) -> Exported:
    """Write the specialized programs of a hetgraph-built model into the directory `path`.

    `input_ids` is an example prompt (its batch fixes B; any prompt length up to `max_cache_len`,
    or the model's `max_position_embeddings`, is served). `decode=True` writes the cache-filling
    `prefill.pt2` and `decode.pt2` (see the module docstring); `package=True` also compiles each
    program into an AOTInductor package `*.aoti.pt2` (`torch._inductor.aoti_load_package`).
    """
    from tqdm.auto import tqdm

    jobs, meta = _plan(model, input_ids, decode, batch_size, max_cache_len)
    os.makedirs(path, exist_ok=True)
    result = Exported(prefill=os.path.join(path, "prefill.pt2"))
    with tqdm(total=len(jobs) * (2 if package else 1), desc="export", unit="step", disable=not progress) as bar:
        for name, wrapper, args, dims in jobs:
            bar.set_postfix_str(f"{name}: torch.export + passes")
            ep, result.records[name] = _trace(model, wrapper, args, dims)
            result.programs[name] = ep
            if name == "prefill":  # what the traced program accepts, which the model's code may narrow
                meta["min_prompt_len"], meta["max_prompt_len"] = _prompt_range(ep)
            file = os.path.join(path, f"{name}.pt2")
            program_meta = json.dumps({"program": name, **meta})
            _save(ep, file, program_meta)
            setattr(result, name, file)
            bar.update()
            if package:
                bar.set_postfix_str(f"{name}: AOTInductor compile")
                package_file = _package(ep, os.path.join(path, f"{name}.aoti.pt2"), program_meta)
                setattr(result, f"{name}_package", package_file)
                bar.update()
    return result


def _prompt_range(ep: torch.export.ExportedProgram) -> tuple[int, int]:
    """The prompt lengths a prefill program accepts: symbolic over the export range, or the
    example's length where the program was traced static (mamba layers, see `_plan`)."""
    ids = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name.endswith("input_ids"))
    length = ids.meta["val"].shape[1]
    if isinstance(length, torch.SymInt) and length.node.expr.is_number:
        length = int(length.node.expr)
    if isinstance(length, int):
        return length, length
    bounds = ep.range_constraints[length.node.expr]
    # A symbolic size's range starts at 2 (export's 0/1 specialization); the program's own input
    # check and graph accept 1 as well (tests/test_export.py decodes 1-token prompts).
    lower = 1 if bounds.lower == 2 else int(bounds.lower)
    return lower, int(bounds.upper)


def _save(ep: torch.export.ExportedProgram, file: str, meta: str) -> None:
    """Saved without its example inputs: the loaded `.module()` then checks each input dimension and
    names the expected and given sizes (a generated guard names only the expected one), and the
    example prompt stays out of the artifact. AOTInductor needs them, so they are put back."""
    examples, ep.example_inputs = ep.example_inputs, None
    try:
        torch.export.save(ep, file, extra_files={METADATA: meta})
    finally:
        ep.example_inputs = examples


def _package(ep: torch.export.ExportedProgram, file: str, meta: str) -> str:
    configs = {
        "aot_inductor.metadata": {METADATA: meta},  # read back with `get_metadata()`
        # The input checks (AOTI_RUNTIME_CHECK_INPUTS=1) would refuse 1-token prompts: export's dims start at 2.
        "aot_inductor.check_lowerbound": False,
    }
    with torch.no_grad():
        return torch._inductor.aoti_compile_and_package(ep, package_path=file, inductor_configs=configs)


def _is_package(path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any("/data/aotinductor/" in name for name in archive.namelist())


def load(program):
    """A path to an exported `.pt2` or AOTInductor package -> a callable; a callable as is."""
    if not isinstance(program, (str, os.PathLike)):
        return program
    if _is_package(program):
        return torch._inductor.aoti_load_package(str(program))
    return torch.export.load(program).module()


def read_metadata(program) -> dict:
    """What a program of `export` serves (batch_size, max_prompt_len, max_cache_len, ...); {} if unknown."""
    if isinstance(program, (str, os.PathLike)):
        if _is_package(program):
            program = torch._inductor.aoti_load_package(str(program))
        else:  # the extra file, without loading the program
            with zipfile.ZipFile(program) as archive:
                names = [n for n in archive.namelist() if n.endswith(f"/extra/{METADATA}")]
                return json.loads(archive.read(names[0])) if names else {}
    meta = program.get_metadata().get(METADATA) if hasattr(program, "get_metadata") else None
    return json.loads(meta) if meta else {}


@torch.no_grad()
def generate_with_exported(prefill, decode, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding with the programs of `export(..., decode=True)`: ids [B, T + max_new_tokens].

    `prefill` and `decode` are paths to the `.pt2` programs or AOTInductor packages, or loaded
    programs. The shapes are checked first (a package given a wrong shape may abort the process).
    The loop itself needs nothing but torch:

        logits, state = prefill(input_ids)
        token = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(max_new_tokens - 1):
            token = decode(token, state)[:, -1].argmax(-1, keepdim=True)   # state updated in place
    """
    _check_prompt(input_ids, max_new_tokens, read_metadata(prefill))
    prefill, decode = load(prefill), load(decode)
    if max_new_tokens <= 0:
        return input_ids
    # Packages read raw memory: int64, contiguous, as traced.
    logits, state = prefill(input_ids.to(torch.long).contiguous())
    tokens = [input_ids, logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(max_new_tokens - 1):
        tokens.append(decode(tokens[-1], state)[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1)


def _check_prompt(input_ids: torch.Tensor, max_new_tokens: int, meta: dict) -> None:
    where = "generate_with_exported"
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"{where}: input_ids must be [batch, prompt_len >= 1], got shape {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    if not meta:
        return
    shape = tuple(input_ids.shape)
    if batch != meta["batch_size"]:
        raise ValueError(f"{where}: the programs serve batch {meta['batch_size']}, input_ids has shape {shape}")
    shortest, longest = meta.get("min_prompt_len", 1), meta["max_prompt_len"]
    if not shortest <= length <= longest:
        served = (
            f"of {longest} tokens" if shortest == longest
            else f"of up to {longest} tokens" if shortest == 1
            else f"of {shortest} to {longest} tokens"
        )
        raise ValueError(f"{where}: the programs serve prompts {served}, input_ids has shape {shape}")
    limit = meta.get("max_cache_len")
    if limit is not None and length + max_new_tokens - 1 > limit:
        raise ValueError(
            f"{where}: a {length}-token prompt (input_ids shape {shape}) and {max_new_tokens} new tokens need "
            f"{length + max_new_tokens - 1} cache positions; max_cache_len={limit}"
        )


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    return getattr(target, "__name__", str(target))


def layer_ops(ep: torch.export.ExportedProgram) -> dict[tuple[int | None, str | None], Counter]:
    """(layer, block) -> op name -> count, from the tags `specialize` left on the program's nodes."""
    table: dict = {}
    for node in compute_nodes(ep.graph_module):
        if node.target in _BOOKKEEPING:
            continue
        t = tag(node)
        key = (t.layer, t.block) if t is not None else (None, None)
        table.setdefault(key, Counter())[_op_name(node)] += 1
    return table


def describe_graph(ep: torch.export.ExportedProgram, spec) -> str:
    """A per-layer listing of a specialized program: each layer's spec line and its ops by count."""
    table = layer_ops(ep)

    def ops(counts: Counter) -> str:
        return ", ".join(f"{name} x{n}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    total = sum(sum(c.values()) for c in table.values())
    attention = sum(c[name] for c in table.values() for name in c if "attention" in name)
    lines = [f"{total} ops, {attention} attention op(s) for {len(spec.attention_layers)} attention layer(s)"]
    for i, s in enumerate(spec):
        lines.append(f"layer {i}: {s.describe()}")
        parts = sorted(((block, c) for (layer, block), c in table.items() if layer == i), key=lambda p: p[0] or "~")
        if not parts:
            lines.append("    (no ops)")
        for block, counts in parts:
            lines.append(f"    {block or 'residual'} ({sum(counts.values())}): {ops(counts)}")
    glue = Counter()
    for (layer, _), counts in table.items():
        if layer is None:
            glue.update(counts)
    lines.append(f"outside layers ({sum(glue.values())}): {ops(glue)}")
    return "\n".join(lines)

