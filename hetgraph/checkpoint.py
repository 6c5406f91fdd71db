"""Reading checkpoint directories: config.json plus safetensors (single file or sharded).

Every tensor is checked by name and shape against the model skeleton before any storage is
allocated, so a bad checkpoint gives one error listing every offending tensor and no model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

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
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e


@dataclass
class TensorIndex:
    """Where each tensor of a checkpoint lives, and its stored shape."""

    files: dict[str, str]  # tensor name -> file path
    shapes: dict[str, tuple[int, ...]]

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
        files, shapes = {}, {}
        for shard in shard_names:
            shard_path = os.path.join(directory, shard)
            for name, shape in _read_header(shard_path).items():
                if name in files:
                    raise CheckpointError(f"{shard_path}: tensor {name!r} is also stored in {files[name]}")
                files[name], shapes[name] = shard_path, shape
        return cls(files, shapes)

    def load(self, name: str) -> torch.Tensor:
        path = self.files[name]
        try:
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for bad data
            raise CheckpointError(f"{path}: cannot read tensor {name!r}: {e}") from e


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
