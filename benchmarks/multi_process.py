"""Tensor and pipeline parallel on this machine (gloo, one host): tokens/s against one process, and
the share of each rank's time spent in communication.

    python benchmarks/multi_process.py --out benchmarks/results/cpu-2core/multi-process

One checkpoint of a preset (default `puzzle`, the Super-49B pattern at toy size) is written to a
temporary directory; each mode runs in fresh processes (`torchrun --nproc-per-node 2` for TP=2 and
PP=2): a warm-up generate, then --repeats timed greedy generates of --new-tokens tokens with
`make_cache` (eager: the comparison is of the parallel layouts, not of compilers), medians. Then one
more generate under torch.profiler: the communication share is the time in c10d / gloo ops
(all_reduce, broadcast, send, recv and their waits, so a pipeline rank's idle time waiting for the
other stage counts as communication) over the generate's wall time, per rank. Modes run one after
another, so the machine's noise between them is not interleaved away: repeat the script to see it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

COMM = ("all_reduce", "allreduce", "broadcast", "send", "recv", "all_gather", "allgather", "c10d", "gloo", "wait")


def worker(args) -> None:
    import torch.distributed as dist

    import hetgraph
    from hetgraph.distributed import generate, pipeline_stage, tensor_parallel

    mode = args.mode
    rank = int(os.environ.get("RANK", 0))
    ids = torch.tensor([[(7 * i + 3) % 100 + 1 for i in range(args.prompt_len)]])
    if mode == "pp":
        stage = pipeline_stage(args.ckpt, rank, 2)
        dist.init_process_group("gloo")

        def run():
            return generate(stage, ids, args.new_tokens)[0]
    else:
        model = hetgraph.from_pretrained(args.ckpt)
        if mode == "tp":
            from torch.distributed.device_mesh import init_device_mesh

            dist.init_process_group("gloo")
            tensor_parallel(model, init_device_mesh("cpu", (2,)))

        def run():
            cache = hetgraph.make_cache(model, batch_size=1, max_cache_len=args.prompt_len + args.new_tokens)
            with torch.no_grad():
                return model.generate(ids, cache=cache, max_new_tokens=args.new_tokens, do_sample=False,
                                      pad_token_id=0, eos_token_id=None)  # fmt: skip

    def timed():
        if mode != "one":
            dist.barrier()
        start = time.perf_counter()
        tokens = run()
        return time.perf_counter() - start, tokens

    timed()  # warm-up
    times = [timed()[0] for _ in range(args.repeats)]
    _, tokens = timed()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        wall, _ = timed()
    comm_us = sum(e.self_cpu_time_total for e in prof.key_averages()
                  if any(c in e.key.lower() for c in COMM))  # fmt: skip
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:6]
    report = {"rank": rank, "seconds": statistics.median(times), "comm_share": comm_us / 1e6 / wall,
              "tokens": tokens[0].tolist(), "threads": torch.get_num_threads(),
              "top_self_cpu": [[e.key, round(e.self_cpu_time_total / 1e6 / wall, 3)] for e in top]}  # fmt: skip
    if mode == "one":
        print(json.dumps([report]))
        return
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    if rank == 0:
        print(json.dumps(gathered))
    dist.destroy_process_group()


def launch(mode: str, ckpt: str, args) -> list[dict]:
    prefix = [] if mode == "one" else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = [sys.executable, *prefix, os.path.abspath(__file__), "--worker", "--mode", mode, "--ckpt", ckpt,
               "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
               "--repeats", str(args.repeats)]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="puzzle")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    import hetgraph
    from hetgraph.bench.presets import make_preset

    torch.manual_seed(0)
    preset = make_preset(args.preset)
    with tempfile.TemporaryDirectory() as d:
        hetgraph.from_config(preset.config).save_pretrained(d)
        runs = {mode: launch(mode, d, args) for mode in ("one", "tp", "pp")}
    one = runs["one"][0]
    rows = []
    for mode, ranks in runs.items():
        same = all(r["tokens"] == one["tokens"] for r in ranks)
        seconds = max(r["seconds"] for r in ranks)
        rows.append({"mode": mode, "tokens_per_s": args.new_tokens / seconds, "vs_one": one["seconds"] / seconds,
                     "comm_share": [round(r["comm_share"], 3) for r in ranks], "same_tokens": same,
                     "threads": [r["threads"] for r in ranks], "top_self_cpu": [r["top_self_cpu"] for r in ranks]})
    lines = [f"{args.preset} ({preset.config['num_hidden_layers']} layers, hidden {preset.config['hidden_size']}), "
             f"prompt {args.prompt_len}, {args.new_tokens} new tokens, eager, gloo on one host, "
             f"medians of {args.repeats}", "",
             "| mode | tokens/s | speed vs one process | communication share per rank | threads per rank | tokens equal |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['mode']} | {r['tokens_per_s']:.1f} | {r['vs_one']:.2f} | {r['comm_share']} | "
                     f"{r['threads']} | {r['same_tokens']} |")  # fmt: skip
    lines += ["", "Largest self-CPU shares of rank 0's profiled generate:"]
    lines += [f"- {r['mode']}: " + ", ".join(f"{k} {v:.0%}" for k, v in r["top_self_cpu"][0]) for r in rows]
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
