"""Pipeline-stage balance on the Super-49B pattern: the slowest stage against the ideal, per split.

    python benchmarks/pipeline_split.py --out benchmarks/results/cpu-2core/pipeline-split

Per-layer costs are measured: `hetgraph.profile` times each distinct layer variant of the 80-layer
Super-49B pattern (toy width, `puzzle-80`), and `layer_costs` spreads the table over the layers.
For 2, 4 and 8 stages: the max-stage time / ideal (total / stages; a lower bound no split can beat)
of the balanced split (`split_layers` on the measured costs), of the even split (by layer count, as
vLLM / TensorRT-LLM / transformers' pp_size do) and of a split balanced by parameter bytes (what
`split="balanced"` uses without a table, DeepSpeed's rule), for decode and prefill costs.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import hetgraph
from hetgraph.bench.presets import make_preset
from hetgraph.distributed import layer_costs, split_layers, stage_ranges


def bottleneck(ranges, costs) -> float:
    return max(sum(costs[i] for i in r) for r in ranges)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="puzzle-80")
    p.add_argument("--stages", default="2,4,8")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--context-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--table", help="a saved LatencyTable to use instead of profiling")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    model = hetgraph.from_config(make_preset(args.preset).config)
    start = time.perf_counter()
    if args.table:
        table = hetgraph.LatencyTable.load(args.table)
    else:
        table = hetgraph.profile(model, prompt_len=args.prompt_len, context_len=args.context_len,
                                 repeats=args.repeats, progress=True)  # fmt: skip
        table.save(os.path.join(args.out, "table.json"))
    profile_s = None if args.table else time.perf_counter() - start
    by_bytes = layer_costs(model)
    n = len(by_bytes)
    rows = []
    for phase in ("decode_ms", "prefill_ms"):
        costs = layer_costs(model, table, phase=phase)
        for k in (int(s) for s in args.stages.split(",")):
            ideal = sum(costs) / k
            splits = {"balanced": split_layers(costs, k), "even": stage_ranges(n, k, "even"),
                      "by-bytes": split_layers(by_bytes, k)}  # fmt: skip
            row = {"phase": phase, "stages": k, "ideal_ms": ideal}
            for name, ranges in splits.items():
                row[name] = bottleneck(ranges, costs) / ideal
                row[f"{name}_layers"] = [len(r) for r in ranges]
            rows.append(row)
    result = {"preset": args.preset, "layers": n, "variants": len(table.rows), "profile_s": profile_s,
              "torch": torch.__version__, "shapes": vars(args), "rows": rows}  # fmt: skip
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    source = (f"the table {args.table}" if args.table else f"hetgraph.profile ({profile_s:.0f} s; prompt "
              f"{args.prompt_len}, context {args.context_len}, repeats {args.repeats})")
    lines = [f"{args.preset}: {n} layers, {len(table.rows)} variants, costs from {source}", "",
             "| phase | stages | balanced / ideal | even / ideal | by-bytes / ideal | balanced layers per stage |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['phase'][:-3]} | {r['stages']} | {r['balanced']:.3f} | {r['even']:.3f} | "
                     f"{r['by-bytes']:.3f} | {r['balanced_layers']} |")  # fmt: skip
    lines += ["", "balanced is the exact optimum over contiguous splits of these costs (`split_layers`), so what it",
              "keeps above the ideal is the layers' granularity (a stage of 7-9 layers cannot be cut finer)."]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
