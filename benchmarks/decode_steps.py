"""Decode step time, hetgraph against plain Inductor, per preset, in one process, engines interleaved.

    python benchmarks/decode_steps.py --out benchmarks/results/cpu-2core/decode-steps
    python benchmarks/decode_steps.py --presets puzzle --max-cache-len 4096 --out DIR

Engines as in `benchmarks/run.py`: Inductor is `torch.compile(backend="inductor")` on the same
hetgraph-built model with transformers' `StaticCache`; hetgraph is the backend with `make_cache`;
both caches hold `--max-cache-len` slots (default: the preset's long prompt + 32, as `run.py`).
Each round resets both caches, prefills the same short prompt and times `--steps` greedy steps per
engine, engine after engine; medians over all rounds' steps. Also reports, per preset, how many of
the decode graph's attention layers took the GQA-packed form (`specialize_attention`).
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
from hetgraph.backend import HetgraphBackend
from hetgraph.bench.presets import make_preset

DEFAULT_PRESETS = "puzzle,drop-attn,width-pruned,windowed,homogeneous,gpt-oss-puzzle,llama4-chunked,nemotron-h-hybrid"
PROMPT = 32


def measure(name: str, max_len: int | None, rounds: int, steps: int) -> dict:
    preset = make_preset(name)
    torch.manual_seed(0)
    model = hetgraph.from_config(preset.config)
    max_len = max_len or preset.long_prompt + 32
    ids = torch.randint(0, preset.config["vocab_size"], (1, PROMPT))
    backend = HetgraphBackend()
    engines = {
        "inductor": (torch.compile(model.forward, backend="inductor"),
                     StaticCache(config=model.config, max_cache_len=max_len)),
        "hetgraph": (torch.compile(model.forward, backend=backend),
                     hetgraph.make_cache(model, batch_size=1, max_cache_len=max_len)),
    }  # fmt: skip

    def prefill(engine):
        fwd, cache = engines[engine]
        cache.reset()
        return fwd(input_ids=ids, cache=cache).logits[:, -1:].argmax(-1)

    def step(engine, token):
        fwd, cache = engines[engine]
        return fwd(input_ids=token, cache=cache).logits[:, -1:].argmax(-1)

    compile_s = {}
    with torch.no_grad():
        for e in engines:  # compile prefill and decode (Inductor's StaticCache may compile one more)
            start = time.perf_counter()
            step(e, step(e, prefill(e)))
            compile_s[e] = time.perf_counter() - start
        times = {e: [] for e in engines}
        for _ in range(rounds):
            for e in engines:
                token = prefill(e)
                for _ in range(steps):
                    start = time.perf_counter()
                    token = step(e, token)
                    times[e].append((time.perf_counter() - start) * 1e3)
    forms = [r.report for g in backend.reports if g.spec is not None
             for r in g.records if r.name == "specialize_attention"]  # fmt: skip
    packed = sum(str(f).startswith("GQA-packed") for f in forms[-1].values()) if forms else 0
    med = {e: statistics.median(t) for e, t in times.items()}
    return {"preset": name, "max_cache_len": max_len, "decode_ms": med, "ratio": med["hetgraph"] / med["inductor"],
            "compile_s": compile_s, "packed_layers": packed, "attention_layers": len(forms[-1]) if forms else 0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default=DEFAULT_PRESETS)
    p.add_argument("--max-cache-len", type=int, help="cache slots (default: the preset's long prompt + 32)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch._dynamo.config.recompile_limit = 64  # two compiled engines share one code object
    os.makedirs(args.out, exist_ok=True)
    results = []
    for name in args.presets.split(","):
        results.append(measure(name, args.max_cache_len, args.rounds, args.steps))
        torch._dynamo.reset()
        print(json.dumps(results[-1]), flush=True)
    rows = ["| preset | cache slots | Inductor ms/token | hetgraph ms/token | hetgraph / Inductor "
            "| GQA-packed layers (decode) |", "|---|---|---|---|---|---|"]
    for r in results:
        ms = r["decode_ms"]
        rows.append(f"| {r['preset']} | {r['max_cache_len']} | {ms['inductor']:.2f} | {ms['hetgraph']:.2f} "
                    f"| {r['ratio']:.2f} | {r['packed_layers']} of {r['attention_layers']} |")
    md = ["# Decode step time, hetgraph / Inductor (CPU, one process, engines interleaved)", "",
          f"Command: `python benchmarks/decode_steps.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
          f"Medians of {args.rounds} rounds x {args.steps} greedy steps per engine after a {PROMPT}-token prompt.",
          "",
          *rows, ""]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"torch": torch.__version__, "results": results}, f, indent=1)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
