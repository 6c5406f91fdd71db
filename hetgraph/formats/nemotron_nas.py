"""Nemotron-NAS / Puzzle checkpoints (`model_type` "nemotron-nas", `DeciLMForCausalLM`) onto Llama.

The layout stores one `block_configs` entry per layer:

    {"attention": {"no_op", "replace_with_linear", "n_heads_in_group", ...},
     "ffn":       {"no_op", "replace_with_linear", "ffn_mult", ...}}

and maps onto Llama's per-layer form as: `n_heads_in_group` g -> `num_key_value_heads` =
heads / g; `ffn_mult` m -> `intermediate_size` = int(2 * m * hidden / 3) rounded up to a multiple
of 256 (m rounded to 6 decimals first, as DeciLM does); `no_op` -> the block in "skip" (its norm
has no weights either); `replace_with_linear` -> the block in "linear" (norm -> Linear(hidden,
hidden, no bias) -> residual). The global (parent) values are the largest layer's: the most KV
heads and the widest MLP, i.e. the model the search started
from (Llama-3.3-70B for Super-49B).

Weight names are already Llama's, plus `self_attn.linear_attn.weight` / `mlp.linear_mlp.weight`,
which hetgraph's linear blocks use verbatim: the weight-name map is the identity.

`from_per_layer` writes the layout back (`hetgraph.convert(..., to="nemotron-nas")`) for the Llama
models it can express: per-layer KV heads, MLP widths (as `ffn_mult`), removed and linear blocks;
per-layer query heads, head dims or windows are refused, naming the layer.

Fields hetgraph does not implement (sparsity, windowed or sink-token attention, parallel blocks)
are accepted only at their default (off) values; anything else is an error naming the block and the
field, never ignored.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

from hetgraph.errors import HeteroConfigError

NAME = "nemotron-nas"
MODEL_TYPE = "nemotron-nas"
MODEL_TYPES = (MODEL_TYPE, "deci")  # "deci": NVIDIA's own small test configs (TensorRT-LLM)
ARCHITECTURE = "DeciLMForCausalLM"
FFN_MULTIPLE = 256

# Fields of each sub-block that change the computation, with the value meaning "off". hetgraph
# implements none of them, so only these values are accepted.
_UNSUPPORTED_DEFAULTS = {
    "attention": {
        "sparsify": None,
        "window_length": None,
        "num_sink_tokens": None,
        "use_prefill_window_in_sink_attention": False,
        "unshifted_sink": False,
    },
    "ffn": {"sparsify": None},
}
_BLOCK_LEVEL_DEFAULTS = {"parallel_blocks": None}
_KNOWN = {
    "attention": ("no_op", "replace_with_linear", "n_heads_in_group"),
    "ffn": ("no_op", "replace_with_linear", "ffn_mult"),
}
_HETGRAPH_BLOCK = {"attention": "attention", "ffn": "mlp"}
_SUPPORTED_ROPE = ("default", "llama3")
_LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def detect(config_dict: Mapping[str, Any]) -> bool:
    """By `model_type` (or DeciLM's architecture): other Puzzle families use `block_configs` too."""
    return config_dict.get("model_type") in MODEL_TYPES or ARCHITECTURE in (config_dict.get("architectures") or ())


def ffn_width(ffn_mult: float, hidden_size: int) -> int:
    """DeciLM's MLP width: int(2 * ffn_mult * hidden / 3), rounded up to a multiple of 256.

    DeciLM first rounds ffn_mult to 6 decimals, and evaluates the same float expression: so do we.
    """
    width = int(2 * round(ffn_mult, 6) * hidden_size / 3)
    return -(-width // FFN_MULTIPLE) * FFN_MULTIPLE


def to_per_layer(config_dict: Mapping[str, Any]) -> dict:
    """A Llama config dict with `per_layer_config` from a Nemotron-NAS one; pure, raises HeteroConfigError."""
    d = copy.deepcopy(dict(config_dict))
    blocks = d.pop("block_configs", None)
    hidden, heads, num_layers = (_global_int(d, k) for k in ("hidden_size", "num_attention_heads", "num_hidden_layers"))
    if not isinstance(blocks, list):
        raise HeteroConfigError(
            f"nemotron-nas: block_configs={_short(blocks)} must be a list with one entry per layer "
            f"(num_hidden_layers={num_layers})"
        )
    if len(blocks) != num_layers:
        raise HeteroConfigError(
            f"nemotron-nas: block_configs has {len(blocks)} entries but num_hidden_layers={num_layers}; "
            "allowed: exactly one block config per layer"
        )
    if d.get("per_layer_config"):
        raise HeteroConfigError("nemotron-nas: a config has either block_configs or per_layer_config, not both")
    layers = [_read_block(i, b, heads, hidden) for i, b in enumerate(blocks)]

    kv = [l["num_key_value_heads"] for l in layers if "num_key_value_heads" in l]
    widths = [l["intermediate_size"] for l in layers if "intermediate_size" in l]
    # The parent: the largest layer present (with no such layer, plain multi-head attention / 4x MLP).
    d["num_key_value_heads"] = max(kv, default=heads)
    d["intermediate_size"] = max(widths, default=4 * hidden)
    overrides = {}
    for i, layer in enumerate(layers):
        o = {k: v for k, v in layer.items() if k in ("skip", "linear") or v != d[k]}
        if o:
            overrides[i] = o
    d["per_layer_config"] = overrides
    _rope_to_parameters(d)
    d.pop("auto_map", None)  # remote code this layout needed; the stock class replaces it
    d["model_type"] = "llama"
    d["architectures"] = ["LlamaForCausalLM"]
    return d


def weight_name(config_dict: Mapping[str, Any], stored_name: str) -> str | None:
    """The identity: Nemotron-NAS stores Llama names, and hetgraph's linear blocks use DeciLM's."""
    return stored_name


def _read_block(i: int, block: Any, heads: int, hidden: int) -> dict:
    """One block config -> {"skip": [...], "linear": [...], "num_key_value_heads"?, "intermediate_size"?}."""
    where = f"nemotron-nas block_configs[{i}]"
    if not isinstance(block, Mapping):
        raise HeteroConfigError(f"{where}: must be a mapping with 'attention' and 'ffn', got {_short(block)}")
    for key, value in block.items():
        if key in _KNOWN:
            continue
        default = _BLOCK_LEVEL_DEFAULTS.get(key)
        if value != default:
            raise HeteroConfigError(
                f"{where}: {key}={_short(value)} is not supported by hetgraph; allowed: {default!r} (or absent)"
            )
    layer: dict[str, Any] = {"skip": [], "linear": []}
    for sub in ("attention", "ffn"):
        if sub not in block:
            raise HeteroConfigError(f"{where}: missing {sub!r}; each block config has 'attention' and 'ffn'")
        fields = block[sub]
        if not isinstance(fields, Mapping):
            raise HeteroConfigError(f"{where}.{sub}: must be a mapping, got {_short(fields)}")
        _check_unsupported(f"{where}.{sub}", sub, fields)
        no_op = _flag(f"{where}.{sub}", fields, "no_op")
        linear = _flag(f"{where}.{sub}", fields, "replace_with_linear")
        if no_op and linear:
            raise HeteroConfigError(
                f"{where}.{sub}: no_op and replace_with_linear are both true; a block is at most one of them"
            )
        if no_op:
            layer["skip"].append(_HETGRAPH_BLOCK[sub])
        elif linear:
            layer["linear"].append(_HETGRAPH_BLOCK[sub])
        elif sub == "attention":
            layer["num_key_value_heads"] = _kv_heads(f"{where}.attention", fields, heads)
        else:
            layer["intermediate_size"] = ffn_width(_ffn_mult(f"{where}.ffn", fields), hidden)
    return {k: v for k, v in layer.items() if v != []}


def _check_unsupported(where: str, sub: str, fields: Mapping) -> None:
    defaults = _UNSUPPORTED_DEFAULTS[sub]
    for key, value in fields.items():
        if key in _KNOWN[sub]:
            continue
        if key in defaults:
            if value != defaults[key]:
                raise HeteroConfigError(
                    f"{where}: {key}={_short(value)} is not supported by hetgraph; allowed: {defaults[key]!r}"
                )
        elif value is not None:
            raise HeteroConfigError(
                f"{where}: unknown field {key}={_short(value)}; hetgraph knows {sorted([*_KNOWN[sub], *defaults])} "
                "and accepts an unknown field only when it is null"
            )


def _flag(where: str, fields: Mapping, key: str) -> bool:
    value = fields.get(key, False)  # DeciLM's default
    if not isinstance(value, bool):
        raise HeteroConfigError(f"{where}: {key}={_short(value)} must be true or false")
    return value


def _kv_heads(where: str, fields: Mapping, heads: int) -> int:
    if "n_heads_in_group" not in fields:
        raise HeteroConfigError(f"{where}: missing n_heads_in_group, required for a full attention block")
    group = fields["n_heads_in_group"]
    if not isinstance(group, int) or isinstance(group, bool) or group <= 0 or heads % group:
        raise HeteroConfigError(
            f"{where}: n_heads_in_group={_short(group)} is invalid; allowed: a positive divisor of "
            f"num_attention_heads={heads}"
        )
    return heads // group


def _ffn_mult(where: str, fields: Mapping) -> float:
    if "ffn_mult" not in fields:
        raise HeteroConfigError(f"{where}: missing ffn_mult, required for a full MLP block")
    mult = fields["ffn_mult"]
    if not isinstance(mult, (int, float)) or isinstance(mult, bool) or mult <= 0:
        raise HeteroConfigError(f"{where}: ffn_mult={_short(mult)} is invalid; allowed: a positive number")
    return mult


def _global_int(d: Mapping, key: str) -> int:
    value = d.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise HeteroConfigError(f"nemotron-nas: global {key}={_short(value)} must be a positive integer")
    return value


def _rope_to_parameters(d: dict) -> None:
    """`rope_theta` + `rope_scaling` (type "llama3" or none) -> Llama's `rope_parameters`."""
    scaling = d.pop("rope_scaling", None)
    theta = d.pop("rope_theta", None)
    if "rope_parameters" in d:
        if scaling is not None or theta is not None:
            raise HeteroConfigError("nemotron-nas: rope_parameters and rope_scaling/rope_theta are both set")
        return
    scaling = dict(scaling or {})
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type not in _SUPPORTED_ROPE:
        raise HeteroConfigError(
            f"nemotron-nas: rope_scaling type {rope_type!r} is not supported; allowed: {list(_SUPPORTED_ROPE)}"
        )
    if rope_type == "llama3":
        missing = [k for k in _LLAMA3_ROPE_KEYS if k not in scaling]
        if missing:
            raise HeteroConfigError(f"nemotron-nas: rope_scaling of type 'llama3' lacks {missing}")
        scaling = {k: scaling[k] for k in _LLAMA3_ROPE_KEYS}
    elif scaling:
        raise HeteroConfigError(f"nemotron-nas: rope_scaling type 'default' takes no parameters, got {scaling}")
    d["rope_parameters"] = {"rope_type": rope_type, "rope_theta": 10000.0 if theta is None else theta, **scaling}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- writing: the per-layer form back into `block_configs` -------------------------------------------

# What a written block config holds besides the fields it sets: every "off" value, as NVIDIA's files do.
_WRITTEN_OFF = {
    "attention": {"num_sink_tokens": None, "sparsify": None, "unshifted_sink": False,
                  "use_prefill_window_in_sink_attention": False, "window_length": None},
    "ffn": {"sparsify": None},
}  # fmt: skip
# Stock Llama config keys the DeciLM layout has no field for, with the value DeciLM implies.
_DECILM_IMPLIES = {"head_dim": None, "pretraining_tp": 1}


def ffn_mult_for(width: int, hidden_size: int) -> float | None:
    """The `ffn_mult` (6 decimals) that `ffn_width` maps to `width`, or None where none does."""
    if width % FFN_MULTIPLE:
        return None
    mult = round(3 * width / (2 * hidden_size), 6)
    for candidate in (mult, mult + 1e-6, mult - 1e-6):  # the float expression may land one ulp below
        if ffn_width(candidate, hidden_size) == width:
            return round(candidate, 6)
    return None


def from_per_layer(config_dict: Mapping[str, Any], spec) -> dict:
    """The Nemotron-NAS (DeciLM) config.json dict of a Llama model with per-layer config `config_dict`
    and LayerSpec table `spec`; raises HeteroConfigError naming the layer where the layout cannot
    express it. Tensor names are the same in both layouts (`weight_name` is the identity)."""
    d = copy.deepcopy(dict(config_dict))
    if d.get("model_type") != "llama":
        raise HeteroConfigError(
            f"nemotron-nas: the layout is DeciLM's, a Llama; model_type={d.get('model_type')!r} cannot be written "
            "(allowed: llama)"
        )
    hidden, heads = spec.hidden_size, _global_int(d, "num_attention_heads")
    if hidden % heads:
        raise HeteroConfigError(f"nemotron-nas: hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    head_dim = hidden // heads  # DeciLM's: it has no head_dim field
    for key, implied in _DECILM_IMPLIES.items():
        value = d.pop(key, None)
        if value not in (None, implied) and not (key == "head_dim" and value == head_dim):
            raise HeteroConfigError(
                f"nemotron-nas: {key}={_short(value)} cannot be written; DeciLM implies "
                f"{head_dim if key == 'head_dim' else implied!r}"
            )
    d["block_configs"] = [_write_block(s, heads, head_dim, hidden) for s in spec]
    for key in ("per_layer_config", "layer_types", "sliding_window", "attention_chunk_size"):
        value = d.pop(key, None)
        if key == "layer_types" and value and set(value) != {"full_attention"}:
            raise HeteroConfigError(f"nemotron-nas: layer_types {sorted(set(value))} cannot be written; allowed: full")
    d["num_key_value_heads"] = None  # per block only, as NVIDIA's files
    d["intermediate_size"] = None
    _rope_from_parameters(d)
    d["model_type"] = MODEL_TYPE
    d["architectures"] = [ARCHITECTURE]
    return d


def _write_block(s, heads: int, head_dim: int, hidden: int) -> dict:
    where = f"layer {s.index}"
    if s.mamba != "none" or s.mixer_type is not None or s.extra:
        raise HeteroConfigError(f"nemotron-nas: {where} ({s.describe()}) has blocks DeciLM does not know")
    attention = {"n_heads_in_group": None, "no_op": s.attention == "skip",
                 "replace_with_linear": s.attention == "linear"}  # fmt: skip
    if s.has_attention:
        for name, value, allowed in (("num_attention_heads", s.num_attention_heads, heads),
                                     ("head_dim", s.head_dim, head_dim)):  # fmt: skip
            if value != allowed:
                raise HeteroConfigError(
                    f"nemotron-nas: {where} has {name}={value}; DeciLM has one for every layer ({allowed}), "
                    "only KV heads vary per layer"
                )
        kind, size = s.window
        if size is not None:
            raise HeteroConfigError(f"nemotron-nas: {where} has a {kind} window of {size}; DeciLM blocks attend fully")
        attention["n_heads_in_group"] = heads // s.num_key_value_heads
    ffn = {"ffn_mult": None, "no_op": s.mlp == "skip", "replace_with_linear": s.mlp == "linear"}
    if s.mlp == "full":
        mult = ffn_mult_for(s.intermediate_size, hidden)
        if mult is None:
            raise HeteroConfigError(
                f"nemotron-nas: {where} has intermediate_size={s.intermediate_size}; DeciLM widths are "
                f"int(2 * ffn_mult * {hidden} / 3) rounded up to a multiple of {FFN_MULTIPLE}"
            )
        ffn["ffn_mult"] = mult
    return {"attention": {**attention, **_WRITTEN_OFF["attention"]}, "ffn": {**ffn, **_WRITTEN_OFF["ffn"]}}


def _rope_from_parameters(d: dict) -> None:
    """Llama's `rope_parameters` -> `rope_theta` + `rope_scaling` (DeciLM's transformers-4 fields)."""
    params = dict(d.pop("rope_parameters", None) or {})
    d.pop("rope_scaling", None)
    rope_type = params.pop("rope_type", "default")
    if rope_type not in _SUPPORTED_ROPE:
        raise HeteroConfigError(
            f"nemotron-nas: rope type {rope_type!r} cannot be written; allowed: {list(_SUPPORTED_ROPE)}"
        )
    d["rope_theta"] = params.pop("rope_theta", 10000.0)
    scaling = {k: params.pop(k) for k in _LLAMA3_ROPE_KEYS if k in params} if rope_type == "llama3" else {}
    if params or (rope_type == "llama3" and len(scaling) != len(_LLAMA3_ROPE_KEYS)):
        raise HeteroConfigError(
            f"nemotron-nas: rope_parameters of type {rope_type!r} with {sorted(params) or 'missing keys'} cannot be "
            f"written; DeciLM's rope_scaling holds {list(_LLAMA3_ROPE_KEYS) if scaling else 'nothing'} for this type"
        )
    d["rope_scaling"] = {"rope_type": "llama3", **scaling} if scaling else None
