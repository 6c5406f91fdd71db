"""Warm starts: compile once, and let every later process of a serving job start from disk.

torch.compile keeps what it can reuse on disk under one directory: Inductor's FX graph cache (the
compiled graph and, on CPU, the built C++ kernels; Triton's on GPU) and AOTAutograd's cache.
`compile_cache_dir` points both at one directory and makes the prompt length dynamic from the first
call, so one prefill graph serves every prompt length and a later process asks for exactly the
graphs an earlier one compiled (without it the first prefill is compiled for its own length, which
a later process with another prompt length misses; dynamo's own profile of dynamic sizes is not
used, because it keys transformers' decorated `forward` by a per-process hash). `warmup` runs the
calls of the README's generation recipe (`make_cache`, `model.forward = torch.compile(...,
backend="hetgraph")`, `generate`), so the directory holds the prefill and decode graphs.

Safe by construction: each entry is keyed by the graph's code, its inputs' shapes, strides and
dtypes and the compile options, so a model that differs in one layer's width has other graphs and
compiles its own; a hit is the same compiled code, so a warm start computes exactly what the cold
one did. hetgraph's attention forms are marked cacheable for AOTAutograd with the hash of their
source (`passes/specialize_attention.py`). Not cached: dynamo's tracing and hetgraph's passes, which
run again in every process (the warm start's remaining cost).
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

#: the prompt-length dimension of the inputs transformers' `forward` receives (torch.compile's
#: `dynamic_sources` syntax: a source-name regex, `:1` = dimension 1).
DYNAMIC_PROMPT = tuple(rf"L\[('kwargs'\]\[)?'{name}'\]:1" for name in ("input_ids", "position_ids", "attention_mask"))


def compile_cache_dir(path: str | os.PathLike) -> str:
    """Keep torch.compile's on-disk caches in `path`, and compile prompts with a dynamic length.

    Call it in every process that shares the directory (the warm-up and each server), before the
    first compile. Equivalent environment: `TORCHINDUCTOR_CACHE_DIR=path` plus
    `TORCH_COMPILE_DYNAMIC_SOURCES` set to `DYNAMIC_PROMPT` joined by commas. Returns the absolute path.
    """
    path = os.path.abspath(os.fspath(path))
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    sources = [s for s in torch.compiler.config.dynamic_sources.split(",") if s]
    torch.compiler.config.dynamic_sources = ",".join(sources + [s for s in DYNAMIC_PROMPT if s not in sources])
    return path


def warmup(
    model_or_path: Any,
    *,
    batch_size: int = 1,
    max_cache_len: int,
    prompt_lens: tuple[int, ...] | None = None,
    cache_dir: str | os.PathLike | None = None,
    backend: str = "hetgraph",
    mode: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Compile the graphs generation with `make_cache(model, batch_size, max_cache_len)` needs.

    Runs `generate` (greedy, two new tokens) on random prompts of the lengths in `prompt_lens`
    (default a quarter and a half of max_cache_len): the prefill graph, then the decode graph; the
    second length checks the prefill graph serves another length without a compile. With `cache_dir`,
    `compile_cache_dir(cache_dir)` is called first (else call it yourself, or the graphs land in
    Inductor's default directory with a static first prefill). Returns seconds, graphs compiled and
    the FX graph cache's hits and misses.
    """
    from torch._dynamo.utils import counters

    from hetgraph.build import from_pretrained
    from hetgraph.cache import make_cache

    lens = tuple(prompt_lens or (max(2, max_cache_len // 4), max(3, max_cache_len // 2)))
    if not lens or min(lens) < 2 or max(lens) + 2 > max_cache_len:
        raise ValueError(f"warmup: prompt_lens={lens} must be lengths from 2 to max_cache_len - 2 = "
                         f"{max_cache_len - 2} (a prompt of one token is the decode shape)")  # fmt: skip
    if cache_dir is not None:
        cache_dir = compile_cache_dir(cache_dir)
    if isinstance(model_or_path, (str, os.PathLike)):
        model = from_pretrained(os.fspath(model_or_path), dtype=dtype, device=device)
    else:
        model = model_or_path
    param = next(model.parameters())
    cache = make_cache(model, batch_size=batch_size, max_cache_len=max_cache_len)
    forward = model.forward
    model.forward = torch.compile(forward, backend=backend, mode=mode, fullgraph=True)
    vocab = model.config.get_text_config().vocab_size
    start = time.perf_counter()
    before = dict(counters["inductor"])
    graphs = counters["stats"]["unique_graphs"]
    prompts = torch.Generator().manual_seed(0)  # the user's random state is left alone
    try:
        with torch.no_grad():
            for n in lens:
                ids = torch.randint(0, vocab, (batch_size, n), generator=prompts).to(param.device)
                cache.reset()
                model.generate(ids, cache=cache, max_new_tokens=2, do_sample=False)
    finally:
        model.forward = forward
    seconds = time.perf_counter() - start
    hits = counters["inductor"]["fxgraph_cache_hit"] - before.get("fxgraph_cache_hit", 0)
    misses = counters["inductor"]["fxgraph_cache_miss"] - before.get("fxgraph_cache_miss", 0)
    return {"cache_dir": cache_dir or os.environ.get("TORCHINDUCTOR_CACHE_DIR"), "prompt_lens": list(lens),
            "batch_size": batch_size, "max_cache_len": max_cache_len, "seconds": round(seconds, 3),
            "graphs_compiled": counters["stats"]["unique_graphs"] - graphs,
            "fxgraph_cache_hits": hits, "fxgraph_cache_misses": misses}  # fmt: skip
