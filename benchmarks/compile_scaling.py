"""Compile time against layer count: hetgraph (one compile per layer variant) vs Inductor full-model.

    python benchmarks/compile_scaling.py --out benchmarks/results/cpu-2core/compile-scaling

Presets: `variants-24` (24 layers of 3 repeating variants, hidden 256) and `puzzle-N` (the
Llama-3.3-Nemotron-Super-49B block pattern at N layers, hidden 256). Each engine runs in a fresh
process with an empty Inductor cache, interleaved; medians of --repeats. Also reports steady-state
prefill / decode time ratios (hetgraph / Inductor) and writes compile_scaling.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace

from tqdm import tqdm

from hetgraph.bench import memory_bandwidth_gbs, run_preset
from hetgraph.bench.output import preset_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="variants-24,puzzle-24,puzzle-48,puzzle-80")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    presets = args.presets.split(",")
    run_args = SimpleNamespace(
        engines=["inductor", "hetgraph"], repeats=args.repeats, scale=1, dtype="float32", device="cpu",
        mode=None, timing_repeats=5,
    )
    os.makedirs(args.out, exist_ok=True)
    bandwidth = memory_bandwidth_gbs()
    with tqdm(total=len(presets) * 2 * args.repeats, unit="run") as progress:
        results = [run_preset(name, run_args, progress) for name in presets]
    rows = ["| preset | layers | variants | Inductor compile s | hetgraph compile s | ratio | prefill ratio | decode ratio |",
            "|---|---|---|---|---|---|---|---|"]
    phases = ["| preset | engine | dynamo tracing s | passes + AOTAutograd s | Inductor s |", "|---|---|---|---|---|"]
    points = []
    for r in results:
        ind, het = r["summary"]["inductor"], r["summary"]["hetgraph"]
        if "error" in ind or "error" in het:
            rows.append(f"| {r['preset']['name']} | error | {ind.get('error') or het.get('error')} |")
            continue
        layers = r["preset"]["config"]["num_hidden_layers"]
        variants = _variant_count(r["preset"]["config"])
        ci = ind["compile_prefill_s"] + ind["compile_decode_s"]
        ch = het["compile_prefill_s"] + het["compile_decode_s"]
        rows.append(
            f"| {r['preset']['name']} | {layers} | {variants} | {ci:.1f} | {ch:.1f} | {ch / ci:.2f} "
            f"| {het['prefill_short_ms'] / ind['prefill_short_ms']:.2f} "
            f"| {het['decode_ms_per_token'] / ind['decode_ms_per_token']:.2f} |"
        )
        points.append((r["preset"]["name"], layers, ci, ch))
        for engine, e in (("inductor", ind), ("hetgraph", het)):
            if "tracing_s" in e:
                phases.append(f"| {r['preset']['name']} | {engine} | {e['tracing_s']:.1f} | {e['aot_s']:.1f} "
                              f"| {e['inductor_s']:.1f} |")
    md = ["# Compile time against layer count (CPU, cold Inductor cache, fresh process per engine)", "",
          f"Command: `python benchmarks/compile_scaling.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
          "Compile s = first prefill call + first decode call (both graphs), medians of "
          f"{args.repeats} interleaved fresh processes per engine. Ratios are hetgraph / Inductor.", "",
          *rows, "", "Where the compiles (prefill and decode graphs) spent their time, dynamo's own timers:", "",
          *phases, "", *(preset_table(r, bandwidth) for r in results)]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"bandwidth_gbs": bandwidth, "results": results}, f, indent=1)
    _plot(points, os.path.join(args.out, "compile_scaling.png"))
    print("\n".join(md))
    return 0


def _variant_count(config: dict) -> int:
    from hetgraph.build import build_skeleton

    return len(build_skeleton(config)[1].variants())


def _plot(points, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    puzzle = sorted(p for p in points if p[0].startswith("puzzle"))
    for series, label in ((2, "Inductor full-model"), (3, "hetgraph")):
        ax.plot([p[1] for p in puzzle], [p[series] for p in puzzle], "o-", label=f"{label} (Super-49B pattern)")
    for p in points:
        if p[0].startswith("variants"):
            ax.plot([p[1]], [p[2]], "s", color="C0", label="Inductor, 3 variants")
            ax.plot([p[1]], [p[3]], "s", color="C1", label="hetgraph, 3 variants")
    ax.set_xlabel("layers")
    ax.set_ylabel("cold compile s (prefill + decode graphs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
