"""Per-family adapters: the only place that knows transformers' module and attribute names.

`types` holds what a family description is made of, one module per family fills one in
(`llama`, `gpt_oss`, `llama4`, `nemotron_h`), and `registry` finds a family by `model_type`.
"""

from hetgraph.arch.registry import ADAPTERS, adapter_for, supported_model_types
from hetgraph.arch.types import Block, FamilyAdapter, ParamLayout, StoredLayout

__all__ = [
    "ADAPTERS",
    "Block",
    "FamilyAdapter",
    "ParamLayout",
    "StoredLayout",
    "adapter_for",
    "supported_model_types",
]
