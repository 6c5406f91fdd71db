"""Per-layer report of a heterogeneous config: blocks, sizes, parameters and KV bytes per token.

Works on the bare config (dict, transformers config object, config.json or a checkpoint directory):
parameter counts are arithmetic on the LayerSpec table, so no tensor is allocated for them. For a
checkpoint directory the stored tensors are then read one at a time (unless `check_weights=False`)
to report those holding NaN or Inf. Any layout `hetgraph.formats` reads is inspected the same way.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch
from transformers import PreTrainedConfig

from hetgraph.build import build_skeleton, parent_config
from hetgraph.checkpoint import INDEX_FILE, SINGLE_FILE, TensorIndex
from hetgraph.configs import normalize_config
from hetgraph.errors import HeteroConfigError
from hetgraph.loading import open_checkpoint
from hetgraph.spec import FULL, LINEAR, SKIP, LayerSpec, ModelSpec


@dataclass(frozen=True)
class _Sizes:
    """What a layer's parameter count depends on besides its LayerSpec; biases resolved against the config."""

    hidden: int
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool

    @classmethod
    def of(cls, spec: ModelSpec, config: PreTrainedConfig) -> "_Sizes | _SkeletonSizes":
        layout = spec.adapter.param_layout
        if layout is None:  # experts, mamba mixers: read off the stock layers on the meta device
            return _SkeletonSizes.of(config)

        def flag(rule: bool | str) -> bool:
            return bool(getattr(config, rule, False)) if isinstance(rule, str) else rule

        return cls(
            spec.hidden_size, flag(layout.qkv_bias), flag(layout.o_bias), flag(layout.mlp_bias), layout.qk_norm
        )

    def linear_block(self) -> int:
        """Norm -> Linear(hidden, hidden, no bias)."""
        return self.hidden * self.hidden + self.hidden

    def attention(self, s: LayerSpec) -> int:
        if s.attention == SKIP:
            return 0  # a removed block owns nothing, its norm included
        if s.attention == LINEAR:
            return self.linear_block()
        q = s.num_attention_heads * s.head_dim
        kv = s.num_key_value_heads * s.head_dim
        n = self.hidden * (q + 2 * kv) + q * self.hidden + self.hidden  # q, k, v, o projections; input norm
        n += (q + 2 * kv) * self.qkv_bias + self.hidden * self.o_bias
        return n + 2 * s.head_dim * self.qk_norm

    def mlp(self, s: LayerSpec) -> int:
        if s.mlp == SKIP:
            return 0
        if s.mlp == LINEAR:
            return self.linear_block()
        width = s.intermediate_size
        n = 3 * self.hidden * width + self.hidden  # gate, up, down; post-attention norm
        return n + (2 * width + self.hidden) * self.mlp_bias


class _SkeletonSizes:
    """Per-layer parameter counts of families whose blocks are more than a formula (GptOss, Llama4,
    NemotronH: experts, mamba mixers), read off the stock layers built on the meta device (no
    storage) for the model and for its homogeneous parent, keyed by layer variant. A single-mixer
    block counts as attention (attention, mamba) or as MLP (MLP, MoE)."""

    def __init__(self, counts: dict[tuple, tuple[int, int]]):
        self.counts = counts  # variant key -> (attention parameters, mlp parameters)

    @classmethod
    def of(cls, config: PreTrainedConfig) -> "_SkeletonSizes":
        counts: dict[tuple, tuple[int, int]] = {}
        for cfg in (config, parent_config(config)):
            model, spec = build_skeleton(copy.deepcopy(cfg))
            layers = getattr(model, spec.adapter.base_model_attr).layers
            for s, layer in zip(spec, layers):
                counts.setdefault(s.variant_key, cls._layer_counts(spec.adapter, s, layer))
        return cls(counts)

    @staticmethod
    def _layer_counts(adapter, s: LayerSpec, layer) -> tuple[int, int]:
        blocks = {"attention": 0, "mlp": 0}
        for block in adapter.blocks:
            n = sum(_numel(getattr(layer, name, None)) for name in (block.module, block.norm))
            side = block.name if block.name in blocks else "mlp" if s.mixer_type in ("mlp", "moe") else "attention"
            blocks[side] += n
        return blocks["attention"], blocks["mlp"]

    def attention(self, s: LayerSpec) -> int:
        return self.counts[s.variant_key][0]

    def mlp(self, s: LayerSpec) -> int:
        return self.counts[s.variant_key][1]


def _numel(module) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class LayerRow:
    spec: LayerSpec
    attention_parameters: int
    mlp_parameters: int
    kv_bytes_per_token: int

    @property
    def parameters(self) -> int:
        return self.attention_parameters + self.mlp_parameters

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self.spec)
        d.update(
            attention_parameters=self.attention_parameters,
            mlp_parameters=self.mlp_parameters,
            parameters=self.parameters,
            kv_bytes_per_token=self.kv_bytes_per_token,
        )
        return d


@dataclass(frozen=True)
class Totals:
    layer_parameters: int
    parameters: int  # layers plus embeddings, final norm and (untied) lm_head
    kv_bytes_per_token: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Report:
    model_type: str
    hidden_size: int
    vocab_size: int
    tie_word_embeddings: bool
    dtype: str  # the dtype KV bytes are counted in
    dtype_bytes: int
    rows: tuple[LayerRow, ...]
    other_parameters: int  # embeddings, final norm, lm_head unless tied
    totals: Totals
    parent: Totals  # the global values applied to every layer, nothing removed
    source: str | None = None
    layout: str | None = None  # the checkpoint layout read (`hetgraph.formats`), None for per_layer_config
    # Stored tensors holding NaN or Inf: name -> (NaN count, Inf count); None when no weights were read.
    nonfinite: dict[str, tuple[int, int]] | None = None

    @property
    def ratio(self) -> dict[str, float | None]:
        """This model over its homogeneous parent."""
        return {
            "parameters": _ratio(self.totals.parameters, self.parent.parameters),
            "kv_bytes_per_token": _ratio(self.totals.kv_bytes_per_token, self.parent.kv_bytes_per_token),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "layout": self.layout,
            "model_type": self.model_type,
            "num_layers": len(self.rows),
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": self.dtype,
            "dtype_bytes": self.dtype_bytes,
            "layers": [r.to_dict() for r in self.rows],
            "other_parameters": self.other_parameters,
            "totals": self.totals.to_dict(),
            "parent": self.parent.to_dict(),
            "ratio": self.ratio,
            "nonfinite_weights": None if self.nonfinite is None else {k: list(v) for k, v in self.nonfinite.items()},
        }

    def to_text(self) -> str:
        lm_head = "tied to embeddings" if self.tie_word_embeddings else "untied"
        lines = [
            *([self.source] if self.source else []),
            f"{self.model_type}{f' (read from the {self.layout} layout)' if self.layout else ''}: "
            f"{len(self.rows)} layers, hidden {self.hidden_size}, vocab {self.vocab_size}, "
            f"lm_head {lm_head}, KV bytes in {self.dtype} ({self.dtype_bytes} per value)",
            f"attention blocks: {self._block_counts('attention')}; mlp blocks: {self._block_counts('mlp')}",
            "",
        ]
        header = ["layer", "attention", "mlp", "mlp width", "heads", "kv heads", "head dim", "window"]
        lines += _table(
            [*header, "parameters", "KV bytes/token"],
            [_row_cells(r) for r in self.rows],
            left={1, 2, 7},
        )
        ratio = self.ratio
        lines.append("")
        lines += _table(
            ["", "parameters", "KV bytes/token"],
            [
                ["layers", _count(self.totals.layer_parameters), _bytes(self.totals.kv_bytes_per_token)],
                ["embeddings, final norm, lm_head", _count(self.other_parameters), ""],
                ["total", _count(self.totals.parameters), _bytes(self.totals.kv_bytes_per_token)],
                ["homogeneous parent", _count(self.parent.parameters), _bytes(self.parent.kv_bytes_per_token)],
                ["ratio (total / parent)", _fraction(ratio["parameters"]), _fraction(ratio["kv_bytes_per_token"])],
            ],
            left={0},
        )
        if self.nonfinite:
            lines += ["", f"WARNING: {len(self.nonfinite)} stored tensor(s) hold NaN or Inf (loaded as stored):"]
            lines += [f"  {name}: {nan} NaN, {inf} Inf" for name, (nan, inf) in sorted(self.nonfinite.items())]
        elif self.nonfinite is not None:
            lines += ["", "weights: every stored value is finite"]
        return "\n".join(lines)

    def _block_counts(self, block: str) -> str:
        kinds = [getattr(r.spec, block) for r in self.rows]
        return ", ".join(f"{kinds.count(kind)} {kind}" for kind in (FULL, SKIP, LINEAR))


def inspect_config(
    config_or_path: Mapping | PreTrainedConfig | str | os.PathLike, *, check_weights: bool = True
) -> Report:
    """The per-layer report of a config dict, config object, config.json file or checkpoint directory.

    For a checkpoint directory with weights, `check_weights` also reads every stored tensor (one at
    a time) and reports those holding NaN or Inf.
    """
    source, layout, nonfinite = None, None, None
    if isinstance(config_or_path, (str, os.PathLike)):
        source = os.fspath(config_or_path)
        weights = check_weights and any(os.path.exists(os.path.join(source, f)) for f in (SINGLE_FILE, INDEX_FILE))
        ckpt = open_checkpoint(source, weights=weights)
        config, layout = ckpt.config, ckpt.layout
        if ckpt.index is not None:
            nonfinite = _nonfinite(ckpt.index)
    else:
        config = normalize_config(config_or_path)
    spec = ModelSpec.from_config(config)
    try:
        parent_spec = ModelSpec.from_config(parent_config(config))
    except HeteroConfigError as e:
        raise HeteroConfigError(f"homogeneous parent (the global values on every layer): {e}") from e
    sizes = _Sizes.of(spec, config)
    dtype = _kv_dtype(config)
    dtype_bytes = dtype.itemsize
    tied = bool(getattr(config, "tie_word_embeddings", False))
    # Embedding, final norm, and an lm_head (no bias in these families) unless it shares the embedding.
    other = spec.vocab_size * spec.hidden_size * (1 if tied else 2) + spec.hidden_size
    rows = tuple(_layer_row(sizes, s, dtype_bytes) for s in spec)
    parent_rows = [_layer_row(sizes, s, dtype_bytes) for s in parent_spec]
    return Report(
        model_type=config.model_type,
        hidden_size=spec.hidden_size,
        vocab_size=spec.vocab_size,
        tie_word_embeddings=tied,
        dtype=str(dtype).removeprefix("torch."),
        dtype_bytes=dtype_bytes,
        rows=rows,
        other_parameters=other,
        totals=_totals(rows, other),
        parent=_totals(parent_rows, other),
        source=source,
        layout=layout,
        nonfinite=nonfinite,
    )


def _nonfinite(index: TensorIndex) -> dict[str, tuple[int, int]]:
    """The stored tensors holding NaN or Inf: name -> (NaN count, Inf count); read one at a time."""
    found = {}
    for name in index.shapes:
        t = index.load(name)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            found[name] = (int(torch.isnan(t).sum()), int(torch.isinf(t).sum()))
    return found


def _kv_dtype(config: PreTrainedConfig) -> torch.dtype:
    """The config's dtype, else fp32. Reads only `dtype`: transformers 5 maps a config.json `torch_dtype`
    onto it, and reading `config.torch_dtype` logs a deprecation warning into the report's output."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _layer_row(sizes: _Sizes, s: LayerSpec, dtype_bytes: int) -> LayerRow:
    return LayerRow(s, sizes.attention(s), sizes.mlp(s), s.kv_bytes_per_token(dtype_bytes))


def _totals(rows, other: int) -> Totals:
    layers = sum(r.parameters for r in rows)
    return Totals(layers, layers + other, sum(r.kv_bytes_per_token for r in rows))


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _row_cells(r: LayerRow) -> list[str]:
    s = r.spec
    window = "-"
    if s.window is not None and s.window[1] is not None:
        window = f"{s.window[0]} {s.window[1]}"

    def opt(value: int | None) -> str:
        return "-" if value is None else str(value)

    attention, mlp = s.attention, s.mlp
    if s.mixer_type is not None:  # one mixer per block (NemotronH): name the mixer, "-" for the absent side
        attention = {"attention": s.attention, "mamba": f"mamba {s.mamba}"}.get(s.mixer_type, "-")
        mlp = {"mlp": s.mlp, "moe": f"moe {s.mlp}"}.get(s.mixer_type, "-")
    return [
        str(s.index),
        attention,
        mlp,
        opt(s.intermediate_size),
        opt(s.num_attention_heads),
        opt(s.num_key_value_heads),
        opt(s.head_dim),
        window,
        f"{r.parameters:,}",
        f"{r.kv_bytes_per_token:,}",
    ]


def _table(header: list[str], rows: list[list[str]], left: set[int]) -> list[str]:
    """Aligned plain-text columns: `left` columns left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = (c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded).rstrip()

    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def _count(n: int) -> str:
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n:,} ({n / size:.2f}{suffix})"
    return f"{n:,}"


def _bytes(n: int) -> str:
    for size, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= size:
            return f"{n:,} ({n / size:.1f} {suffix})"
    return f"{n:,}"


def _fraction(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
