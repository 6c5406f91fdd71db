"""The banded attention op alone, compiled: masked SDPA against `banded_attention` at several query
block sizes, per prompt length and window. One process, variants interleaved, medians.

    python benchmarks/attention_block_size.py --out benchmarks/results/cpu-2core/attention-block-size
    python benchmarks/attention_block_size.py --lengths 2048 --windows 64 --repeats 5 --out /tmp/abs  # quick

Shapes as the presets' Llama layers: 8 query heads, 2 KV heads, head_dim 64, batch 1, float32; a
causal sliding-window boolean mask (what the model hook builds). `block_for` in
`hetgraph/passes/specialize_attention.py` is the rule the backend uses; this measures it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from hetgraph.attention_forms import banded_attention
from hetgraph.passes.specialize_attention import block_for


def _inputs(length: int, window: int):
    q = torch.randn(1, 8, length, 64)
    k, v = torch.randn(1, 2, length, 64), torch.randn(1, 2, length, 64)
    i = torch.arange(length)
    mask = ((i[:, None] >= i[None]) & (i[:, None] - i[None] < window))[None, None]
    return q, k, v, mask


def measure(length: int, window: int, blocks: list[int], repeats: int) -> dict:
    q, k, v, mask = _inputs(length, window)
    torch._dynamo.reset()  # each variant its own static graph: no recompile limit, no dynamic shapes
    variants = {"sdpa": torch.compile(lambda q, k, v, m: F.scaled_dot_product_attention(
        q, k, v, attn_mask=m, enable_gqa=True), dynamic=False)}
    for b in blocks:
        variants[f"banded/{b}"] = torch.compile(
            lambda q, k, v, m, b=b: banded_attention(q, k, v, m, extent=window, block=b), dynamic=False)
    reference = variants["sdpa"](q, k, v, mask)
    for name, fn in variants.items():  # compiles, and checks the form is exact
        torch.testing.assert_close(fn(q, k, v, mask), reference, rtol=1e-4, atol=1e-4, msg=name)
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn(q, k, v, mask)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="2048,8192")
    p.add_argument("--windows", default="64,128,256")
    p.add_argument("--blocks", default="32,64,128,256")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    blocks = [int(b) for b in args.blocks.split(",")]
    rows = []
    with torch.no_grad():
        for length in (int(x) for x in args.lengths.split(",")):
            for window in (int(x) for x in args.windows.split(",")):
                ms = measure(length, window, blocks, args.repeats)
                rows.append({"length": length, "window": window, "rule": block_for(window), "ms": ms})
                print(rows[-1], flush=True)
    command = "python benchmarks/attention_block_size.py " + " ".join(argv if argv is not None else sys.argv[1:])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"rows": rows, "command": command, "torch": torch.__version__, "cores": os.cpu_count()}, f, indent=1)
    names = list(rows[0]["ms"])
    lines = [f"# Banded attention op alone: ms per call (compiled, medians)\n\nCommand: `{command}`  ",
             f"torch {torch.__version__}, {os.cpu_count()} cores, float32, 8 heads / 2 KV heads, head_dim 64.",
             "`*`: the block `block_for` picks.\n",
             "| prompt | window | " + " | ".join(names) + " | masked SDPA / rule |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for r in rows:
        cells = [f"{r['ms'][n]:.1f}" + ("*" if n == f"banded/{r['rule']}" else "") for n in names]
        best = r["ms"].get(f"banded/{r['rule']}", float("nan"))
        lines.append(f"| {r['length']} | {r['window']} | " + " | ".join(cells) + f" | {r['ms']['sdpa'] / best:.1f}x |")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
