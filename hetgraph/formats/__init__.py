"""Importers of other checkpoint layouts into the one per-layer form hetgraph builds from.

A format is data plus two pure functions: `to_per_layer(config_dict) -> config_dict` (a stock-family
config.json dict with transformers' `per_layer_config`) and `weight_name(config_dict, stored) ->
name | None` (its weight-name map: the hetgraph name of a stored tensor, or None for a tensor the
format's own loader ignores). `normalize` is the one place that dispatches; `spec.config_from_dict`
calls it, so `from_pretrained`, `from_config`, `inspect` and `convert` all accept every layout.

    nemotron-nas  `block_configs` (DeciLMForCausalLM)   -> llama        (names: identity)
    llm-drop      `drop_attn_list` / `drop_mlp_list`     -> same family  (names: drops dropped blocks')
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from hetgraph.checkpoint import TensorIndex
from hetgraph.formats import llm_drop, nemotron_nas
from hetgraph.errors import HeteroConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Format:
    name: str
    detect: Callable[[Mapping[str, Any]], bool]
    to_per_layer: Callable[[Mapping[str, Any]], dict]
    weight_name: Callable[[Mapping[str, Any], str], "str | None"]


FORMATS: tuple[Format, ...] = tuple(
    Format(m.NAME, m.detect, m.to_per_layer, m.weight_name) for m in (nemotron_nas, llm_drop)
)


def detect(config_dict: Mapping[str, Any]) -> Format | None:
    """The format of a config dict, or None for the native per-layer form; two at once is an error.

    Formats are told apart by `model_type` first: NemotronH-Puzzle (`nemotron_h_puzzle`) and
    gpt-oss-puzzle (`gpt_oss_puzzle`) store `block_configs` too, with other schemas.
    """
    found = [f for f in FORMATS if f.detect(config_dict)]
    if config_dict.get("block_configs") is not None and not found:
        model_type = config_dict.get("model_type")
        architectures = config_dict.get("architectures") or []
        raise HeteroConfigError(
            f"config has `block_configs` but model_type={model_type!r} (architectures {architectures}): "
            f"hetgraph does not read that layout; the `block_configs` it reads are Nemotron-NAS "
            f"(model_type {list(nemotron_nas.MODEL_TYPES)} or {nemotron_nas.ARCHITECTURE})"
        )
    if len(found) > 1:
        raise HeteroConfigError(
            f"config matches several checkpoint layouts {[f.name for f in found]}; hetgraph reads one at a time"
        )
    return found[0] if found else None


def normalize(config_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """The per-layer form of any supported layout (the dict itself when it already is one)."""
    fmt = detect(config_dict)
    return config_dict if fmt is None else fmt.to_per_layer(config_dict)


def weight_names(config_dict: Mapping[str, Any], stored: list[str]) -> dict[str, str]:
    """hetgraph name -> stored name, for the stored tensors the model uses."""
    fmt = detect(config_dict)
    if fmt is None:
        return {name: name for name in stored}
    mapping, ignored = {}, []
    for name in stored:
        target = fmt.weight_name(config_dict, name)
        if target is None:
            ignored.append(name)
        elif target in mapping:
            raise HeteroConfigError(f"{fmt.name}: tensors {mapping[target]!r} and {name!r} both map to {target!r}")
        else:
            mapping[target] = name
    if ignored:
        logger.info("%s: ignoring %d stored tensor(s) of removed blocks, e.g. %s", fmt.name, len(ignored), ignored[0])
    return mapping


def map_index(config_dict: Mapping[str, Any], index: TensorIndex) -> TensorIndex:
    """A checkpoint's TensorIndex under hetgraph's names: ignored tensors left out, renamed ones renamed."""
    names = weight_names(config_dict, list(index.shapes))
    files = {target: index.files[stored] for target, stored in names.items()}
    shapes = {target: index.shapes[stored] for target, stored in names.items()}
    if all(target == stored for target, stored in names.items()):
        return TensorIndex(files, shapes)
    return RenamedIndex(files, shapes, stored=names)


@dataclass
class RenamedIndex(TensorIndex):
    """A TensorIndex whose names differ from the stored ones; `load` reads the stored tensor."""

    stored: dict[str, str] = field(default_factory=dict)  # hetgraph name -> stored name

    def load(self, name: str):
        stored = self.stored[name]
        return TensorIndex({stored: self.files[name]}, {}).load(stored)
