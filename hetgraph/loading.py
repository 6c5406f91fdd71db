"""Opening a checkpoint directory: the one data path of `from_pretrained`, `convert` and `inspect`.

    config.json --formats.read (once)--> per-layer dict --configs--> config object
    safetensors --TensorIndex.open--> stored names --format's names, family's StoredLayout--> model names

Nothing is read but config.json and the safetensors headers; `TensorIndex.load` reads a tensor.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Mapping

from transformers import PreTrainedConfig

from hetgraph import formats
from hetgraph.arch import StoredLayout, adapter_for
from hetgraph.checkpoint import TensorIndex, read_config
from hetgraph.configs import config_from_per_layer
from hetgraph.stock_guard import strip_guard

logger = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    path: str
    config_dict: Mapping[str, Any]  # config.json as stored
    config: PreTrainedConfig  # hetgraph's config for it
    layout: str | None  # the format read (`hetgraph.formats`), None for per_layer_config
    index: TensorIndex | None  # its tensors under the model's names; None without weight files


def open_checkpoint(path: str, *, weights: bool = True) -> Checkpoint:
    """Read a checkpoint's config (any layout) and index its tensors under the model's names.

    `weights=False` reads the config only (a bare config.json, or a directory without weights).
    """
    config_dict = read_config(path)
    layout = formats.read(strip_guard(config_dict))
    config = config_from_per_layer(layout.config)
    index = None
    if weights:
        stored = TensorIndex.open(path)
        index = stored.rename(layout.weight_name)
        if len(index.shapes) < len(stored.shapes):
            left = sorted(set(stored.shapes) - {s.name for parts in index.entries.values() for s in parts})
            logger.info("%s: ignoring %d stored tensor(s) of removed blocks, e.g. %s", layout.format, len(left), left[0])
        index = with_stored_layout(index, adapter_for(config.model_type).stored_layout)
    return Checkpoint(path, config_dict, config, layout.format, index)


def with_stored_layout(index: TensorIndex, layout: StoredLayout) -> TensorIndex:
    """`index` under the model's names, from a family's stored names (e.g. NemotronH's `backbone.`)."""
    if layout.prefixes:
        index = index.rename(lambda name: _renamed_prefix(name, layout.prefixes))
    for pattern, target in layout.stacked:
        index = index.stack(re.compile(pattern), target)
    return index


def _renamed_prefix(name: str, prefixes) -> str:
    for stored, model in prefixes:
        if name.startswith(stored):
            return model + name[len(stored) :]
    return name
