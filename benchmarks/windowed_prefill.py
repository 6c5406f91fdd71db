"""Prefill time against prompt length on a preset (default `windowed`: windows 64/256/full), eager, plain
Inductor and hetgraph in one process, engines interleaved, medians; and a 512-token prefill into a
4096-slot `make_cache` against the same prefill without a cache.

    python benchmarks/windowed_prefill.py --out benchmarks/results/cpu-2core/windowed-prefill
    python benchmarks/windowed_prefill.py --lengths 512,1024 --repeats 1 --out /tmp/wp   # quick
    python benchmarks/windowed_prefill.py --preset gpt-oss-puzzle --lengths 512,2048 --no-overhead --out DIR

Engines as in `benchmarks/run.py`: eager and hetgraph fill a `make_cache` of prompt + 32 positions,
Inductor (`torch.compile(backend="inductor")` on the same model) transformers' `StaticCache` of the
same size. Each length is its own compiled graph (static shapes), compiled (and recompiled) before any timing. A
prefill computes the last position's logits only (`logits_to_keep=1`, as `generate` does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from transformers import StaticCache

import hetgraph
from hetgraph.bench.presets import make_preset

ENGINES = ("eager", "inductor", "hetgraph")
DECODE_ROOM = 32


def _engines(model):
    return {
        "eager": model.forward,
        "inductor": torch.compile(model.forward, backend="inductor"),
        "hetgraph": torch.compile(model.forward, backend="hetgraph"),
    }


def _cache(model, engine: str, max_len: int):
    if engine == "inductor":
        return StaticCache(config=model.config, max_cache_len=max_len)
    return hetgraph.make_cache(model, batch_size=1, max_cache_len=max_len)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def sweep(model, lengths, repeats: int, engines) -> dict:
    """Per length, per engine: median prefill ms (a fresh cache each call, as a new request)."""
    forwards = _engines(model)
    vocab = model.config.vocab_size
    results = {}
    for length in lengths:
        ids = torch.randint(0, vocab, (1, length))
        caches = {e: _cache(model, e, length + DECODE_ROOM) for e in engines}

        def prefill(engine):
            caches[engine].reset()
            forwards[engine](input_ids=ids, cache=caches[engine], logits_to_keep=1)

        compile_s = {e: _timed(lambda: prefill(e)) / 1e3 for e in engines}  # first call compiles
        for e in engines:  # Inductor recompiles once more: StaticCache's sliding layers' int lengths turn dynamic
            prefill(e)
        times = {e: [] for e in engines}
        for _ in range(repeats):
            for e in engines:
                times[e].append(_timed(lambda: prefill(e)))
        results[length] = {e: {"median_ms": statistics.median(t), "all_ms": t, "first_call_s": compile_s[e]}
                           for e, t in times.items()}
        print(length, {e: round(r["median_ms"], 1) for e, r in results[length].items()}, flush=True)
    return results


def cache_overhead(model, prompt: int, slots: int, repeats: int) -> dict:
    """hetgraph prefill of `prompt` tokens into make_cache(max_cache_len=slots) vs no cache."""
    fwd = torch.compile(model.forward, backend="hetgraph")
    ids = torch.randint(0, model.config.vocab_size, (1, prompt))
    cache = hetgraph.make_cache(model, batch_size=1, max_cache_len=slots)

    def cached():
        cache.reset()
        fwd(input_ids=ids, cache=cache, logits_to_keep=1)

    def uncached():
        fwd(input_ids=ids, use_cache=False, logits_to_keep=1)

    cached(), uncached()
    times = {"cache": [], "no_cache": []}
    for _ in range(repeats):
        times["cache"].append(_timed(cached))
        times["no_cache"].append(_timed(uncached))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"prompt": prompt, "max_cache_len": slots, "median_ms": med, "all_ms": times,
            "ratio": med["cache"] / med["no_cache"]}


def write(out: str, preset: str, sweep_results: dict, overhead: dict | None, command: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"preset": preset, "sweep": sweep_results, "cache_overhead": overhead, "command": command,
                   "torch": torch.__version__, "cores": os.cpu_count()}, f, indent=1)
    lines = [f"# {preset} preset: prefill ms against prompt length\n\nCommand: `{command}`  ",
             f"torch {torch.__version__}, {os.cpu_count()} cores, float32, medians, engines interleaved.\n",
             "| prompt | eager ms | inductor ms | hetgraph ms | hetgraph / inductor |", "|---|---|---|---|---|"]
    for length, r in sweep_results.items():
        ms = {e: r[e]["median_ms"] for e in r}
        ratio = ms["hetgraph"] / ms["inductor"] if "inductor" in ms and "hetgraph" in ms else float("nan")
        lines.append(f"| {length} | {ms.get('eager', float('nan')):.0f} | {ms.get('inductor', float('nan')):.0f} | "
                     f"{ms.get('hetgraph', float('nan')):.0f} | {ratio:.2f} |")
    if overhead:
        m = overhead["median_ms"]
        lines.append(f"\nhetgraph prefill of {overhead['prompt']} tokens into make_cache(max_cache_len="
                     f"{overhead['max_cache_len']}): {m['cache']:.0f} ms; without a cache: {m['no_cache']:.0f} ms; "
                     f"ratio {overhead['ratio']:.2f}.")
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(out, preset, sweep_results)


def _plot(out: str, preset: str, sweep_results: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    lengths = [int(k) for k in sweep_results]
    fig, ax = plt.subplots(figsize=(6, 4))
    for engine in ENGINES:
        ys = [sweep_results[k][engine]["median_ms"] / 1e3 for k in sweep_results if engine in sweep_results[k]]
        if ys:
            ax.plot(lengths, ys, marker="o", label=engine)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("prefill s (median)")
    ax.set_title(f"{preset} preset, CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "prefill_vs_length.png"), dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="windowed-long", help="a preset of benchmarks/run.py (default windowed-long: "
                   "the windowed preset, positions for 8192 tokens)")
    p.add_argument("--lengths", default="512,1024,2048,4096,8192")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--overhead-repeats", type=int, default=7)
    p.add_argument("--no-overhead", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    preset = make_preset(args.preset)
    model = hetgraph.from_config(preset.config)
    lengths = [int(x) for x in args.lengths.split(",")]
    with torch.no_grad():
        results = sweep(model, lengths, args.repeats, args.engines.split(","))
        overhead = None if args.no_overhead else cache_overhead(model, 512, 4096, args.overhead_repeats)
    command = "python benchmarks/windowed_prefill.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write(args.out, args.preset, results, overhead, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
