"""The benchmark presets: one table of rows, read by `make_preset`.

A row is a homogeneous parent config and a per-layer pattern over it. Sizes in the table are
written against the preset's width `H` and depth `DEPTH`, so one row serves every `--scale`.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Callable

# The real Llama-3.3-Nemotron-Super-49B-v1 config.json, shipped as package data.
SUPER_49B_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                                "nemotron-super-49b-v1.config.json")


@dataclass
class Preset:
    name: str
    config: dict
    parent: dict
    short_prompt: int = 32
    long_prompt: int = 512
    decode_tokens: int = 32
    notes: str = ""


@dataclass(frozen=True)
class _Width:
    """A size proportional to the preset's hidden width: hidden * num // den."""

    num: int = 1
    den: int = 1

    def __mul__(self, k: int) -> "_Width":
        return _Width(self.num * k, self.den)

    __rmul__ = __mul__

    def __floordiv__(self, k: int) -> "_Width":
        return _Width(self.num, self.den * k)

    def at(self, hidden: int, layers: int) -> int:
        return hidden * self.num // self.den


@dataclass(frozen=True)
class _Depth:
    """The preset's layer count; with `items`, a global per-layer list repeating them to that length."""

    items: tuple = ()

    def at(self, hidden: int, layers: int):
        return [self.items[i % len(self.items)] for i in range(layers)] if self.items else layers


H, DEPTH = _Width(), _Depth()

Pattern = Callable[[dict, int], dict]  # (resolved parent, layers) -> {layer index: overrides}


@dataclass(frozen=True)
class _Row:
    parent: dict  # the homogeneous parent, sizes in H / DEPTH
    depth: int  # layers at scale 1 (rows in BY_DEPTH take it from the name)
    pattern: Pattern | None = None
    hidden: int = 512  # width at scale 1
    scaled: bool = True  # False: fixed shapes, `--scale` ignored
    listed: bool = True  # run by `--preset all`
    widest: str | None = None  # the parent takes the widest per-layer value of this attribute
    sparse: bool = False  # per-layer values equal to the parent's are left out
    short_prompt: int = 32
    long_prompt: int = 512
    decode_tokens: int = 32
    notes: str = ""


def _ffn_width(ffn_mult: float, hidden: int, multiple: int = 64) -> int:
    width = int(2 * ffn_mult * hidden / 3)
    return -(-width // multiple) * multiple


def super49b_blocks(layers: int | None = None) -> list[dict]:
    """Super-49B's block_configs (80 blocks), subsampled evenly to `layers`."""
    with open(SUPER_49B_CONFIG) as f:
        blocks = json.load(f)["block_configs"]
    if layers is not None:
        blocks = [blocks[round(i * len(blocks) / layers)] for i in range(layers)]
    return blocks


def _super49b(multiple: int) -> Pattern:
    """Each layer's FFN width (ffn_mult, rounded up to `multiple`) and removed blocks (no_op)."""

    def pattern(parent: dict, layers: int) -> dict:
        per_layer = {}
        for i, b in enumerate(super49b_blocks(layers)):
            o = {"intermediate_size": _ffn_width(b["ffn"]["ffn_mult"], parent["hidden_size"], multiple)}
            skip = [name for name, block in (("attention", b["attention"]), ("mlp", b["ffn"])) if block["no_op"]]
            per_layer[i] = dict(o, skip=skip) if skip else o
        return per_layer

    return pattern


def _cycle(*overrides: dict, first: float = 0.0, last: dict | None = None) -> Pattern:
    """`overrides` repeated from layer int(first * layers) on; `last`, if given, for the last layer."""

    def pattern(parent: dict, layers: int) -> dict:
        start = int(first * layers)
        per_layer = {i: dict(overrides[(i - start) % len(overrides)]) for i in range(start, layers)}
        if last is not None:
            per_layer[layers - 1] = dict(last)
        return per_layer

    return pattern


def _width_pruned(keep: tuple[float, ...]) -> Pattern:
    """LLM-Pruner / FLAP: a repeating fraction of the heads (whole KV groups) and of the FFN kept per layer."""

    def pattern(parent: dict, layers: int) -> dict:
        kv, per_layer = parent["num_key_value_heads"], {}
        for i in range(layers):
            k = keep[i % len(keep)]
            heads = max(kv, int(parent["num_attention_heads"] * k) // kv * kv)
            width = min(_ffn_width(k * 1.5 * 1.5, parent["hidden_size"]), parent["intermediate_size"])
            per_layer[i] = {"num_attention_heads": heads, "intermediate_size": width}
        return per_layer

    return pattern


_LLAMA = dict(
    model_type="llama", hidden_size=H, num_hidden_layers=DEPTH, vocab_size=4096, intermediate_size=H * 3,
    num_attention_heads=H // 64, num_key_value_heads=H // 256, max_position_embeddings=8192, tie_word_embeddings=False,
)
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# The stock GptOss pattern: sliding 128 on even layers, full attention on odd ones.
_GPT_OSS = dict(
    model_type="gpt_oss", hidden_size=H, num_hidden_layers=DEPTH, vocab_size=4096, intermediate_size=H // 2,
    num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_local_experts=16, num_experts_per_tok=4,
    sliding_window=128, max_position_embeddings=131072, tie_word_embeddings=False,
)
# Llama4 text: layers 3, 7, ... NoPE (global attention); odd layers MoE; the others chunked 256.
_LLAMA4 = dict(
    model_type="llama4_text", hidden_size=H, num_hidden_layers=DEPTH, vocab_size=4096, intermediate_size=H,
    intermediate_size_mlp=2 * H, num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_local_experts=8,
    num_experts_per_tok=1, interleave_moe_layer_step=2, attention_chunk_size=256, no_rope_layer_interval=4,
    max_position_embeddings=8192, tie_word_embeddings=False,
)
# NemotronH: the mamba-heavy M-M*M E block pattern.
_NEMOTRON_H = dict(
    model_type="nemotron_h", hidden_size=H,
    layers_block_type=_Depth(
        ("linear_attention", "mlp", "linear_attention", "full_attention", "linear_attention", "moe")
    ),
    vocab_size=4096, num_attention_heads=8, num_key_value_heads=2, head_dim=64, intermediate_size=2 * H,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=H // 2, moe_shared_expert_intermediate_size=H,
    mamba_num_heads=H // 32, mamba_head_dim=64, ssm_state_size=64, n_groups=4, conv_kernel=4, chunk_size=128,
    max_position_embeddings=8192, tie_word_embeddings=False,
)

_HALF_MAMBA, _NO_MIXER = {"mamba_num_heads": H // 64}, {"skip": ["mixer"]}
_NARROW_MLP_ONE_KV = {"intermediate_size_mlp": H, "num_key_value_heads": 1}
TABLE: dict[str, _Row] = {
    "puzzle": _Row(_LLAMA, 20, _super49b(64), widest="intermediate_size", sparse=True,
                   notes="Nemotron-Super-49B block pattern (80 layers subsampled), toy width"),
    "drop-attn": _Row(_LLAMA, 16, _cycle({}, {"skip": ["attention"]}, first=0.5),
                      notes="LLM-Drop: half the upper attention removed"),
    "width-pruned": _Row(_LLAMA, 16, _width_pruned((0.5, 0.75, 1.0, 0.625)),
                         notes="LLM-Pruner/FLAP: per-layer heads and widths"),
    "windowed": _Row(dict(_LLAMA, sliding_window=None), 12,
                     _cycle({"sliding_window": 64}, {"sliding_window": 256}, {"sliding_window": None}),
                     long_prompt=2048, notes="per-layer windows 64/256/full"),
    "windowed-long": _Row(dict(_LLAMA, sliding_window=None, max_position_embeddings=16384), 12,
                          _cycle({"sliding_window": 64}, {"sliding_window": 256}, {"sliding_window": None}),
                          long_prompt=8192, listed=False, notes="the windowed preset, 8192-token prompt"),
    "homogeneous": _Row(_LLAMA, 16, notes="the parent, as control"),
    "gpt-oss-puzzle": _Row(  # as gpt-oss-puzzle varies it: half the layers keep half the experts
        _GPT_OSS, 8,
        _cycle({}, {"num_local_experts": 8, "sliding_window": 512}, {"num_local_experts": 8}, {"sliding_window": 64},
               last={}),  # 512 turns a full layer into a long window, 64 a short one (the last stays full)
        notes="GptOss, Puzzle-like: per-layer expert counts (16/8) and windows (64/128/512/full)"),
    "llama4-chunked": _Row(
        _LLAMA4, 8,
        _cycle({"attention_chunk_size": 64}, {"num_local_experts": 4}, _NARROW_MLP_ONE_KV, {},
               {"attention_chunk_size": 64}, {"num_local_experts": 4, "skip": ["attention"]}, _NARROW_MLP_ONE_KV, {}),
        notes="Llama4 text: chunks 64/256, NoPE every 4th layer, MoE 8/4 experts, pruned widths, attention removed"),
    "nemotron-h-hybrid": _Row(  # per block of the pattern: half the mamba heads, narrower MLP, fewer experts, removed
        _NEMOTRON_H, 12,
        _cycle({}, {"intermediate_size": H}, _HALF_MAMBA, {}, {}, {"num_local_experts": 4}, _HALF_MAMBA, _NO_MIXER,
               {}, _NO_MIXER, _HALF_MAMBA, {}),
        notes="NemotronH hybrid (M-M*M E pattern): pruned mamba heads, MLP widths, experts; blocks removed"),
    "puzzle-8b": _Row(  # GPU: Llama-3.1-8B shapes with the Super-49B block pattern
        dict(_LLAMA, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
             rope_parameters=_LLAMA3_ROPE),
        32, _super49b(256), hidden=4096, scaled=False, listed=False, short_prompt=128, long_prompt=2048,
        decode_tokens=128, notes="Llama-3.1-8B shapes, Super-49B pattern (GPU)"),
}
# Compile-scaling studies, `<name>-N`: N layers at hidden 256.
BY_DEPTH: dict[str, _Row] = {
    "variants": _Row(
        _LLAMA, 0, _cycle({}, {"skip": ["attention"], "intermediate_size": 384}, {"intermediate_size": 1024}),
        hidden=256, scaled=False, long_prompt=128, decode_tokens=16),
    "puzzle": _Row(_LLAMA, 0, _super49b(64), hidden=256, scaled=False, widest="intermediate_size", long_prompt=128,
                   decode_tokens=16),
}
PRESETS = tuple(name for name, row in TABLE.items() if row.listed)


def _lookup(name: str) -> tuple[_Row, int]:
    """A preset's row and its depth at scale 1."""
    if name in TABLE:
        return TABLE[name], TABLE[name].depth
    prefix, _, depth = name.rpartition("-")
    if prefix in BY_DEPTH and depth.isdigit() and int(depth) > 0:
        return BY_DEPTH[prefix], int(depth)
    studies = " / ".join(f"{p}-N" for p in BY_DEPTH)
    raise ValueError(f"unknown preset {name!r}; known: {list(PRESETS)} and {studies}")


def _resolve(d: dict, hidden: int, layers: int) -> dict:
    return {k: v.at(hidden, layers) if isinstance(v, (_Width, _Depth)) else copy.deepcopy(v) for k, v in d.items()}


def make_preset(name: str, scale: int = 1) -> Preset:
    row, depth = _lookup(name)
    scale = scale if row.scaled else 1
    hidden, layers = row.hidden * scale, depth * scale
    parent = _resolve(row.parent, hidden, layers)
    per_layer = {i: _resolve(o, hidden, layers) for i, o in row.pattern(parent, layers).items()} if row.pattern else {}
    if row.widest is not None:  # Puzzle's parent is its widest layer
        parent[row.widest] = max(o[row.widest] for o in per_layer.values() if row.widest in o)
    if row.sparse:
        per_layer = {i: {k: v for k, v in o.items() if parent.get(k) != v} for i, o in per_layer.items()}
    config = dict(parent, per_layer_config={i: o for i, o in per_layer.items() if o}) if row.pattern else dict(parent)
    prompts = dict(short_prompt=row.short_prompt, long_prompt=row.long_prompt, decode_tokens=row.decode_tokens)
    return Preset(name, config, parent, **prompts, notes=row.notes)
