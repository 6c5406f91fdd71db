"""How far apart identical models time on this machine: one config compiled the same way into N model
instances (the same compiled code; each instance has its own weights and cache), timed interleaved
by `ModelTimer` as `hetgraph.profile` times its probe. The spread (slowest / fastest median) is the
floor under any comparison of two models here, e.g. a latency table's probe against a whole model.

    python benchmarks/timing_noise.py --preset gpt-oss-puzzle --instances 4 --repeats 11 --out benchmarks/results/cpu-2core/timing-noise
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt-oss-puzzle")
    p.add_argument("--instances", type=int, default=4)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--context-len", type=int, default=256)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import torch

    from hetgraph.bench.presets import make_preset
    from hetgraph.timing import PHASES, ModelTimer

    config = make_preset(args.preset, 1).config
    shapes = {"prompt_len": args.prompt_len, "context_len": args.context_len, "batch_size": 1}
    timer = ModelTimer(shapes, "hetgraph", args.repeats, torch.float32, "cpu")
    torch._dynamo.config.recompile_limit = 64  # one code object, one guard set per instance
    with torch.no_grad():
        runs = [timer._compiled(config, "hetgraph") for _ in range(args.instances)]
        times = timer._time(runs)
    result = {"preset": args.preset, "shapes": shapes, "repeats": args.repeats, "phases": {}}
    for phase in PHASES:
        medians = [statistics.median(t[phase]) for t in times]
        result["phases"][phase] = {"medians_ms": medians, "spread": max(medians) / min(medians)}
    md = [f"# Timing noise: {args.instances} identical instances of {args.preset} (CPU, {os.cpu_count()} cores)", "",
          f"Command: `python benchmarks/timing_noise.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
          f"hetgraph backend, make_cache, prefill of {args.prompt_len} tokens, decode after {args.context_len}; "
          f"medians of {args.repeats}, instances interleaved.", "",
          "| phase | median ms per instance | slowest / fastest |", "|---|---|---|",
          *(f"| {ph} | {', '.join(f'{m:.2f}' for m in r['medians_ms'])} | {r['spread']:.3f} |"
            for ph, r in result["phases"].items())]  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
