"""Importers of other checkpoint layouts into the one per-layer form hetgraph builds from.

A format is data plus two pure functions: `to_per_layer(config_dict) -> config_dict` (a stock-family
config.json dict with transformers' `per_layer_config`) and `weight_name(config_dict, stored) ->
name | None` (its weight-name map: the hetgraph name of a stored tensor, or None for a tensor the
format's own loader ignores). `read` is the one place that dispatches, once per config: it returns
both as a `Layout`. `hetgraph.configs.config_from_dict` reads through it, so `from_pretrained`,
`from_config`, `inspect` and `convert` all accept every layout.

    nemotron-nas       `block_configs` (DeciLMForCausalLM)          -> llama       (names: identity)
    nemotron_h_puzzle  `block_configs` (NemotronHPuzzleForCausalLM) -> nemotron_h  (names: drops the MTP head's)
    gpt_oss_puzzle     `block_configs` (GptOssPuzzleForCausalLM)    -> gpt_oss     (names: drops KV scales)
    llm-drop           `drop_attn_list` / `drop_mlp_list`            -> same family (names: drops dropped blocks')
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from hetgraph.errors import HeteroConfigError
from hetgraph.formats import gpt_oss_puzzle, llm_drop, nemotron_h_puzzle, nemotron_nas


@dataclass(frozen=True)
class Format:
    name: str
    detect: Callable[[Mapping[str, Any]], bool]
    to_per_layer: Callable[[Mapping[str, Any]], dict]
    weight_name: Callable[[Mapping[str, Any], str], "str | None"]


FORMATS: tuple[Format, ...] = tuple(
    Format(m.NAME, m.detect, m.to_per_layer, m.weight_name)
    for m in (nemotron_nas, nemotron_h_puzzle, gpt_oss_puzzle, llm_drop)
)


def detect(config_dict: Mapping[str, Any]) -> Format | None:
    """The format of a config dict, or None for the native per-layer form; two at once is an error.

    Formats are told apart by `model_type` first: Nemotron-NAS, NemotronH-Puzzle
    (`nemotron_h_puzzle`) and gpt-oss-puzzle (`gpt_oss_puzzle`) all store `block_configs`, each with
    its own schema.
    """
    found = [f for f in FORMATS if f.detect(config_dict)]
    if config_dict.get("block_configs") is not None and not found:
        model_type = config_dict.get("model_type")
        architectures = config_dict.get("architectures") or []
        raise HeteroConfigError(
            f"config has `block_configs` but model_type={model_type!r} (architectures {architectures}): "
            f"hetgraph does not read that layout; the `block_configs` it reads are Nemotron-NAS "
            f"(model_type {list(nemotron_nas.MODEL_TYPES)} or {nemotron_nas.ARCHITECTURE}), "
            f"{nemotron_h_puzzle.MODEL_TYPE} and {gpt_oss_puzzle.MODEL_TYPE}"
        )
    if len(found) > 1:
        raise HeteroConfigError(
            f"config matches several checkpoint layouts {[f.name for f in found]}; hetgraph reads one at a time"
        )
    return found[0] if found else None


@dataclass(frozen=True)
class Layout:
    """A config.json dict read once: its per-layer form, and how its stored tensors are named."""

    format: str | None  # the format read; None for the native per_layer_config form
    config: Mapping[str, Any]  # the stock-family dict with `per_layer_config`
    weight_name: Callable[[str], "str | None"]  # stored name -> hetgraph name; None: a tensor left unread


def read(config_dict: Mapping[str, Any]) -> Layout:
    """Detect the layout of a config dict (once) and read it into the per-layer form."""
    fmt = detect(config_dict)
    if fmt is None:
        return Layout(None, config_dict, _same_name)
    return Layout(fmt.name, fmt.to_per_layer(config_dict), functools.partial(fmt.weight_name, config_dict))


def _same_name(stored: str) -> str:
    return stored
