"""Every family hetgraph supports, by `model_type`."""

from __future__ import annotations

from hetgraph.arch.gpt_oss import GPT_OSS
from hetgraph.arch.llama import LLAMA_FAMILY
from hetgraph.arch.llama4 import LLAMA4_TEXT
from hetgraph.arch.nemotron_h import NEMOTRON_H
from hetgraph.arch.types import FamilyAdapter
from hetgraph.errors import HeteroConfigError

ADAPTERS: tuple[FamilyAdapter, ...] = (*LLAMA_FAMILY, GPT_OSS, LLAMA4_TEXT, NEMOTRON_H)
_BY_MODEL_TYPE = {mt: a for a in ADAPTERS for mt in a.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def adapter_for(model_type: str) -> FamilyAdapter:
    """The adapter of a `model_type`; raises HeteroConfigError listing the supported ones."""
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        raise HeteroConfigError(
            f"model_type {model_type!r} is not supported by hetgraph; supported: {supported_model_types()}"
        ) from None
