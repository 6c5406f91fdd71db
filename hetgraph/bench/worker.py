"""One measurement: one engine on one preset, in the (fresh) process that runs it.

Engines: eager (the hetgraph-built model, hetgraph's cache), inductor (torch.compile default,
transformers' StaticCache), hetgraph (backend + make_cache), hetgraph-parent (the homogeneous
parent, for realized savings). "engine:mode" passes a torch.compile mode, e.g. "hetgraph:reduce-overhead".
"""

from __future__ import annotations

import resource
import statistics
import time

import torch
from torch._dynamo.utils import compilation_time_metrics, counters
from transformers import StaticCache

import hetgraph
from hetgraph.bench.presets import make_preset
from hetgraph.bench.roofline import cache_kv_bytes, streamed_weight_bytes, synchronize

ENGINES = ("eager", "inductor", "hetgraph", "hetgraph-parent")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compile_phases() -> dict[str, float]:
    """Where this process's compiles so far spent their time (dynamo's own timers): bytecode
    tracing, the backend less Inductor (for hetgraph: the passes and AOTAutograd), Inductor."""
    times = {k: sum(v) for k, v in compilation_time_metrics.items()}
    inductor = times.get("compile_fx_inner", 0.0)
    return {
        "tracing_s": times.get("bytecode_tracing", 0.0),
        "aot_s": max(times.get("OutputGraph.call_user_compiler", 0.0) - inductor, 0.0),
        "inductor_s": inductor,
    }


def median_ms(call, repeats: int) -> float:
    """Median wall time of `call()` over `repeats` runs, in milliseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_worker(job: dict) -> dict:
    """Cold compile (first prefill, first decode step), then prefill and decode timings, memory and bytes."""
    torch.manual_seed(0)
    dtype = getattr(torch, job["dtype"])
    device = job["device"]
    preset = make_preset(job["preset"], job["scale"])
    engine, _, mode = job["engine"].partition(":")
    mode = mode or job.get("mode")
    config = preset.parent if engine == "hetgraph-parent" else preset.config
    model = hetgraph.from_config(config, dtype=dtype, device=device)
    vocab = config["vocab_size"]
    short = torch.randint(0, vocab, (1, preset.short_prompt), device=device)
    long = torch.randint(0, vocab, (1, preset.long_prompt), device=device)
    max_len = preset.long_prompt + preset.decode_tokens
    if engine == "inductor":
        cache = StaticCache(config=model.config, max_cache_len=max_len)
        fwd = torch.compile(model.forward, backend="inductor", mode=mode)
    else:
        cache = hetgraph.make_cache(model, batch_size=1, max_cache_len=max_len)
        fwd = model.forward if engine == "eager" else torch.compile(model.forward, backend="hetgraph", mode=mode)

    def prefill(ids):
        cache.reset()
        out = fwd(input_ids=ids, cache=cache).logits[:, -1]
        synchronize(device)
        return out

    def step(token):
        out = fwd(input_ids=token, cache=cache).logits[:, -1]
        synchronize(device)
        return out

    result = {"engine": job["engine"], "preset": preset.name}
    with torch.no_grad():
        start = time.perf_counter()
        token = prefill(short).argmax(-1, keepdim=True)
        result["compile_prefill_s"] = time.perf_counter() - start
        start = time.perf_counter()
        step(token)
        result["compile_decode_s"] = time.perf_counter() - start
        result.update(compile_phases())
        prefill(long)  # compiles the long-prompt graph
        for name, ids in (("prefill_short_ms", short), ("prefill_long_ms", long)):
            result[name] = median_ms(lambda: prefill(ids), job["timing_repeats"])
        token = prefill(short).argmax(-1, keepdim=True)

        def decode():
            nonlocal token
            token = step(token).argmax(-1, keepdim=True)

        result["decode_ms_per_token"] = median_ms(decode, preset.decode_tokens - 1)
    result["graphs_compiled"] = counters["stats"].get("unique_graphs", 0)
    result["peak_rss_mb"] = _rss_mb()
    if device == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["kv_bytes"] = cache_kv_bytes(cache)
    result["weight_bytes"] = sum(p.nbytes for _, p in model.named_parameters())
    result["streamed_bytes_per_token"] = streamed_weight_bytes(model) + result["kv_bytes"]
    return result
