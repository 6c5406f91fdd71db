"""How well `hetgraph.profile`'s table predicts whole models: predicted / measured - 1, per phase.

    python benchmarks/profile_accuracy.py --presets drop-attn,width-pruned --out benchmarks/results/cpu-2core/profile

For each preset: the table of the preset's model (each variant timed inside one probe model, see
hetgraph/profiling.py); then the whole model, and a model assembled from the same variants in
another order and count (the layers reversed, then the first half again), each compiled and timed
the same way, interleaved with the table's probe (the hetgraph backend, `make_cache`, prefill of
--prompt-len tokens into an empty cache, decode steps from --context-len tokens of history;
medians of --repeats). One process.
What profiling costs against a cold compile: benchmarks/profile_cost.py.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import hetgraph
from hetgraph.bench.presets import make_preset
from hetgraph.configs import model_config_dict, normalize_config, select_layers
from hetgraph.contract import model_spec
from hetgraph.profiling import probe_layers, table_from_probe
from hetgraph.spec import ModelSpec
from hetgraph.timing import PHASES, ModelTimer


def measure(preset_name: str, args) -> dict:
    preset = make_preset(preset_name)
    torch.manual_seed(0)
    model = hetgraph.from_config(preset.config)
    shapes = dict(prompt_len=args.prompt_len, context_len=args.context_len, batch_size=1)
    config, spec = model_config_dict(model.config), model_spec(model)
    n = len(spec)
    models = {"model": config, "reordered": select_layers(config, [*reversed(range(n)), *range(n // 2)])}
    # The table's probe and the two whole models, timed interleaved (hetgraph.profile's own code:
    # `ModelTimer.time_layers`, `table_from_probe`): this machine's speed drifts by tens of percent
    # over minutes, and a table measured before the models would mostly measure the drift.
    variants = spec.variants()
    order = probe_layers(spec, variants)
    timer = ModelTimer(shapes, "hetgraph", args.repeats, torch.float32, "cpu")
    whole, per_layer, timings = timer.time_layers(select_layers(config, order), *models.values())
    table = table_from_probe(config, spec, variants, order, whole, per_layer, timer)
    result = {"preset": preset_name, "layers": n, "variants": len(table.rows), "models": {}}
    for (name, cfg), measured in zip(models.items(), timings):
        predicted = table.predict(cfg)
        result["models"][name] = {
            "layers": len(ModelSpec.from_config(normalize_config(cfg))),
            **{f"measured_{p}": measured[p] for p in PHASES},
            **{f"predicted_{p}": predicted[p] for p in PHASES},
            **{f"error_{p}": predicted[p] / measured[p] - 1 for p in PHASES},
        }
    result["table"] = table.to_dict()
    return result


def to_markdown(results: list[dict], args) -> str:
    lines = [
        f"prefill {args.prompt_len} tokens, decode from {args.context_len}; fp32, CPU, hetgraph backend, "
        f"medians of {args.repeats}",
        "",
        "| preset | model | layers | prefill measured / predicted ms | error | decode measured / predicted ms | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, m in r["models"].items():
            lines.append(
                f"| {r['preset']} | {name} | {m['layers']} | {m['measured_prefill_ms']:.2f} / {m['predicted_prefill_ms']:.2f} "
                f"| {m['error_prefill_ms']:+.1%} | {m['measured_decode_ms']:.3f} / {m['predicted_decode_ms']:.3f} "
                f"| {m['error_decode_ms']:+.1%} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="drop-attn,width-pruned")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--context-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results = []
    for name in args.presets.split(","):  # written after each preset
        results.append(measure(name, args))
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
        text = to_markdown(results, args)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(text)
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
