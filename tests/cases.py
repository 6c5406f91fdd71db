"""Tiny heterogeneous configs that exercise every per-layer feature of each Llama-family model."""

from __future__ import annotations

import copy

VOCAB = 128

# Layer 0 has no attention: naive sequence-length bookkeeping reads layer 0 and goes wrong.
_PER_LAYER = {
    0: {"skip": ["attention"], "intermediate_size": 96},
    1: {"num_key_value_heads": 1, "sliding_window": 3},
    2: {"skip": ["mlp"], "head_dim": 8, "attention_chunk_size": 4},
    3: {"num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 48},
    4: {"sliding_window": 5, "skip": ["attention", "mlp"]},
    5: {"sliding_window": 5},
}

_GLOBAL = dict(
    hidden_size=64,
    num_hidden_layers=6,
    vocab_size=VOCAB,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def hetero_config(family: str = "llama", **overrides) -> dict:
    """A config.json-style dict with every per-layer feature, for `family`."""
    d = dict(_GLOBAL, model_type=family, per_layer_config=copy.deepcopy(_PER_LAYER))
    if family == "mistral":
        d["sliding_window"] = None  # Mistral's default is a global 4096 window
    d.update(overrides)
    return d


def homogeneous_config(family: str = "llama", **overrides) -> dict:
    d = dict(_GLOBAL, model_type=family)
    d.update(overrides)
    return d
