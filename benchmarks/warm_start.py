"""Warm start: the second process of a serving job, with the first one's cache directory.

    python benchmarks/warm_start.py --preset puzzle --repeats 2 --out benchmarks/results/cpu-2core/warm-start

The preset's model is saved once; then, per repeat, a fresh process with an empty cache directory
(cold) and a fresh process on the directory that cold process filled (warm) each run the README's
recipe: `hetgraph.compile_cache_dir(DIR)`, `from_pretrained`, `make_cache`,
`model.forward = torch.compile(..., backend="hetgraph")`, `generate`. Reported: the first
generate call (compile + run, prompt `long_prompt` tokens, then 8 new tokens), the whole process,
FX graph cache hits and misses, and whether warm logits equal cold ones bit for bit. Medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import torch

import hetgraph
from hetgraph.bench.presets import make_preset

SERVE = textwrap.dedent(
    """
    import json, sys, time, torch, hetgraph
    from torch._dynamo.utils import counters
    path, cache_dir, prompt, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    hetgraph.compile_cache_dir(cache_dir)
    model = hetgraph.from_pretrained(path)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    cache = hetgraph.make_cache(model, batch_size=1, max_cache_len=prompt + 16)
    model.forward = torch.compile(model.forward, backend="hetgraph", fullgraph=True)
    start = time.perf_counter()
    with torch.no_grad():
        gen = model.generate(ids, cache=cache, max_new_tokens=8, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    first = time.perf_counter() - start
    torch.save(torch.stack(gen.logits), out)
    print(json.dumps({"first_generate_s": first, "hits": counters["inductor"]["fxgraph_cache_hit"],
                      "misses": counters["inductor"]["fxgraph_cache_miss"]}))
    """
)


def _serve(path: str, cache_dir: str, prompt: int, out: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", SERVE, path, cache_dir, str(prompt), out], capture_output=True,
                          text=True, timeout=3600)  # fmt: skip
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - start}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="puzzle")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    preset = make_preset(args.preset)
    os.makedirs(args.out, exist_ok=True)
    runs = {"cold": [], "warm": []}
    exact = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        ckpt = os.path.join(tmp, "model")
        hetgraph.from_config(preset.config).save_pretrained(ckpt)
        for r in range(args.repeats):
            cache_dir = os.path.join(tmp, f"cache{r}")
            for kind in ("cold", "warm"):
                runs[kind].append(_serve(ckpt, cache_dir, preset.long_prompt, os.path.join(tmp, f"{kind}{r}.pt")))
                print(kind, runs[kind][-1], flush=True)
            exact.append(torch.equal(torch.load(os.path.join(tmp, f"cold{r}.pt")),
                                     torch.load(os.path.join(tmp, f"warm{r}.pt"))))  # fmt: skip
    metrics = ("first_generate_s", "process_s")
    med = {k: {m: statistics.median(x[m] for x in v) for m in metrics} for k, v in runs.items()}
    ratio = {m: med["warm"][m] / med["cold"][m] for m in metrics}
    result = {"preset": preset.name, "layers": preset.config["num_hidden_layers"], "prompt": preset.long_prompt,
              "runs": runs, "median": med, "warm_over_cold": ratio, "logits_bit_equal": exact,
              "torch": torch.__version__}  # fmt: skip
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    md = [f"# Warm start, preset `{preset.name}` ({result['layers']} layers, {preset.long_prompt}-token prompt)", "",
          f"Command: `python benchmarks/warm_start.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
          "| | first generate s (compile + run) | whole process s | FX cache hits / misses |", "|---|---|---|---|"]
    for kind in ("cold", "warm"):
        hm = "; ".join(f"{x['hits']} / {x['misses']}" for x in runs[kind])
        md.append(f"| {kind} | {med[kind]['first_generate_s']:.1f} | {med[kind]['process_s']:.1f} | {hm} |")
    md += ["", f"warm / cold: first generate {ratio['first_generate_s']:.2f}, whole process {ratio['process_s']:.2f}; "
           f"warm logits bit-equal to cold: {exact}", ""]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
