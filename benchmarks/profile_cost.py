"""What `hetgraph.profile` costs against one cold compile of the whole model.

    python benchmarks/profile_cost.py --presets puzzle-80,width-pruned --out benchmarks/results/cpu-2core/profile-cost

Per preset, interleaved, `--repeats` times, each in a fresh process with an empty Inductor cache:
`hetgraph.profile(model, prompt_len, context_len, repeats)` from start to table (compiles and
timing included), and the whole model compiled with backend="hetgraph" (its first prefill call of
--prompt-len tokens plus its first decode call: both graphs, as benchmarks/compile_scaling.py
counts a cold compile). Medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from hetgraph.bench.driver import exception_line, fresh_process

PROFILE = """
import json, sys, time, torch, hetgraph
from hetgraph.bench.presets import make_preset
name, prompt, context, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
model = hetgraph.from_config(make_preset(name).config)
start = time.perf_counter()
table = hetgraph.profile(model, prompt_len=prompt, context_len=context, repeats=repeats)
print(json.dumps({"seconds": time.perf_counter() - start, "variants": len(table.rows)}))
"""

COMPILE = """
import json, sys, time, torch, hetgraph
from hetgraph.bench.presets import make_preset
name, prompt = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = hetgraph.from_config(make_preset(name).config)
cache = hetgraph.make_cache(model, batch_size=1, max_cache_len=prompt + 8)
fwd = torch.compile(model.forward, backend="hetgraph")
ids = torch.randint(0, model.config.vocab_size, (1, prompt))
start = time.perf_counter()
with torch.no_grad():
    fwd(input_ids=ids, cache=cache)
    fwd(input_ids=ids[:, -1:], cache=cache)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def _fresh(script: str, *args) -> dict:
    out = fresh_process(["-c", script, *map(str, args)])
    if out.returncode != 0:
        raise RuntimeError(exception_line(out.stderr))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="puzzle-80")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--context-len", type=int, default=256)
    p.add_argument("--timing-repeats", type=int, default=5, help="profile's own repeats")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    results = []
    for name in args.presets.split(","):
        runs = {"profile": [], "compile": []}
        variants = None
        for _ in range(args.repeats):
            r = _fresh(PROFILE, name, args.prompt_len, args.context_len, args.timing_repeats)
            runs["profile"].append(r["seconds"])
            variants = r["variants"]
            runs["compile"].append(_fresh(COMPILE, name, args.prompt_len)["seconds"])
            print(name, {k: round(v[-1], 1) for k, v in runs.items()}, flush=True)
        results.append({"preset": name, "variants": variants, "runs": runs,
                        **{k: statistics.median(v) for k, v in runs.items()}})  # fmt: skip
    lines = [f"`python benchmarks/profile_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}`; CPU, fp32, "
             f"fresh process and empty Inductor cache per run, medians of {args.repeats}", "",
             "| preset | variants | profile s | whole-model cold compile s (hetgraph, both graphs) | ratio |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        lines.append(f"| {r['preset']} | {r['variants']} | {r['profile']:.1f} | {r['compile']:.1f} | "
                     f"{r['profile'] / r['compile']:.2f} |")  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
