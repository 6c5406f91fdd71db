"""Independent plain-PyTorch references, one module per family, that model tests compare against.

Each reads a checkpoint directory (config.json and safetensors) itself and writes the math out with
torch, safetensors and the standard library only: never transformers' modeling code, never hetgraph.
"""

import json
import os

from . import gpt_oss, llama, llama4, nemotron_h

# config.json's model_type -> the reference that reads it.
BY_MODEL_TYPE = {
    **{model_type: llama for model_type in (*llama.FAMILIES, "nemotron-nas")},
    "gpt_oss": gpt_oss,
    "llama4_text": llama4,
    "nemotron_h": nemotron_h,
}


def load_reference(path, strict=True):
    """The reference model of the checkpoint at `path`, by its config.json's model_type."""
    with open(os.path.join(path, "config.json")) as f:
        model_type = json.load(f)["model_type"]
    if model_type not in BY_MODEL_TYPE:
        raise ValueError(f"{path}: no reference for model_type {model_type!r}; known: {sorted(BY_MODEL_TYPE)}")
    return BY_MODEL_TYPE[model_type].load_reference(path, strict=strict)
