"""What a run writes: results.json, results.md (one table per preset) and summary.png."""

from __future__ import annotations

import json
import os
import platform
import statistics

import torch


def machine_info(device: str) -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def preset_table(result: dict, bandwidth: float) -> str:
    """One preset's markdown: a row per engine, then its KV bytes and ratios."""
    rows = [
        "| engine | compile prefill s | compile decode s | prefill short ms | prefill long ms | decode ms/token "
        "| GB/s (% of bw) | peak RSS MB | KV bytes | graphs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for engine, s in result["summary"].items():
        if "error" in s:
            rows.append(f"| {engine} | error: {s['error']} |")
            continue
        rows.append(
            f"| {engine} | {s['compile_prefill_s']:.1f} | {s['compile_decode_s']:.1f} | {s['prefill_short_ms']:.2f} "
            f"| {s['prefill_long_ms']:.1f} | {s['decode_ms_per_token']:.2f} | {s['achieved_gbs']:.1f} "
            f"({100 * s['achieved_gbs'] / bandwidth:.0f}%) | {s['peak_rss_mb']:.0f} | {s['kv_bytes']:,} "
            f"| {s['graphs_compiled']:.0f} |"
        )
    kv, d = result["kv"], result["derived"]
    lines = [f"### {result['preset']['name']}: {result['preset']['notes']}", "", *rows, ""]
    lines.append(
        f"KV bytes: hetgraph ideal {kv['ideal_kv_bytes']:,}; transformers' StaticCache (initialised up front) "
        f"{kv['static_cache_kv_bytes']:,}."
    )
    if d:
        lines.append("Ratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in d.items()) + ".")
    return "\n".join(lines) + "\n"


_PANELS = (
    ("compile_prefill_s", "cold compile (prefill graph), s"),
    ("prefill_long_ms", "prefill, long prompt, ms"),
    ("decode_ms_per_token", "decode, ms/token"),
    ("achieved_gbs", "decode bytes/s achieved, GB/s"),
)


def plot_summary(results: list[dict], bandwidth: float, path: str) -> None:
    """One bar panel per metric: presets on the x axis, a bar per engine."""
    import matplotlib  # the `bench` extra; only a full run needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(_PANELS), figsize=(5 * len(_PANELS), 4))
    names = [r["preset"]["name"] for r in results]
    engines = list(dict.fromkeys(e for r in results for e in r["summary"]))
    width = 0.8 / max(1, len(engines))
    for ax, (metric, title) in zip(axes, _PANELS):
        for k, engine in enumerate(engines):
            vals = [r["summary"].get(engine, {}).get(metric, float("nan")) for r in results]
            ax.bar([i + k * width for i in range(len(names))], vals, width, label=engine)
        if metric == "achieved_gbs":
            ax.axhline(bandwidth, color="k", linestyle="--", label="memory bandwidth (copy)")
        ax.set_xticks([i + width * (len(engines) - 1) / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=20)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(report: dict, out: str, command: str) -> str:
    """results.json, results.md and summary.png under `out`; returns the markdown."""
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    before, after = report["memory_bandwidth_gbs"]
    bw = statistics.mean([before, after])
    args = report["args"]
    md = "\n".join([
        f"# Benchmark results ({report['machine']})",
        "",
        f"Command: `python benchmarks/run.py {command}`  ",
        f"Memory bandwidth (copy, same run): {before:.1f} / {after:.1f} GB/s (before / after).  ",
        f"Medians of {args['repeats']} fresh process(es) per engine, interleaved; dtype {args['dtype']}.",
        "",
        *(preset_table(r, bw) for r in report["results"]),
    ])
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    plot_summary(report["results"], bw, os.path.join(out, "summary.png"))
    return md
