"""Benchmarks: eager vs Inductor vs hetgraph on heterogeneity patterns, with a roofline.

    python benchmarks/run.py --preset puzzle --out benchmarks/results/cpu-2core
    python -m hetgraph bench --preset all --quick --out /tmp/bench

Each (engine, repeat) runs in a fresh process with an empty Inductor cache, engines interleaved;
figures are medians over repeats. Engines: eager (the hetgraph-built model, hetgraph's cache),
inductor (torch.compile default, transformers' StaticCache), hetgraph (backend + make_cache), and
hetgraph-parent (the homogeneous parent, for realized savings).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

ENGINES = ("eager", "inductor", "hetgraph", "hetgraph-parent")


@dataclass
class Preset:
    name: str
    config: dict
    parent: dict
    short_prompt: int = 32
    long_prompt: int = 512
    decode_tokens: int = 32
    notes: str = ""


def _base(hidden: int, layers: int, **kw) -> dict:
    heads = max(4, hidden // 64)
    config = dict(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=layers,
        vocab_size=4096,
        intermediate_size=hidden * 3,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
    config.update(kw)
    return config


def _with_layers(parent: dict, per_layer: dict) -> dict:
    return dict(parent, per_layer_config={i: o for i, o in per_layer.items() if o})


def puzzle_pattern(layers: int | None = None) -> list[dict]:
    """Per-layer overrides following Llama-3.3-Nemotron-Super-49B's block_configs (ffn_mult, no_op)."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [
        os.path.join(here, "..", "..", "shared", "configs", "nemotron-super-49b-v1.config.json"),
        os.path.join(here, "..", "benchmarks", "configs", "nemotron-super-49b-v1.config.json"),
    ]
    path = next((p for p in candidates if os.path.exists(p)), None)
    if path is None:
        raise FileNotFoundError(f"nemotron-super-49b-v1.config.json not found in {candidates}")
    with open(path) as f:
        blocks = json.load(f)["block_configs"]
    if layers is not None:
        blocks = [blocks[round(i * len(blocks) / layers)] for i in range(layers)]
    return [
        {"attention_free": b["attention"]["no_op"], "ffn_mult": b["ffn"]["ffn_mult"], "mlp_free": b["ffn"]["no_op"]}
        for b in blocks
    ]


def _ffn_width(ffn_mult: float, hidden: int, multiple: int = 64) -> int:
    width = int(2 * ffn_mult * hidden / 3)
    return -(-width // multiple) * multiple


def make_preset(name: str, scale: int = 1) -> Preset:
    hidden = 512 * scale
    if name == "puzzle":
        pattern = puzzle_pattern(20 * scale)
        widths = [_ffn_width(p["ffn_mult"], hidden) for p in pattern]
        parent = _base(hidden, len(pattern), intermediate_size=max(widths))
        per_layer = {}
        for i, (p, w) in enumerate(zip(pattern, widths)):
            o = {} if w == parent["intermediate_size"] else {"intermediate_size": w}
            skip = [b for b, free in (("attention", p["attention_free"]), ("mlp", p["mlp_free"])) if free]
            if skip:
                o["skip"] = skip
            per_layer[i] = o
        notes = "Nemotron-Super-49B block pattern (80 layers subsampled), toy width"
        return Preset(name, _with_layers(parent, per_layer), parent, notes=notes)
    if name == "drop-attn":
        parent = _base(hidden, 16 * scale)
        layers = parent["num_hidden_layers"]
        upper = range(layers // 2, layers)
        per_layer = {i: {"skip": ["attention"]} for i in upper if (i - layers // 2) % 2 == 1}
        return Preset(name, _with_layers(parent, per_layer), parent, notes="LLM-Drop: half the upper attention removed")
    if name == "width-pruned":
        parent = _base(hidden, 16 * scale)
        heads, inter = parent["num_attention_heads"], parent["intermediate_size"]
        per_layer = {}
        for i in range(parent["num_hidden_layers"]):
            keep = (0.5, 0.75, 1.0, 0.625)[i % 4]
            h = max(parent["num_key_value_heads"], int(heads * keep) // parent["num_key_value_heads"] * parent["num_key_value_heads"])
            per_layer[i] = {"num_attention_heads": h, "intermediate_size": _ffn_width(keep * 1.5 * 1.5, hidden)}
            if per_layer[i]["intermediate_size"] > inter:
                per_layer[i]["intermediate_size"] = inter
        return Preset(name, _with_layers(parent, per_layer), parent, notes="LLM-Pruner/FLAP: per-layer heads and widths")
    if name == "windowed":
        parent = _base(hidden, 12 * scale, sliding_window=None)
        windows = (64, 256, None)
        per_layer = {i: {"sliding_window": windows[i % 3]} for i in range(parent["num_hidden_layers"])}
        return Preset(
            name, _with_layers(parent, per_layer), parent, long_prompt=2048, notes="per-layer windows 64/256/full"
        )
    if name == "homogeneous":
        parent = _base(hidden, 16 * scale)
        return Preset(name, dict(parent), parent, notes="the parent, as control")
    if name == "puzzle-8b":  # GPU: Llama-3.1-8B shapes with the Super-49B block pattern
        hidden, layers = 4096, 32
        pattern = puzzle_pattern(layers)
        widths = [_ffn_width(p["ffn_mult"], hidden, 256) for p in pattern]
        parent = dict(
            _base(hidden, layers, intermediate_size=14336),
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        )
        per_layer = {
            i: {"intermediate_size": w, **({"skip": ["attention"]} if p["attention_free"] else {})}
            for i, (p, w) in enumerate(zip(pattern, widths))
        }
        return Preset(name, _with_layers(parent, per_layer), parent, short_prompt=128, long_prompt=2048,
                      decode_tokens=128, notes="Llama-3.1-8B shapes, Super-49B pattern (GPU)")
    if name == "gpt-oss-puzzle":  # GptOss as gpt-oss-puzzle varies it: expert counts and windows per layer
        layers = 8 * scale
        parent = dict(
            model_type="gpt_oss", hidden_size=hidden, num_hidden_layers=layers, vocab_size=4096,
            intermediate_size=hidden // 2, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
            num_local_experts=16, num_experts_per_tok=4, sliding_window=128, max_position_embeddings=131072,
            tie_word_embeddings=False,
        )  # the stock pattern: sliding 128 on even layers, full attention on odd ones
        per_layer = {}
        for i in range(layers):
            o = {"num_local_experts": 8} if i % 4 in (1, 2) else {}  # half the layers keep half the experts
            if i % 4 == 1:
                o["sliding_window"] = 512  # a full-attention layer of the parent turned into a long window
            elif i % 4 == 3 and i != layers - 1:
                o["sliding_window"] = 64  # a short window on a parent full layer
            per_layer[i] = o
        notes = "GptOss, Puzzle-like: per-layer expert counts (16/8) and windows (64/128/512/full)"
        return Preset(name, _with_layers(parent, per_layer), parent, notes=notes)
    if name == "llama4-chunked":  # Llama4 text: chunked and NoPE layers, MoE interleaved, pruned per layer
        layers = 8 * scale
        parent = dict(
            model_type="llama4_text", hidden_size=hidden, num_hidden_layers=layers, vocab_size=4096,
            intermediate_size=hidden, intermediate_size_mlp=2 * hidden, num_attention_heads=8,
            num_key_value_heads=2, head_dim=64, num_local_experts=8, num_experts_per_tok=1,
            interleave_moe_layer_step=2, attention_chunk_size=256, no_rope_layer_interval=4,
            max_position_embeddings=8192, tie_word_embeddings=False,
        )  # layers 3, 7, ... NoPE (global attention); odd layers MoE; others chunked 256
        per_layer = {}
        for i in range(layers):
            o = {}
            if i % 4 == 0:
                o["attention_chunk_size"] = 64
            if i % 4 == 1:
                o["num_local_experts"] = 4
            if i % 4 == 2:
                o.update(intermediate_size_mlp=hidden, num_key_value_heads=1)
            if i % 8 == 5:
                o["skip"] = ["attention"]
            per_layer[i] = o
        notes = "Llama4 text: chunks 64/256, NoPE every 4th layer, MoE 8/4 experts, pruned widths, attention removed"
        return Preset(name, _with_layers(parent, per_layer), parent, notes=notes)
    if name == "nemotron-h-hybrid":  # NemotronH: mamba-heavy hybrid, pruned per block
        pattern = ["linear_attention", "mlp", "linear_attention", "full_attention", "linear_attention", "moe"]
        blocks = pattern * (2 * scale)
        parent = dict(
            model_type="nemotron_h", hidden_size=hidden, layers_block_type=blocks, vocab_size=4096,
            num_attention_heads=8, num_key_value_heads=2, head_dim=64, intermediate_size=2 * hidden,
            n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=hidden // 2,
            moe_shared_expert_intermediate_size=hidden, mamba_num_heads=hidden // 32, mamba_head_dim=64,
            ssm_state_size=64, n_groups=4, conv_kernel=4, chunk_size=128, max_position_embeddings=8192,
            tie_word_embeddings=False,
        )
        per_layer = {}
        for i, block in enumerate(blocks):
            o = {}
            if block == "linear_attention" and i % 4 == 2:
                o["mamba_num_heads"] = hidden // 64  # half the mamba heads
            if block == "mlp":
                o["intermediate_size"] = hidden if i % 12 == 1 else 2 * hidden
                if i % 12 == 7:
                    o = {"skip": ["mixer"]}  # a removed MLP block
            if block == "moe" and i % 12 == 5:
                o["num_local_experts"] = 4
            if block == "full_attention" and i % 12 == 9:
                o = {"skip": ["mixer"]}  # every other attention block removed
            per_layer[i] = o
        notes = "NemotronH hybrid (M-M*M E pattern): pruned mamba heads, MLP widths, experts; blocks removed"
        return Preset(name, _with_layers(parent, per_layer), parent, notes=notes)
    if name.startswith("variants-"):  # compile-scaling study: N layers of 3 repeating variants
        layers = int(name.split("-")[1])
        parent = _base(256, layers)
        pattern = [{}, {"skip": ["attention"], "intermediate_size": 384}, {"intermediate_size": 1024}]
        per_layer = {i: dict(pattern[i % 3]) for i in range(layers)}
        return Preset(name, _with_layers(parent, per_layer), parent, long_prompt=128, decode_tokens=16)
    if name.startswith("puzzle-"):  # compile-scaling study: the Super-49B pattern at N layers, hidden 256
        layers = int(name.split("-")[1])
        pattern = puzzle_pattern(layers)
        widths = [_ffn_width(p["ffn_mult"], 256) for p in pattern]
        parent = _base(256, layers, intermediate_size=max(widths))
        per_layer = {
            i: {"intermediate_size": w, **({"skip": ["attention"]} if p["attention_free"] else {})}
            for i, (p, w) in enumerate(zip(pattern, widths))
        }
        return Preset(name, _with_layers(parent, per_layer), parent, long_prompt=128, decode_tokens=16)
    raise ValueError(f"unknown preset {name!r}; known: {list(PRESETS)} and variants-N / puzzle-N")


PRESETS = (
    "puzzle",
    "drop-attn",
    "width-pruned",
    "windowed",
    "homogeneous",
    "gpt-oss-puzzle",
    "llama4-chunked",
    "nemotron-h-hybrid",
)


# ---------------------------------------------------------------------------------------------
# Worker: one engine, one fresh process.


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _kv_bytes(cache) -> int:
    return sum(l.keys.nbytes + l.values.nbytes for l in cache.layers if getattr(l, "keys", None) is not None)


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_worker(job: dict) -> dict:
    import torch

    import hetgraph
    from transformers import StaticCache

    torch.manual_seed(0)
    dtype = getattr(torch, job["dtype"])
    device = job["device"]
    preset = make_preset(job["preset"], job["scale"])
    engine, _, mode = job["engine"].partition(":")  # e.g. "hetgraph:reduce-overhead"
    mode = mode or job.get("mode")
    config = preset.parent if engine == "hetgraph-parent" else preset.config
    model = hetgraph.from_config(config, dtype=dtype, device=device)
    vocab = config["vocab_size"]
    short = torch.randint(0, vocab, (1, preset.short_prompt), device=device)
    long = torch.randint(0, vocab, (1, preset.long_prompt), device=device)
    max_len = preset.long_prompt + preset.decode_tokens
    if engine == "inductor":
        cache = StaticCache(config=model.config, max_cache_len=max_len)
        fwd = torch.compile(model.forward, backend="inductor", mode=mode)
    else:
        cache = hetgraph.make_cache(model, batch_size=1, max_cache_len=max_len)
        fwd = model.forward if engine == "eager" else torch.compile(model.forward, backend="hetgraph", mode=mode)
    from torch._dynamo.utils import counters

    def prefill(ids):
        cache.reset()
        out = fwd(input_ids=ids, cache=cache).logits[:, -1]
        _sync(device)
        return out

    def step(token):
        out = fwd(input_ids=token, cache=cache).logits[:, -1]
        _sync(device)
        return out

    result = {"engine": job["engine"], "preset": preset.name}
    with torch.no_grad():
        start = time.perf_counter()
        token = prefill(short).argmax(-1, keepdim=True)
        result["compile_prefill_s"] = time.perf_counter() - start
        start = time.perf_counter()
        step(token)
        result["compile_decode_s"] = time.perf_counter() - start
        prefill(long)  # compiles the long-prompt graph
        reps = job["timing_repeats"]
        for name, ids in (("prefill_short_ms", short), ("prefill_long_ms", long)):
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                prefill(ids)
                times.append((time.perf_counter() - start) * 1e3)
            result[name] = statistics.median(times)
        token = prefill(short).argmax(-1, keepdim=True)
        times = []
        for _ in range(preset.decode_tokens - 1):
            start = time.perf_counter()
            token = step(token).argmax(-1, keepdim=True)
            times.append((time.perf_counter() - start) * 1e3)
        result["decode_ms_per_token"] = statistics.median(times)
    result["graphs_compiled"] = counters["stats"].get("unique_graphs", 0)
    result["peak_rss_mb"] = _rss_mb()
    if device == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["kv_bytes"] = _kv_bytes(cache)
    params = list(model.named_parameters())
    result["weight_bytes"] = sum(p.nbytes for _, p in params)
    result["streamed_bytes_per_token"] = streamed_weight_bytes(model) + result["kv_bytes"]
    return result


_ROUTED = re.compile(r"layers\.(\d+)\..*\.experts\.")  # merged routed-expert tensors: [experts, ...]


def streamed_weight_bytes(model) -> int:
    """Weight bytes one batch-1 decode step must read: every weight but the embedding table (one
    row of it; NemotronH calls it `embeddings`), and of each MoE layer's routed experts only the
    k experts a token is routed to (k / E of each merged expert tensor)."""
    from hetgraph.build import model_spec

    spec = model_spec(model)
    total = 0
    for name, p in model.named_parameters():
        if ".embed" in name:
            continue
        routed = _ROUTED.search(name)
        k = dict(spec[int(routed.group(1))].extra).get("num_experts_per_tok") if routed else None
        total += p.nbytes * k // p.shape[0] if k else p.nbytes
    return total


# ---------------------------------------------------------------------------------------------
# Driver.


def memory_bandwidth_gbs(device: str = "cpu", mbytes: int = 256, repeats: int = 7) -> float:
    """Copy bandwidth (read + write) of a buffer far larger than the caches, median of repeats."""
    import torch

    n = mbytes * 2**20 // 4
    a = torch.ones(n, device=device)
    b = torch.empty_like(a)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        b.copy_(a)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * a.nbytes / statistics.median(times) / 1e9


def ideal_and_static_kv(preset: Preset, dtype: str, device: str = "cpu") -> dict:
    """KV bytes: hetgraph's ideal, and what transformers' StaticCache allocates when initialised up front."""
    import torch

    import hetgraph
    from hetgraph.build import build_skeleton
    from hetgraph.cache import ideal_kv_bytes
    from transformers import StaticCache

    max_len = preset.long_prompt + preset.decode_tokens
    model, spec = build_skeleton(preset.config)
    torch_dtype = getattr(torch, dtype)
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    lc = model.config.per_layer_config
    heads = [getattr(c, "num_key_value_heads", None) or c.num_attention_heads for c in lc]
    dims = [getattr(c, "head_dim", None) or spec.hidden_size // c.num_attention_heads for c in lc]
    cache.early_initialization(batch_size=1, num_heads=heads, head_dim=dims, dtype=torch_dtype, device="meta")
    static = _kv_bytes(cache)
    return {"ideal_kv_bytes": ideal_kv_bytes(spec, 1, max_len, torch_dtype), "static_cache_kv_bytes": static}


def _spawn(job: dict, timeout: int = 1800) -> dict:
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as cache_dir:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # cold: an empty Inductor cache per process
        cmd = [sys.executable, "-m", "hetgraph.bench", "--worker", json.dumps(job)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode != 0:
        return {"engine": job["engine"], "preset": job["preset"], "error": _exception_line(out.stderr)}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _exception_line(stderr: str) -> str:
    """The raised exception's own line of a worker's traceback (not torch's hints printed after it)."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*", line)]
    return (raised or lines or ["(no output)"])[-1]


METRICS = (
    "compile_prefill_s",
    "compile_decode_s",
    "prefill_short_ms",
    "prefill_long_ms",
    "decode_ms_per_token",
    "peak_rss_mb",
    "graphs_compiled",
)


def run_preset(name: str, args, progress) -> dict:
    preset = make_preset(name, args.scale)
    runs = {e: [] for e in args.engines}
    for _ in range(args.repeats):
        for engine in args.engines:  # interleaved
            job = dict(
                engine=engine,
                preset=name,
                scale=args.scale,
                dtype=args.dtype,
                device=args.device,
                mode=args.mode,
                timing_repeats=args.timing_repeats,
            )
            progress.set_postfix_str(f"{name}/{engine}")
            runs[engine].append(_spawn(job))
            progress.update(1)
    summary = {}
    for engine, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            summary[engine] = {"error": results[0].get("error")}
            continue
        s = {m: statistics.median(r[m] for r in ok) for m in METRICS}
        for k in ("kv_bytes", "weight_bytes", "streamed_bytes_per_token"):
            s[k] = ok[0][k]
        s["achieved_gbs"] = s["streamed_bytes_per_token"] / (s["decode_ms_per_token"] / 1e3) / 1e9
        summary[engine] = s
    kv = ideal_and_static_kv(preset, args.dtype)
    derived = {}
    het, parent, ind = summary.get("hetgraph"), summary.get("hetgraph-parent"), summary.get("inductor")
    if het and parent and "error" not in het and "error" not in parent:
        time_ratio = het["decode_ms_per_token"] / parent["decode_ms_per_token"]
        byte_ratio = het["weight_bytes"] / parent["weight_bytes"]
        derived["realized_savings"] = time_ratio / byte_ratio
    if het and ind and "error" not in het and "error" not in ind:
        for m in ("prefill_short_ms", "prefill_long_ms", "decode_ms_per_token", "compile_prefill_s"):
            derived[f"hetgraph/inductor {m}"] = het[m] / ind[m]
    return {"preset": asdict(preset), "runs": runs, "summary": summary, "kv": kv, "derived": derived}


def _table(result: dict, bandwidth: float) -> str:
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


def _plots(results: list[dict], bandwidth: float, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    panels = (
        ("compile_prefill_s", "cold compile (prefill graph), s"),
        ("prefill_long_ms", "prefill, long prompt, ms"),
        ("decode_ms_per_token", "decode, ms/token"),
        ("achieved_gbs", "decode bytes/s achieved, GB/s"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    names = [r["preset"]["name"] for r in results]
    engines = list(dict.fromkeys(e for r in results for e in r["summary"]))
    width = 0.8 / max(1, len(engines))
    for ax, (metric, title) in zip(axes, panels):
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
    path = os.path.join(out, "summary.png")
    fig.savefig(path, dpi=110)
    files.append(path)
    return files


def _machine(device: str) -> dict:
    import platform

    import torch

    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="all", help=f"one of {list(PRESETS)}, variants-N, puzzle-N, or 'all'")
    p.add_argument("--quick", action="store_true", help="one repeat, few timing iterations")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--scale", type=int, default=1, help="grow width and depth of the presets")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per engine")
    p.add_argument("--timing-repeats", type=int, default=5)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--mode", default=None, help='torch.compile mode, e.g. "reduce-overhead" for CUDA graphs')
    p.add_argument("--out", help="directory for results.json, results.md and the plots")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    if not args.out:
        p.error("--out is required")
    from tqdm import tqdm

    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.engines = [e for e in args.engines.split(",") if e]
    if args.quick:
        args.repeats, args.timing_repeats = 1, 3
    presets = list(PRESETS) if args.preset == "all" else args.preset.split(",")
    os.makedirs(args.out, exist_ok=True)
    bandwidth = memory_bandwidth_gbs(args.device)
    results = []
    with tqdm(total=len(presets) * len(args.engines) * args.repeats, unit="run") as progress:
        for name in presets:
            results.append(run_preset(name, args, progress))
    bandwidth_after = memory_bandwidth_gbs(args.device)
    report = {
        "machine": _machine(args.device),
        "memory_bandwidth_gbs": [bandwidth, bandwidth_after],
        "args": {k: v for k, v in vars(args).items() if k != "worker"},
        "results": results,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    bw = statistics.mean([bandwidth, bandwidth_after])
    md = [
        f"# Benchmark results ({report['machine']})",
        "",
        f"Command: `python benchmarks/run.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
        f"Memory bandwidth (copy, same run): {bandwidth:.1f} / {bandwidth_after:.1f} GB/s (before / after).  ",
        f"Medians of {args.repeats} fresh process(es) per engine, interleaved; dtype {args.dtype}.",
        "",
        *(_table(r, bw) for r in results),
    ]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(md))
    _plots(results, bw, args.out)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
