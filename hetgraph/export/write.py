"""`export`: trace the planned programs and write them as `.pt2` files (and AOTInductor packages)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from hetgraph.export.plan import _plan
from hetgraph.export.trace import _prompt_range, _trace
from hetgraph.passes import PassRecord
from hetgraph.runtime import FORMAT_VERSION, METADATA


@dataclass
class Exported:
    """What `export` wrote, and the programs it wrote them from."""

    prefill: str
    decode: str | None = None
    prefill_package: str | None = None
    decode_package: str | None = None
    programs: dict[str, torch.export.ExportedProgram] = field(default_factory=dict)
    records: dict[str, list[PassRecord]] = field(default_factory=dict)  # program -> what each pass did


def export(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_ids: torch.Tensor | None = None,
    decode: bool = False,
    batch_size: int | None = None,
    max_cache_len: int | None = None,
    package: bool = False,
    progress: bool = False,
) -> Exported:
    """Write the specialized programs of a hetgraph-built model to `path`.

    A `path` ending in `.pt2` is the one file written: the prefill program `(input_ids) -> logits`.
    Any other `path` is a directory: `prefill.pt2`, and with `decode=True` the cache-filling prefill
    and `decode.pt2` (see `hetgraph.export`'s module docstring). `input_ids` is an example prompt
    (its batch fixes B; any prompt length up to `max_cache_len`, or the model's
    `max_position_embeddings`, is served). `package=True` also compiles each program into an
    AOTInductor package next to it, `X.pt2` -> `X.aoti.pt2` (`torch._inductor.aoti_load_package`).
    """
    from tqdm.auto import tqdm

    files = _files(path, decode)
    jobs, meta = _plan(model, input_ids, decode, batch_size, max_cache_len)
    os.makedirs(os.path.dirname(files["prefill"]) or ".", exist_ok=True)
    result = Exported(prefill=files["prefill"])
    with tqdm(total=len(jobs) * (2 if package else 1), desc="export", unit="step", disable=not progress) as bar:
        for job in jobs:
            bar.set_postfix_str(f"{job.name}: torch.export + passes")
            ep, result.records[job.name] = _trace(model, job.wrapper, job.args, job.dynamic_shapes)
            result.programs[job.name] = ep
            if job.name == "prefill":  # what the traced program accepts, which the model's code may narrow
                meta["min_prompt_len"], meta["max_prompt_len"] = _prompt_range(ep)
            program_meta = json.dumps({"format_version": FORMAT_VERSION, "program": job.name, **meta})
            _save(ep, files[job.name], program_meta)
            setattr(result, job.name, files[job.name])
            bar.update()
            if package:
                bar.set_postfix_str(f"{job.name}: AOTInductor compile")
                package_file = files[job.name][: -len(".pt2")] + ".aoti.pt2"
                setattr(result, f"{job.name}_package", _package(ep, package_file, program_meta))
                bar.update()
    return result


def _files(path: str | os.PathLike, decode: bool) -> dict[str, str]:
    """Program name -> the file it is written to: `path` itself if it ends in `.pt2`, else `path/<name>.pt2`."""
    path = os.fspath(path)
    names = ("prefill", "decode") if decode else ("prefill",)
    if not path.endswith(".pt2"):
        return {name: os.path.join(path, f"{name}.pt2") for name in names}
    if decode:
        raise ValueError(
            f"export: decode=True writes two programs (prefill.pt2 and decode.pt2) and needs a directory, "
            f"got the file path {path!r}"
        )
    if os.path.isdir(path):
        raise ValueError(
            f"export: {path!r} is a directory; a path ending in .pt2 names the one file written "
            f"(remove the directory, or pass a directory path without .pt2)"
        )
    return {"prefill": path}


def _save(ep: torch.export.ExportedProgram, file: str, meta: str) -> None:
    """Saved without its example inputs: the loaded `.module()` then checks each input dimension and
    names the expected and given sizes (a generated guard names only the expected one), and the
    example prompt stays out of the artifact. AOTInductor needs them, so they are put back."""
    examples, ep.example_inputs = ep.example_inputs, None
    try:
        torch.export.save(ep, file, extra_files={METADATA: meta})
    finally:
        ep.example_inputs = examples


def _package(ep: torch.export.ExportedProgram, file: str, meta: str) -> str:
    configs = {
        "aot_inductor.metadata": {METADATA: meta},  # read back with `get_metadata()`
        # The input checks (AOTI_RUNTIME_CHECK_INPUTS=1) would refuse 1-token prompts: export's dims start at 2.
        "aot_inductor.check_lowerbound": False,
    }
    with torch.no_grad():
        return torch._inductor.aoti_compile_and_package(ep, package_path=file, inductor_configs=configs)
