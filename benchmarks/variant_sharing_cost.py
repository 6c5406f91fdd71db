"""What sharing layer variants costs at run time: Inductor vs hetgraph with and without `group_layer_variants`.

    python benchmarks/variant_sharing_cost.py --preset drop-attn --out benchmarks/results/cpu-2core/variant-sharing/drop-attn

A shared variant is one subgraph that every layer of that variant calls (`invoke_subgraph`), so
Inductor cannot fuse across its boundary (the residual add ending layer i with the RMSNorm starting
layer i+1) and each call goes through the subgraph's own wrapper (and, with Inductor's default
per-call size asserts, which hetgraph turns off, re-checks its inputs). This measures that cost on one
model in one process: the three compiled forwards run interleaved, round after round, and the
medians are compared. Compile times are in-process (warm Python, one shared Inductor cache dir that
starts empty); `benchmarks/compile_scaling.py` measures cold compiles in fresh processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="drop-attn")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds (each: a prefill and --steps decode steps per engine)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--prompt-len", type=int, help="prefill tokens (default: the preset's short prompt)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="hetgraph-sharing-")

    import torch
    from transformers import StaticCache

    import hetgraph
    from hetgraph.bench import make_preset
    from hetgraph.passes import PASSES

    torch._dynamo.config.recompile_limit = 64  # four compiled engines share one code object
    preset = make_preset(args.preset, 1)
    torch.manual_seed(0)
    model = hetgraph.from_config(preset.config)
    prompt_len = args.prompt_len or preset.short_prompt
    ids = torch.randint(0, preset.config["vocab_size"], (1, prompt_len))
    max_len = prompt_len + args.steps + 1
    without_grouping = [q.__name__ for q in PASSES if q.__name__ != "group_layer_variants"]
    engines = {
        "inductor": (torch.compile(model.forward, backend="inductor"), StaticCache(config=model.config, max_cache_len=max_len)),
        "hetgraph": (torch.compile(model.forward, backend="hetgraph"), None),
        "hetgraph, no variant sharing": (
            torch.compile(model.forward, backend="hetgraph", options={"passes": without_grouping}),
            None,
        ),
        # Inductor's own default, which hetgraph turns off (see hetgraph/backend.py DEFAULT_INDUCTOR).
        "hetgraph, Inductor's size asserts on": (
            torch.compile(model.forward, backend="hetgraph",
                          options={"inductor": {"size_asserts": True, "alignment_asserts": True}}),
            None,
        ),
    }
    engines = {
        name: (fn, cache or hetgraph.make_cache(model, batch_size=1, max_cache_len=max_len))
        for name, (fn, cache) in engines.items()
    }
    compile_s, prefill, decode = {}, {name: [] for name in engines}, {name: [] for name in engines}
    with torch.no_grad():
        for name, (fn, cache) in engines.items():
            start = time.perf_counter()
            cache.reset()
            fn(input_ids=ids, cache=cache)
            fn(input_ids=ids[:, :1], cache=cache)
            compile_s[name] = time.perf_counter() - start
        for _ in range(args.rounds):
            for name, (fn, cache) in engines.items():
                cache.reset()
                start = time.perf_counter()
                token = fn(input_ids=ids, cache=cache).logits[:, -1:].argmax(-1)
                prefill[name].append(time.perf_counter() - start)
                for _ in range(args.steps):
                    start = time.perf_counter()
                    token = fn(input_ids=token, cache=cache).logits[:, -1:].argmax(-1)
                    decode[name].append(time.perf_counter() - start)
    rows = []
    base = statistics.median(decode["inductor"]), statistics.median(prefill["inductor"])
    for name in engines:
        d, f = statistics.median(decode[name]), statistics.median(prefill[name])
        rows.append({
            "engine": name, "compile_s": compile_s[name], "prefill_ms": f * 1e3, "decode_ms": d * 1e3,
            "prefill_vs_inductor": f / base[1], "decode_vs_inductor": d / base[0],
        })
    md = [
        f"# Run-time cost of sharing layer variants ({preset.name}, CPU, {os.cpu_count()} cores)", "",
        f"Command: `python benchmarks/variant_sharing_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"One process, engines interleaved, medians of {args.rounds} prefills ({prompt_len} tokens) "
        f"and {args.rounds * args.steps} decode steps each. Compile s: in-process, prefill + decode graphs.", "",
        "| engine | compile s | prefill ms | decode ms/token | prefill / Inductor | decode / Inductor |",
        "|---|---|---|---|---|---|",
        *(f"| {r['engine']} | {r['compile_s']:.1f} | {r['prefill_ms']:.2f} | {r['decode_ms']:.3f} "
          f"| {r['prefill_vs_inductor']:.3f} | {r['decode_vs_inductor']:.3f} |" for r in rows),
    ]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"preset": preset.name, "prompt_len": prompt_len, "rounds": args.rounds, "steps": args.steps, "rows": rows}, f, indent=1)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
