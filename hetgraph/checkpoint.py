"""Reading checkpoint directories: config.json plus safetensors (single file or sharded).

Every tensor is checked by name and shape against the model skeleton before any storage is
allocated, so a bad checkpoint gives one error listing every offending tensor and no model.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Callable

import torch
from safetensors import safe_open

from hetgraph.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_config(path: str) -> dict:
    """The config dict of a checkpoint directory or of a bare config.json file."""
    file = path if os.path.isfile(path) else os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise CheckpointError(f"{file}: no such file; a checkpoint directory needs a config.json")
    try:
        with open(file) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: a config must be a JSON object, got a JSON {type(config).__name__}")
    return config


@dataclass(frozen=True)
class Stored:
    """One tensor as a file holds it."""

    file: str
    name: str


@dataclass
class TensorIndex:
    """A checkpoint's tensors under some naming, with their shapes; nothing is read until `load`.

    `open` indexes a directory under the stored names. A name plan (`rename`: the format's and the
    family's renames, tensors a loader ignores dropped) and `stack` (a family that stores one
    tensor per expert where the model holds them stacked) give new indexes over the same files;
    each entry remembers the stored tensor(s) it reads.
    """

    entries: dict[str, tuple[Stored, ...]]  # name -> the stored tensor(s) it reads
    shapes: dict[str, tuple[int, ...]]
    stacked: frozenset[str] = frozenset()  # names whose parts are stacked on a new dim 0

    @property
    def files(self) -> dict[str, str]:
        """Name -> the file holding it (its first part)."""
        return {name: parts[0].file for name, parts in self.entries.items()}

    @classmethod
    def open(cls, directory: str) -> "TensorIndex":
        single = os.path.join(directory, SINGLE_FILE)
        index = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index) and os.path.exists(single):
            raise CheckpointError(
                f"{directory}: holds both {SINGLE_FILE} and {INDEX_FILE}; one is left from another save "
                f"(remove it): hetgraph does not guess which"
            )
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f).get("weight_map")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not valid JSON with a 'weight_map' ({e})") from e
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: has no 'weight_map'")
            shard_names = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            shard_names = [SINGLE_FILE]
        else:
            raise CheckpointError(
                f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}; hetgraph loads safetensors only (no pickle)"
            )
        entries, shapes = {}, {}
        for shard in shard_names:
            shard_path = os.path.join(directory, shard)
            for name, shape in _read_header(shard_path).items():
                if name in entries:
                    raise CheckpointError(f"{shard_path}: tensor {name!r} is also stored in {entries[name][0].file}")
                entries[name], shapes[name] = (Stored(shard_path, name),), shape
        return cls(entries, shapes)

    def rename(self, new_name: Callable[[str], str | None]) -> "TensorIndex":
        """The index under `new_name(name)`; a tensor it maps to None is left out."""
        entries, shapes, source, stacked = {}, {}, {}, set()
        for name, parts in self.entries.items():
            target = new_name(name)
            if target is None:
                continue
            if target in entries:
                raise CheckpointError(f"stored tensors {source[target]!r} and {name!r} both map to {target!r}")
            entries[target], shapes[target], source[target] = parts, self.shapes[name], name
            if name in self.stacked:
                stacked.add(target)
        return TensorIndex(entries, shapes, frozenset(stacked))

    def stack(self, pattern: re.Pattern, target: str) -> "TensorIndex":
        """Tensors whose names match `pattern` (groups `index`, and those `target` formats with) as one
        tensor per target name, stacked by `index`. Only parts numbered 0..N-1 of one shape are
        stacked; others keep their names (and the strict check then reports them)."""
        groups: dict[str, dict[int, str]] = {}
        for name in self.entries:
            m = pattern.fullmatch(name)
            if m:
                groups.setdefault(target.format(**m.groupdict()), {})[int(m["index"])] = name
        entries, shapes, stacked_names = dict(self.entries), dict(self.shapes), set(self.stacked)
        for stacked, by_index in groups.items():
            ordered = [by_index[k] for k in sorted(by_index)]
            if sorted(by_index) != list(range(len(ordered))) or len({self.shapes[n] for n in ordered}) != 1:
                continue
            if stacked in entries:
                raise CheckpointError(f"stored tensor {stacked!r} is also stored as the parts {ordered[:2]}...")
            for n in ordered:
                del entries[n], shapes[n]
            entries[stacked] = tuple(part for n in ordered for part in self.entries[n])
            shapes[stacked] = (len(ordered), *self.shapes[ordered[0]])
            stacked_names.add(stacked)
        return TensorIndex(entries, shapes, frozenset(stacked_names))

    def load(self, name: str) -> torch.Tensor:
        parts = [_load(stored) for stored in self.entries[name]]
        return torch.stack(parts) if name in self.stacked else parts[0]


def _load(stored: Stored) -> torch.Tensor:
    try:
        with safe_open(stored.file, framework="pt") as f:
            return f.get_tensor(stored.name)
    except Exception as e:  # safetensors raises its own error types for bad data
        raise CheckpointError(f"{stored.file}: cannot read tensor {stored.name!r}: {e}") from e

def _read_header(path: str) -> dict[str, tuple[int, ...]]:
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: shard listed in the index is missing")
    try:
        with safe_open(path, framework="pt") as f:
            names = list(f.keys())
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in names}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    _check_data_length(path, shapes)
    return shapes


def _check_data_length(path: str, shapes) -> None:
    """A truncated file can still have a valid header: compare the promised bytes with the file size."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    actual = os.path.getsize(path) - 8 - header_len
    if actual < end:
        raise CheckpointError(f"{path}: truncated: header promises {end} data bytes, file holds {actual}")


def check_tensors(expected: dict[str, tuple[int, ...]], index: TensorIndex) -> None:
    """One error listing every missing, unexpected and mis-shaped tensor."""
    problems = []
    for name in sorted(set(expected) - set(index.shapes)):
        problems.append(f"missing: {name} (expected shape {list(expected[name])})")
    for name in sorted(set(index.shapes) - set(expected)):
        problems.append(f"unexpected: {name} (shape {list(index.shapes[name])}, in {index.files[name]})")
    for name in sorted(set(expected) & set(index.shapes)):
        if tuple(expected[name]) != tuple(index.shapes[name]):
            problems.append(
                f"wrong shape: {name}: expected {list(expected[name])}, found {list(index.shapes[name])}"
            )
    if problems:
        raise CheckpointError(
            f"checkpoint does not match its config ({len(problems)} problem(s)):\n  " + "\n  ".join(problems)
        )
