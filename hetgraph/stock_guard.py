"""What hetgraph writes into config.json so that stock transformers never misreads a checkpoint.

Stock transformers (5.24) builds every decoder layer from the global config. Per-layer widths,
heads, KV heads and head dims it refuses by itself (`AmbiguousGlobalPerLayerAttributeError`), as
long as no file switches its guard off: so `allow_global_per_layer_attribute_access`, which hetgraph
sets on a live config for `save_pretrained`'s validation, is never written. But `skip` and `linear`
blocks and per-layer windows or chunks it silently ignores: it builds the full layer, fills the
removed weights with random values and prints a load report. For those checkpoints hetgraph adds a
per-layer attribute, `requires_hetgraph`, to one layer, and none globally: transformers' own check
then refuses the config in `AutoConfig.from_pretrained` (so in `AutoModelForCausalLM`, `pipeline`
and lm-eval given a path) with "The following attributes are missing: ['requires_hetgraph']".
hetgraph removes it again when it reads the file; configs without it (the seed PR's) read as before.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from typing import Any, Mapping

GUARD = "requires_hetgraph"
SWITCH = "allow_global_per_layer_attribute_access"
# Per-layer entries stock modeling code does not read (and so would silently not apply).
STOCK_IGNORES = {
    "skip": "removed blocks",
    "linear": "blocks replaced by a linear map",
    "sliding_window": "per-layer sliding windows",
    "attention_chunk_size": "per-layer attention chunks",
}


def _entries(config_dict: Mapping[str, Any]) -> dict:
    raw = config_dict.get("per_layer_config") or {}
    return raw if isinstance(raw, Mapping) else {}


def guard_config(config_dict: Mapping[str, Any]) -> dict:
    """The config dict to write: the guard switch dropped, `requires_hetgraph` added where stock would misread."""
    d = copy.deepcopy(dict(config_dict))
    d.pop(SWITCH, None)
    entries = {str(k): dict(v) for k, v in _entries(d).items() if isinstance(v, Mapping)}
    for v in entries.values():
        v.pop(GUARD, None)
    why = sorted({STOCK_IGNORES[k] for v in entries.values() for k in v if k in STOCK_IGNORES and v[k]})
    if why:
        first = min(entries, key=lambda k: int(k) if k.isdigit() else -1)
        entries[first][GUARD] = f"stock transformers ignores {', '.join(why)}: load with hetgraph.from_pretrained"
        if d.get("num_hidden_layers") == 1:
            # The check fires only when some layer lacks the attribute: give it an entry that does.
            entries["1"] = {GUARD: entries[first][GUARD]}
    if entries or "per_layer_config" in d:
        d["per_layer_config"] = entries
    return d


def strip_guard(config_dict: Mapping[str, Any]) -> dict:
    """The config dict as hetgraph reads it: without the guard (nor the switch, which hetgraph sets itself)."""
    d = dict(config_dict)
    d.pop(SWITCH, None)
    entries = _entries(d)
    if any(isinstance(v, Mapping) and GUARD in v for v in entries.values()):
        stripped = {k: {a: x for a, x in v.items() if a != GUARD} for k, v in entries.items()}
        d["per_layer_config"] = {k: v for k, v in stripped.items() if v}
    return d


def guard_saved_config(directory: str | os.PathLike) -> None:
    """Rewrite `directory/config.json` (as transformers saved it) with `guard_config`, atomically."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        d = json.load(f)
    write_json_atomic(path, guard_config(d))


def write_json_atomic(path: str, data: Any) -> None:
    """Write JSON to a temporary file in the same directory, then rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
