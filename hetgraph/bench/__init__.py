"""Benchmarks: eager vs Inductor vs hetgraph on heterogeneity patterns, with a roofline.

    python benchmarks/run.py --preset puzzle --out benchmarks/results/cpu-2core
    python -m hetgraph bench --preset all --quick --out /tmp/bench

Stages, one module each: `presets` (the table of configs), `worker` (one engine in one fresh
process), `roofline` (the bandwidth roof and the bytes a decode step moves), `driver` (fresh
processes, engines interleaved, medians), `output` (results.json, results.md, summary.png).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tqdm import tqdm

from hetgraph.bench.driver import run_preset
from hetgraph.bench.output import machine_info, write_report
from hetgraph.bench.presets import BY_DEPTH, PRESETS, Preset, make_preset
from hetgraph.bench.roofline import memory_bandwidth_gbs, streamed_weight_bytes
from hetgraph.bench.worker import ENGINES, run_worker

__all__ = ["main", "make_preset", "memory_bandwidth_gbs", "run_preset", "streamed_weight_bytes", "Preset", "PRESETS"]


def _parser() -> argparse.ArgumentParser:
    studies = ", ".join(f"{p}-N" for p in BY_DEPTH)
    p = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="all", help=f"one of {list(PRESETS)}, {studies}, or 'all'")
    p.add_argument("--quick", action="store_true", help="one repeat, few timing iterations")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--scale", type=int, default=1, help="grow width and depth of the presets")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per engine")
    p.add_argument("--timing-repeats", type=int, default=5)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--mode", default=None, help='torch.compile mode, e.g. "reduce-overhead" for CUDA graphs')
    p.add_argument("--out", help="directory for results.json, results.md and the plots")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # the driver's fresh processes
    return p


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    if not args.out:
        p.error("--out is required")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.engines = [e for e in args.engines.split(",") if e]
    if args.quick:
        args.repeats, args.timing_repeats = 1, 3
    presets = list(PRESETS) if args.preset == "all" else args.preset.split(",")
    os.makedirs(args.out, exist_ok=True)
    bandwidth = memory_bandwidth_gbs(args.device)
    with tqdm(total=len(presets) * len(args.engines) * args.repeats, unit="run") as progress:
        results = [run_preset(name, args, progress) for name in presets]
    report = {
        "machine": machine_info(args.device),
        "memory_bandwidth_gbs": [bandwidth, memory_bandwidth_gbs(args.device)],
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "results": results,
    }
    command = " ".join(argv if argv is not None else sys.argv[1:])
    print(write_report(report, args.out, command))
    return 0
