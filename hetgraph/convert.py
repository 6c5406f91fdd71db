"""Rewrite a checkpoint into transformers' `per_layer_config` layout (or, for what it can express,
the Nemotron-NAS `block_configs` layout serving engines read), one tensor at a time.

`convert(src, dst)`: the checkpoint is opened as `from_pretrained` opens it (`hetgraph.loading`:
any layout, the family's stored names), the config goes through the stock config class (what
`save_pretrained` would write), every stored tensor is checked by name and shape against the model
skeleton (built on the meta device: no storage) before anything is written, then each tensor is
read with safetensors' `safe_open`, written straight into its shard, and dropped. Peak memory is
the largest tensor, not the model. The safetensors files are written directly (8-byte header
length, JSON header, raw little-endian data), so a shard is never held in memory either.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile

import torch
from safetensors import safe_open

from hetgraph import stock_guard
from hetgraph.build import checkpoint_skeleton
from hetgraph.checkpoint import INDEX_FILE, SINGLE_FILE, TensorIndex
from hetgraph.configs import model_config_dict
from hetgraph.errors import CheckpointError
from hetgraph.formats import nemotron_nas
from hetgraph.loading import open_checkpoint
from hetgraph.stock_guard import write_json_atomic

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "2GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
# Files of the source that are not weights, config or remote code: copied as they are (tokenizer etc.).
LAYOUTS = ("per-layer", nemotron_nas.NAME)  # what `convert(..., to=)` writes
_NOT_COPIED = re.compile(r"(^config\.json$|\.safetensors$|\.safetensors\.index\.json$|\.py$|^\.)")


def parse_size(size: str | int) -> int:
    """Bytes of "2GB", "500MB", "20KiB" or an int (decimal units like transformers', binary with "iB")."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        unit = match.group(2).upper() if match else None
        if unit not in _UNITS:
            raise ValueError(f"max shard size {size!r} is not a size; examples: 2GB, 500MB, 64MiB, 1000000")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"max shard size {size!r} must be positive")
    return value


def convert(
    src: str,
    dst: str,
    *,
    to: str = "per-layer",
    infer_shapes: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = True,
) -> list[str]:
    """Write `src` (any layout hetgraph reads) to `dst`; returns the files written.

    `to="per-layer"`: transformers' `per_layer_config` layout. `to="nemotron-nas"`: DeciLM's
    `block_configs`, which vLLM, SGLang, TensorRT-LLM and llama.cpp read (Llama models only: per-layer
    KV heads, widths, removed and linear blocks; anything else is refused naming the layer, before
    anything is written). The tensors are the same in both. `infer_shapes`: the per-layer config
    of a pruned checkpoint saved under its parent's config is derived from the tensor shapes
    (`hetgraph.build.checkpoint_skeleton`).
    """
    if to not in LAYOUTS:
        raise ValueError(f"convert: to={to!r} is not a layout hetgraph writes; allowed: {list(LAYOUTS)}")
    limit = parse_size(max_shard_size)
    _check_destination(src, dst)
    ckpt = open_checkpoint(src)
    model, spec = checkpoint_skeleton(ckpt, infer_shapes=infer_shapes)  # meta device: names and shapes, checked
    index = ckpt.index
    model.config.architectures = [type(model).__name__]
    written_config = None
    if to == nemotron_nas.NAME:
        written_config = nemotron_nas.from_per_layer(model_config_dict(model.config), spec)

    names = [n for n in model.state_dict() if n in index.shapes]  # the model's own order
    dtypes = _stored_dtypes(index, names)
    shards = _plan_shards(names, {n: _nbytes(index.shapes[n], dtypes[n]) for n in names}, limit)
    # Everything is written under a temporary name beside `dst`, renamed at the end: an
    # interrupted convert never leaves a destination that looks complete.
    parent = os.path.dirname(os.path.abspath(dst))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(dst))}.partial-")
    try:
        written = _write_shards(index, shards, index.shapes, dtypes, work, progress)
        if written_config is None:
            model.config.save_pretrained(work)
            stock_guard.guard_saved_config(work)
        else:  # stock transformers reads it only with DeciLM's remote code: no guard needed
            write_json_atomic(os.path.join(work, "config.json"), written_config)
        written.append(os.path.join(work, "config.json"))
        written += _copy_side_files(src, work)
        if os.path.isdir(dst):
            os.rmdir(dst)  # checked empty above
        os.rename(work, dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    written = [os.path.join(dst, os.path.relpath(w, work)) for w in written]
    return written


def cut(src: str, dst: str, plan, *, prune="first") -> list[str]:
    """Cut a model from the parent checkpoint `src` by `plan` (layer -> per-layer entries, as
    `from_pretrained(src, per_layer_config=plan, prune=prune)`) and save it to `dst` in the
    per_layer_config layout, with the parent's tokenizer files; returns the files written."""
    from hetgraph.build import from_pretrained

    _check_destination(src, dst)
    model = from_pretrained(src, per_layer_config=plan, prune=prune)  # every error before dst exists
    model.save_pretrained(dst)
    return [os.path.join(dst, name) for name in sorted(os.listdir(dst))] + _copy_side_files(src, dst)


def _check_destination(src: str, dst: str) -> None:
    if os.path.abspath(src) == os.path.abspath(dst):
        raise CheckpointError(f"{dst}: the destination must differ from the source")
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise CheckpointError(f"{dst}: exists and is not an empty directory; hetgraph never overwrites")


def _copy_side_files(src: str, dst: str) -> list[str]:
    """The source's files that are not weights, config or remote code (tokenizer etc.), copied."""
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and not _NOT_COPIED.search(name) and not os.path.exists(os.path.join(dst, name)):
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(os.path.join(dst, name))
    return copied


def _stored_dtypes(index: TensorIndex, names: list[str]) -> dict[str, str]:
    """Each tensor's safetensors dtype string, read from the headers (no data); a stacked tensor's
    is its first part's."""
    dtypes = {}
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(index.files[n], []).append(n)
    for path, file_names in by_file.items():
        with safe_open(path, framework="pt") as f:
            for n in file_names:
                dtypes[n] = f.get_slice(index.entries[n][0].name).get_dtype()
    unknown = sorted({d for d in dtypes.values() if d not in _DTYPE_BYTES})
    if unknown:
        raise CheckpointError(f"convert: tensor dtype(s) {unknown} not supported; known: {sorted(_DTYPE_BYTES)}")
    return dtypes


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    n = _DTYPE_BYTES[dtype]
    for d in shape:
        n *= d
    return n


def _plan_shards(names: list[str], sizes: dict[str, int], limit: int) -> list[list[str]]:
    """Consecutive tensors per shard, each shard at most `limit` bytes (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for n in names:
        if shards[-1] and used + sizes[n] > limit:
            shards.append([])
            used = 0
        shards[-1].append(n)
        used += sizes[n]
    return shards


def _write_shards(index, shards, shapes, dtypes, dst, progress: bool) -> list[str]:
    from tqdm.auto import tqdm

    total = sum(_nbytes(shapes[n], dtypes[n]) for shard in shards for n in shard)
    files = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress) as bar:
        for file, shard in zip(files, shards):
            _write_safetensors(os.path.join(dst, file), shard, index, shapes, dtypes, bar)
            weight_map.update({n: file for n in shard})
    if len(shards) > 1:
        with open(os.path.join(dst, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
            f.write("\n")
        files.append(INDEX_FILE)
    return [os.path.join(dst, f) for f in files]


def _write_safetensors(path: str, names: list[str], index, shapes, dtypes, bar) -> None:
    """One safetensors file, streamed: header first (offsets from the shapes), then each tensor's bytes."""
    header, offset = {}, 0
    for n in names:
        size = _nbytes(shapes[n], dtypes[n])
        header[n] = {"dtype": dtypes[n], "shape": list(shapes[n]), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for n in names:
            tensor = index.load(n)
            if tuple(tensor.shape) != tuple(shapes[n]):
                raise CheckpointError(f"{n}: header says {list(shapes[n])}, data has {list(tensor.shape)}")
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()  # its raw bytes, not a copy
            f.write(memoryview(data))
            bar.update(data.nbytes)
            del tensor, data  # one tensor alive at a time
