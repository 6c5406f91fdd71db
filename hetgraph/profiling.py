"""`hetgraph.profile` and `profile_variants`: the latency of each distinct layer variant of a model, and predictions for any
model assembled from those variants.

A layer is timed on the real path (the stock modeling code, `make_cache`, the chosen compile
backend), by difference: for a variant v, models `[anchor] + [v] * k` are compiled for two depths
k1 < k2 and timed interleaved; the variant's cost is the time difference over the extra layers,
`(t(k2) - t(k1)) / (k2 - k1)`, with k1 >= 2 by default so the variant is a shared subgraph in both
models, as in any model where it repeats (with k1 = 1 its lone layer is inlined in the shallow model
and the difference mixes inlined and shared costs; on `drop-attn`, back-to-back runs of
`benchmarks/profile_accuracy.py` gave decode errors of -9% / -12% with k1 = 1 and 0% / -3% with
k1 = 2). The anchor is the model's first attention layer (a model needs one, see
`ModelSpec.from_config`); the fixed part (embedding, final norm, head, per-step overhead) is
what the anchor's own models leave: `t(k1) - (k1 + 1) * cost(anchor)`. Differences of medians are
noisy where a layer costs little against the fixed part: more `repeats`, or a larger `k2`, help.

    table = hetgraph.profile(model, prompt_len=512, context_len=1024)
    table.predict(other_config)        # {"prefill_ms": ..., "decode_ms": ...}
    table.save("table.json"); hetgraph.LatencyTable.load("table.json")
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from hetgraph.build import build_skeleton, from_config
from hetgraph.cache import make_cache
from hetgraph.configs import model_config_dict, normalize_config, select_layers
from hetgraph.contract import model_spec
from hetgraph.errors import HeteroConfigError
from hetgraph.spec import LayerSpec, ModelSpec

FORMAT_VERSION = 1
PHASES = ("prefill_ms", "decode_ms")


@dataclass
class VariantRow:
    spec: LayerSpec  # the variant (its `index`: the layer it was measured from)
    layers: list[int]  # the profiled model's layers of this variant
    parameters: int
    weight_bytes: int
    kv_bytes_per_token: int
    prefill_ms: float
    decode_ms: float
    # Weights plus the KV history one decode step reads, per second; None when the measured decode
    # time is not positive (noise larger than the layer's cost).
    decode_bytes_per_s: float | None


@dataclass
class LatencyTable:
    """Per-variant layer latencies of one family, hidden size and dtype, at the recorded shapes."""

    family: str
    hidden_size: int
    dtype: str
    shapes: dict[str, int]  # prompt_len, context_len, batch_size
    backend: str
    fixed: dict[str, float]  # prefill_ms, decode_ms of everything but the layers
    rows: list[VariantRow]
    machine: dict[str, str] = field(default_factory=dict)

    def row(self, s: LayerSpec) -> VariantRow | None:
        return next((r for r in self.rows if r.spec.variant_key == s.variant_key), None)

    def predict(self, config_or_model) -> dict[str, float]:
        """Prefill and decode ms of a model whose every layer's variant is in the table."""
        spec = _spec_of(config_or_model)
        if spec.adapter.name != self.family or spec.hidden_size != self.hidden_size:
            raise HeteroConfigError(
                f"the table is for {self.family} with hidden_size={self.hidden_size}; the model is "
                f"{spec.adapter.name} with hidden_size={spec.hidden_size}"
            )
        dtype = getattr(config_or_model, "dtype", None)
        if isinstance(config_or_model, torch.nn.Module) and str(dtype).removeprefix("torch.") != self.dtype:
            raise HeteroConfigError(f"the table was measured in {self.dtype}; the model is {dtype}")
        total = dict(self.fixed)
        for s in spec:
            row = self.row(s)
            if row is None:
                known = "; ".join(r.spec.describe() for r in self.rows)
                raise HeteroConfigError(f"layer {s.index}: variant {s.describe()!r} is not in the table; it has: {known}")
            for phase in PHASES:
                total[phase] += getattr(row, phase)
        return total

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rows"] = [{**dataclasses.asdict(r), "spec": _spec_to_json(r.spec)} for r in self.rows]
        return {"format_version": FORMAT_VERSION, **d}

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, path) -> "LatencyTable":
        with open(path) as f:
            d = json.load(f)
        version = d.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: latency table format_version={version!r}; this hetgraph reads {FORMAT_VERSION}")
        rows = [VariantRow(**{**r, "spec": _spec_from_json(r["spec"])}) for r in d.pop("rows")]
        return cls(**d, rows=rows)

    def to_markdown(self) -> str:
        head = (
            f"{self.family}, hidden {self.hidden_size}, {self.dtype}, backend {self.backend}, prompt "
            f"{self.shapes['prompt_len']}, context {self.shapes['context_len']}, batch {self.shapes['batch_size']}"
        )
        lines = [head, "", "| variant | layers | parameters | KV B/token | prefill ms | decode ms | decode GB/s |",
                 "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in self.rows:
            lines.append(
                f"| {r.spec.describe()} | {_ranges(r.layers)} | {r.parameters:,} | {r.kv_bytes_per_token} | "
                f"{r.prefill_ms:.3f} | {r.decode_ms:.3f} | {_gbs(r.decode_bytes_per_s)} |"
            )
        lines.append(f"| fixed (embedding, norm, head, per step) | | | | {self.fixed['prefill_ms']:.3f} | "
                     f"{self.fixed['decode_ms']:.3f} | |")  # fmt: skip
        return "\n".join(lines) + "\n"


def profile(
    model: torch.nn.Module,
    *,
    prompt_len: int = 512,
    context_len: int = 1024,
    batch_size: int = 1,
    backend: str = "hetgraph",
    repeats: int = 5,
    depths: tuple[int, int] = (2, 4),
    device=None,
    progress: bool = False,
) -> LatencyTable:
    """Time one layer call of each distinct layer variant of a hetgraph-built `model` (see module doc)."""
    spec = model_spec(model)
    config = model_config_dict(model.config)
    variants = {key: layers for key, layers in spec.variants().items()}
    return _profile(config, spec, variants, prompt_len=prompt_len, context_len=context_len, batch_size=batch_size,
                    backend=backend, repeats=repeats, depths=depths, dtype=model.dtype,
                    device=device or model.device, progress=progress)  # fmt: skip


def profile_variants(
    parent_config,
    variants: Sequence[Mapping[str, Any]],
    *,
    layer: int = 0,
    dtype: torch.dtype = torch.float32,
    device=None,
    **kwargs,
) -> LatencyTable:
    """Time candidate layers without a whole model: each entry of `variants` is layer `layer` of
    `parent_config` with those per-layer overrides (e.g. `{"intermediate_size": 2048}`,
    `{"skip": ["attention"]}`); the parent's own layer is timed too, as the anchor."""
    parent = model_config_dict(normalize_config(parent_config))
    if parent.get("per_layer_config"):
        raise HeteroConfigError("profile_variants: the parent config must have no per_layer_config (the variants are)")
    n = len(ModelSpec.from_config(normalize_config(parent)))
    if not 0 <= layer < n:
        raise HeteroConfigError(f"profile_variants: layer={layer} is out of range; allowed: 0 to {n - 1}")
    # One model whose layer j+1 is variant j, so each candidate has a layer to be measured from.
    config = select_layers(parent, [layer] * (len(variants) + 1))
    config["per_layer_config"] = {j + 1: dict(v) for j, v in enumerate(variants)}
    spec = ModelSpec.from_config(normalize_config(config))
    return _profile(config, spec, spec.variants(), dtype=dtype, device=device or "cpu", **kwargs)


def _profile(config, spec: ModelSpec, variants, *, dtype, device, prompt_len=512, context_len=1024, batch_size=1,
             backend="hetgraph", repeats=5, depths=(2, 4), progress=False) -> LatencyTable:  # fmt: skip
    k1, k2 = depths
    if not 0 < k1 < k2:
        raise ValueError(f"profile: depths={depths} must be two layer counts 0 < k1 < k2")
    anchor = spec.attention_layers[0]
    shapes = {"prompt_len": prompt_len, "context_len": context_len, "batch_size": batch_size}
    timer = ModelTimer(shapes, backend, repeats, dtype, device)
    measured, fixed = {}, None
    bar = tqdm(variants.items(), desc="profile", unit="variant", disable=not progress)
    for key, layers in bar:
        bar.set_postfix_str(spec[layers[0]].describe())
        short, deep = timer.time(*(select_layers(config, [anchor] + [layers[0]] * k) for k in depths))
        measured[key] = {p: (deep[p] - short[p]) / (k2 - k1) for p in PHASES}
        if key == spec[anchor].variant_key:  # its models are [anchor] * (k + 1)
            fixed = {p: short[p] - (k1 + 1) * measured[key][p] for p in PHASES}
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = []
    for key, layers in variants.items():
        s = spec[layers[0]]
        params = _layer_parameters(config, anchor, layers[0])
        kv = s.kv_bytes_per_token(itemsize)
        read = params * itemsize + kv * batch_size * context_len  # one decode step reads these
        decode_ms = measured[key]["decode_ms"]
        rows.append(VariantRow(s, list(layers), params, params * itemsize, kv, measured[key]["prefill_ms"],
                               decode_ms, read / (decode_ms / 1e3) if decode_ms > 0 else None))  # fmt: skip
    return LatencyTable(spec.adapter.name, spec.hidden_size, str(dtype).removeprefix("torch."), shapes, backend,
                        fixed, rows, _machine(device))  # fmt: skip


class ModelTimer:
    """Compiles configs' models as `backend` does, with `make_cache`, and times their prefill and
    decode interleaved (model after model, repeat after repeat)."""

    def __init__(self, shapes, backend, repeats, dtype, device):
        self.shapes, self.backend, self.repeats, self.dtype, self.device = shapes, backend, repeats, dtype, device

    def time(self, *configs: dict) -> list[dict[str, float]]:
        """Median prefill_ms and decode_ms of each config's model, in order."""
        with torch.no_grad():
            runs = [self._compiled(config) for config in configs]
            times = [{p: [] for p in PHASES} for _ in runs]
            for phase in PHASES:
                for run in runs:
                    run.start(phase)
                for _ in range(self.repeats):
                    for run, t in zip(runs, times):
                        t[phase].append(_ms(run.calls[phase], self.device))
        torch._dynamo.reset()
        return [{p: statistics.median(v) for p, v in t.items()} for t in times]

    def _compiled(self, config: dict) -> "_Run":
        torch.manual_seed(0)
        model = from_config(config, dtype=self.dtype, device=self.device)
        b, prompt, context = self.shapes["batch_size"], self.shapes["prompt_len"], self.shapes["context_len"]
        cache = make_cache(model, batch_size=b, max_cache_len=max(prompt, context) + self.repeats + 2)
        fwd = torch.compile(model.forward, backend=self.backend) if self.backend != "none" else model.forward
        vocab = config["vocab_size"]
        run = _Run(
            fwd,
            cache,
            torch.randint(0, vocab, (b, prompt), device=self.device),
            torch.randint(0, vocab, (b, context), device=self.device),
        )
        run.start("prefill_ms")
        run.calls["prefill_ms"]()  # compiles the prefill graph
        run.start("decode_ms")
        run.calls["decode_ms"]()  # compiles the decode graph
        return run


class _Run:
    """One compiled model's timed calls: a prefill into an empty cache, a decode step after
    `context` tokens of history (which each timed step extends by one)."""

    def __init__(self, fwd, cache, prompt_ids, context_ids):
        self.fwd, self.cache, self.prompt_ids, self.context_ids = fwd, cache, prompt_ids, context_ids
        self.calls = {"prefill_ms": self.prefill, "decode_ms": self.decode}

    def start(self, phase: str) -> None:
        self.cache.reset()
        if phase == "decode_ms":
            self.fwd(input_ids=self.context_ids, cache=self.cache)

    def prefill(self) -> None:
        self.cache.reset()
        self.fwd(input_ids=self.prompt_ids, cache=self.cache)

    def decode(self) -> None:
        self.fwd(input_ids=self.context_ids[:, -1:], cache=self.cache)


def _layer_parameters(config: dict, anchor: int, i: int) -> int:
    """Parameters of layer i, counted on a meta-device model of the anchor and that layer."""
    model, spec = build_skeleton(select_layers(config, [anchor, i]))
    return sum(p.numel() for p in getattr(model, spec.adapter.base_model_attr).layers[1].parameters())


def _ms(call, device) -> float:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def _spec_of(config_or_model) -> ModelSpec:
    if isinstance(config_or_model, torch.nn.Module):
        return model_spec(config_or_model)
    return ModelSpec.from_config(normalize_config(config_or_model))


def _spec_to_json(s: LayerSpec) -> dict:
    return {**dataclasses.asdict(s), "extra": [list(kv) for kv in s.extra]}


def _spec_from_json(d: dict) -> LayerSpec:
    return LayerSpec(**{**d, "extra": tuple(tuple(kv) for kv in d["extra"])})


def _gbs(bytes_per_s: float | None) -> str:
    return "-" if bytes_per_s is None else f"{bytes_per_s / 1e9:.2f}"


def _ranges(layers: list[int]) -> str:
    return ", ".join(map(str, layers)) if len(layers) <= 6 else f"{', '.join(map(str, layers[:5]))}, ... ({len(layers)})"


def _machine(device) -> dict[str, str]:
    info = {"torch": torch.__version__, "platform": platform.platform(), "device": str(device)}
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def plot(table: LatencyTable, path: str) -> bool:
    """Bars of ms per variant, both phases; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [f"{r.spec.describe()} ({len(r.layers)}x)" for r in table.rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.2 + 0.45 * len(names)), sharey=True)
    for ax, phase in zip(axes, PHASES):
        ax.barh(names, [getattr(r, phase) for r in table.rows])
        ax.set_xlabel(f"{phase.replace('_ms', '')} ms per layer call")
    fig.suptitle(f"{table.family} hidden {table.hidden_size} {table.dtype}, {table.backend}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
