"""`hetgraph.profile` and `profile_variants`: the latency of each distinct layer variant of a model, and predictions for any
model assembled from those variants.

A layer is timed on the real path (the stock modeling code, `make_cache`, the chosen compile
backend), inside one model: the probe, one layer of each distinct variant, the model's first
attention layer first (a model needs one, see `ModelSpec.from_config`). The probe is compiled once
(a prefill graph and a decode graph) by a backend that specializes the whole graph as `backend`
does, then cuts it at the decoder layers' boundaries and compiles each piece as `backend` would,
so every call times each layer's own compiled code (`hetgraph.timing`; eager, `backend="none"`:
forward hooks). The fixed part (embedding, masks, final norm, head, per-step overhead) is the
probe's call time less its layers'. All variants are measured in the same calls, so a machine whose
speed drifts moves them together; medians over `repeats` calls. Compile cost follows the variant count, not the
model's depth: on the 80-layer Super-49B pattern the probe has 8 layers.

What the cut loses: the fusion of a layer's last op with the next layer's first (Inductor cannot
fuse across pieces; a shared variant's call in a whole model loses it too).

    table = hetgraph.profile(model, prompt_len=512, context_len=1024)
    table.predict(other_config)        # {"prefill_ms": ..., "decode_ms": ...}
    table.save("table.json"); hetgraph.LatencyTable.load("table.json")
"""

from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from hetgraph.build import build_skeleton
from hetgraph.configs import model_config_dict, normalize_config, select_layers
from hetgraph.contract import model_spec
from hetgraph.errors import HeteroConfigError
from hetgraph.spec import LayerSpec, ModelSpec
from hetgraph.timing import PHASES, ModelTimer

FORMAT_VERSION = 1


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
    device=None,
    progress: bool = False,
) -> LatencyTable:
    """Time one layer call of each distinct layer variant of a hetgraph-built `model` (see module doc)."""
    spec = model_spec(model)
    config = model_config_dict(model.config)
    variants = {key: layers for key, layers in spec.variants().items()}
    return _profile(config, spec, variants, prompt_len=prompt_len, context_len=context_len, batch_size=batch_size,
                    backend=backend, repeats=repeats, dtype=model.dtype,
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
             backend="hetgraph", repeats=5, progress=False) -> LatencyTable:  # fmt: skip
    order = probe_layers(spec, variants)
    timer = ModelTimer({"prompt_len": prompt_len, "context_len": context_len, "batch_size": batch_size}, backend,
                       repeats, dtype, device, progress=progress)  # fmt: skip
    whole, per_layer, _ = timer.time_layers(select_layers(config, order))
    return table_from_probe(config, spec, variants, order, whole, per_layer, timer)


def probe_layers(spec: ModelSpec, variants: Mapping[Any, list[int]]) -> list[int]:
    """The probe's layers: one of each variant, the first attention layer first (a model needs one)."""
    anchor = spec.attention_layers[0]
    return [anchor] + [layers[0] for layers in variants.values() if layers[0] != anchor]


def table_from_probe(config, spec, variants, order, whole, per_layer, timer: ModelTimer) -> LatencyTable:
    """The table from the probe's medians (`ModelTimer.time_layers` on `select_layers(config, order)`)."""
    fixed = {p: whole[p] - sum(per_layer[p]) for p in PHASES}
    itemsize = torch.empty((), dtype=timer.dtype).element_size()
    batch_size, context_len = timer.shapes["batch_size"], timer.shapes["context_len"]
    rows = []
    for layers in variants.values():
        s, at = spec[layers[0]], order.index(layers[0])
        params = _layer_parameters(config, order[0], layers[0])
        kv = s.kv_bytes_per_token(itemsize)
        read = params * itemsize + kv * batch_size * context_len  # one decode step reads these
        decode_ms = per_layer["decode_ms"][at]
        rows.append(VariantRow(s, list(layers), params, params * itemsize, kv, per_layer["prefill_ms"][at],
                               decode_ms, read / (decode_ms / 1e3) if decode_ms > 0 else None))  # fmt: skip
    return LatencyTable(spec.adapter.name, spec.hidden_size, str(timer.dtype).removeprefix("torch."),
                        dict(timer.shapes), timer.backend, fixed, rows, _machine(timer.device))  # fmt: skip


def _layer_parameters(config: dict, anchor: int, i: int) -> int:
    """Parameters of layer i, counted on a meta-device model of the anchor and that layer."""
    model, spec = build_skeleton(select_layers(config, [anchor, i]))
    return sum(p.numel() for p in getattr(model, spec.adapter.base_model_attr).layers[1].parameters())


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
