"""What a user runs after `hetgraph.export`: load its programs, read what they serve, decode greedily.

This module imports torch and the standard library only (no transformers, no other hetgraph
module; tests/test_runtime.py checks it), so it may be copied next to the programs and run
where hetgraph is not installed.

Each program carries a `hetgraph.json` metadata file (an extra file of a `.pt2`, the
`get_metadata()` of an AOTInductor package) whose `format_version` says how to read it. Programs
written before the field existed are format 0, read as format 1 (the fields are the same).
"""

from __future__ import annotations

import json
import os
import zipfile

import torch

METADATA = "hetgraph.json"  # extra file in each .pt2: what the program serves
FORMAT_VERSION = 1  # of METADATA; bump when a reader of the previous version would misread it
SUPPORTED_VERSIONS = (0, 1)  # 0: written before format_version existed


def _is_package(path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any("/data/aotinductor/" in name for name in archive.namelist())


def load(program):
    """A path to an exported `.pt2` or AOTInductor package -> a callable; a callable as is."""
    if not isinstance(program, (str, os.PathLike)):
        return program
    if _is_package(program):
        return torch._inductor.aoti_load_package(str(program))
    return torch.export.load(program).module()


def read_metadata(program) -> dict:
    """What a program of `export` serves (format_version, batch_size, max_prompt_len, max_cache_len, ...);
    {} if it has no hetgraph metadata. ValueError if it was written in a format newer than this reader's."""
    where = os.fspath(program) if isinstance(program, (str, os.PathLike)) else f"the given {type(program).__name__}"
    if isinstance(program, (str, os.PathLike)):
        if _is_package(program):
            program = torch._inductor.aoti_load_package(str(program))
        else:  # the extra file, without loading the program
            with zipfile.ZipFile(program) as archive:
                names = [n for n in archive.namelist() if n.endswith(f"/extra/{METADATA}")]
                return _checked(json.loads(archive.read(names[0])), where) if names else {}
    meta = program.get_metadata().get(METADATA) if hasattr(program, "get_metadata") else None
    return _checked(json.loads(meta), where) if meta else {}


def _checked(meta: dict, where: str) -> dict:
    version = meta.setdefault("format_version", 0)
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"{where}: hetgraph metadata format_version {version!r}; this hetgraph reads versions "
            f"{list(SUPPORTED_VERSIONS)} (a newer hetgraph wrote the program: upgrade to read it)"
        )
    return meta


@torch.no_grad()
def generate_with_exported(prefill, decode, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding with the programs of `export(..., decode=True)`: ids [B, T + max_new_tokens].

    `prefill` and `decode` are paths to the `.pt2` programs or AOTInductor packages, or loaded
    programs. The shapes are checked first (a package given a wrong shape may abort the process).
    The loop itself needs nothing but torch:

        logits, state = prefill(input_ids)
        token = logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(max_new_tokens - 1):
            token = decode(token, state)[:, -1].argmax(-1, keepdim=True)   # state updated in place
    """
    _check_prompt(input_ids, max_new_tokens, read_metadata(prefill))
    prefill, decode = load(prefill), load(decode)
    if max_new_tokens <= 0:
        return input_ids
    # Packages read raw memory: int64, contiguous, as traced.
    logits, state = prefill(input_ids.to(torch.long).contiguous())
    tokens = [input_ids, logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(max_new_tokens - 1):
        tokens.append(decode(tokens[-1], state)[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1)


def _check_prompt(input_ids: torch.Tensor, max_new_tokens: int, meta: dict) -> None:
    where = "generate_with_exported"
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"{where}: input_ids must be [batch, prompt_len >= 1], got shape {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    if not meta:
        return
    shape = tuple(input_ids.shape)
    if batch != meta["batch_size"]:
        raise ValueError(f"{where}: the programs serve batch {meta['batch_size']}, input_ids has shape {shape}")
    shortest, longest = meta.get("min_prompt_len", 1), meta["max_prompt_len"]
    if not shortest <= length <= longest:
        served = (
            f"of {longest} tokens" if shortest == longest
            else f"of up to {longest} tokens" if shortest == 1
            else f"of {shortest} to {longest} tokens"
        )
        raise ValueError(f"{where}: the programs serve prompts {served}, input_ids has shape {shape}")
    limit = meta.get("max_cache_len")
    if limit is not None and length + max_new_tokens - 1 > limit:
        raise ValueError(
            f"{where}: a {length}-token prompt (input_ids shape {shape}) and {max_new_tokens} new tokens need "
            f"{length + max_new_tokens - 1} cache positions; max_cache_len={limit}"
        )
