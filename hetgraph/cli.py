"""`python -m hetgraph <command>`.

A command is one function `(args) -> exit code` whose docstring's first line is its help, registered
with its arguments in `COMMANDS`. Imports happen inside the command, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from hetgraph.errors import HeteroConfigError

# Exit code for a bad config, checkpoint or command line (argparse uses 2 as well).
EXIT_USAGE = 2


def _arg(*names: str, **kwargs: Any) -> tuple[tuple[str, ...], dict[str, Any]]:
    """One `add_argument` call, written where the command is registered."""
    return names, kwargs


@dataclass(frozen=True)
class Command:
    name: str
    run: Callable[[argparse.Namespace], int]
    arguments: tuple = ()


def inspect(args: argparse.Namespace) -> int:
    """Per-layer table of a config: blocks, sizes, parameters and KV bytes per token against the homogeneous parent."""
    from hetgraph.inspection import inspect_config

    report = inspect_config(args.path, check_weights=not args.no_check_weights)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_text())
    return 0


def passes(args: argparse.Namespace) -> int:
    """The backend's FX passes, in the order they run."""
    from hetgraph.passes import describe_passes

    print(describe_passes())
    return 0


def demo(args: argparse.Namespace) -> int:
    """Build a small heterogeneous model, compile it with backend="hetgraph", compare with eager and Inductor."""
    from hetgraph.demo import run

    run(prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats)
    return 0


def convert(args: argparse.Namespace) -> int:
    """Rewrite a checkpoint (Nemotron-NAS, LLM-Drop or per-layer) into the per_layer_config (or nemotron-nas) layout."""
    from hetgraph.convert import convert as convert_checkpoint
    from hetgraph.convert import parse_size

    try:
        max_shard_size = parse_size(args.max_shard_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    written = convert_checkpoint(args.src, args.dst, to=args.to, infer_shapes=args.infer_shapes,
                                 max_shard_size=max_shard_size, progress=not args.quiet)
    print(f"wrote {len(written)} file(s) to {args.dst}")
    return 0


def cut(args: argparse.Namespace) -> int:
    """Cut a model from a (homogeneous) parent checkpoint by a per-layer plan: remove blocks, narrow MLPs and heads."""
    from hetgraph.convert import cut as cut_checkpoint

    with open(args.plan) as f:
        plan = json.load(f)
    if isinstance(plan, dict) and "per_layer_config" in plan:  # a config.json-style file works too
        plan = plan["per_layer_config"]
    written = cut_checkpoint(args.src, args.dst, plan, prune=args.prune)
    print(f"wrote {len(written)} file(s) to {args.dst}")
    return 0


def export(args: argparse.Namespace) -> int:
    """Export a checkpoint's specialized graphs as torch.export programs (.pt2), optionally decode and AOTInductor."""
    import torch

    from hetgraph.build import from_pretrained
    from hetgraph.export import export as export_model
    from hetgraph.runtime import read_metadata

    model = from_pretrained(args.src)
    input_ids = torch.zeros((args.batch_size, args.prompt_len), dtype=torch.long)
    try:
        result = export_model(
            model,
            args.out,
            input_ids=input_ids,
            decode=args.decode,
            batch_size=args.batch_size,
            max_cache_len=args.max_cache_len,
            package=args.package,
            progress=True,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    for name in ("prefill", "decode", "prefill_package", "decode_package"):
        if getattr(result, name):
            print(f"{name}: {getattr(result, name)}")
    meta = read_metadata(result.prefill)
    print(f"serves batch {meta['batch_size']}, prompts of {meta['min_prompt_len']}..{meta['max_prompt_len']} tokens")
    return 0


def show_graph(args: argparse.Namespace) -> int:
    """Per-layer listing of a checkpoint's specialized prefill graph: each layer's spec and its ops by count."""
    import torch

    from hetgraph.build import from_pretrained
    from hetgraph.contract import model_spec
    from hetgraph.export.listing import describe_graph
    from hetgraph.export.trace import prefill_program

    model = from_pretrained(args.src)
    ep, records = prefill_program(model, input_ids=torch.zeros((1, args.prompt_len), dtype=torch.long))
    print(describe_graph(ep, model_spec(model), records))
    return 0


def profile(args: argparse.Namespace) -> int:
    """Per-variant layer latencies (prefill and decode) of a model or of candidate layers: table.json, table.md, a plot."""
    import torch

    from hetgraph import profiling
    from hetgraph.loading import open_checkpoint

    config = open_checkpoint(args.path, weights=False).config
    shapes = dict(prompt_len=args.prompt_len, context_len=args.context_len, batch_size=args.batch_size,
                  repeats=args.repeats, backend=args.backend, device=args.device, progress=True)  # fmt: skip
    dtype = getattr(torch, args.dtype)
    if args.variants:
        with open(args.variants) as f:
            variants = json.load(f)
        table = profiling.profile_variants(config, variants, dtype=dtype, **shapes)
    else:
        from hetgraph.build import from_config

        table = profiling.profile(from_config(config, dtype=dtype, device=args.device), **shapes)
    os.makedirs(args.out, exist_ok=True)
    table.save(os.path.join(args.out, "table.json"))
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table.to_markdown())
    plot = profiling.plot(table, os.path.join(args.out, "table.png"))
    print(table.to_markdown())
    print(f"wrote {args.out}/table.json, table.md" + (", table.png" if plot else " (no plot: matplotlib missing)"))
    return 0


def warmup(args: argparse.Namespace) -> int:
    """Compile a checkpoint's prefill and decode graphs into a cache directory, for warm starts of later processes."""
    import torch

    from hetgraph.warmup import warmup as run_warmup

    lens = tuple(int(n) for n in args.prompt_lens.split(",")) if args.prompt_lens else None
    report = run_warmup(args.path, batch_size=args.batch_size, max_cache_len=args.max_cache_len, prompt_lens=lens,
                        cache_dir=args.cache_dir, mode=args.mode, dtype=getattr(torch, args.dtype),
                        device=args.device)  # fmt: skip
    print(json.dumps(report, indent=2))
    print(f"a later process compiles from {report['cache_dir']} after hetgraph.compile_cache_dir({report['cache_dir']!r})")
    return 0


def generate(args: argparse.Namespace) -> int:
    """Greedy (or sampled) generation from token ids; with --tp / --pp under torchrun, over several processes."""
    from hetgraph.distributed.run import generate_command

    return generate_command(args)


def lm_eval(args: argparse.Namespace) -> int:
    """lm-eval's command line with the "hetgraph" model type registered (needs `pip install 'hetgraph[lm-eval]'`)."""
    from hetgraph.lm_eval import main as lm_eval_main

    return lm_eval_main(args.lm_eval_args)


def bench(args: argparse.Namespace) -> int:
    """Benchmarks: eager vs Inductor vs hetgraph on heterogeneity presets (`bench --help` for options)."""
    from hetgraph.bench import main as bench_main

    return bench_main(args.bench_args)


# The model's parameter dtype and device, for the commands that build and run one.
DTYPE_DEVICE = (
    _arg("--dtype", default="float32", help="parameter dtype (default float32)"),
    _arg("--device", default="cpu", help="device (default cpu)"),
)

COMMANDS: tuple[Command, ...] = (
    Command(
        "inspect",
        inspect,
        (
            _arg("path", help="checkpoint directory or config.json"),
            _arg("--json", action="store_true", help="print the report as JSON"),
            _arg("--no-check-weights", action="store_true",
                 help="do not read the stored tensors (by default each is read once and NaN/Inf are reported)"),
        ),
    ),
    Command("passes", passes),
    Command(
        "demo",
        demo,
        (
            _arg("--prompt-len", type=int, default=64, help="prompt tokens (default 64)"),
            _arg("--new-tokens", type=int, default=32, help="greedy tokens decoded (default 32)"),
            _arg("--repeats", type=int, default=5, help="timed repeats per engine (default 5)"),
        ),
    ),
    Command(
        "convert",
        convert,
        (
            _arg("src", help="checkpoint directory (config.json + safetensors) in any layout hetgraph reads"),
            _arg("dst", help="new directory for the converted checkpoint (must not exist or be empty)"),
            _arg("--to", default="per-layer", choices=("per-layer", "nemotron-nas"),
                 help="layout to write: per-layer (transformers' per_layer_config, default) or nemotron-nas "
                      "(DeciLM block_configs, read by vLLM, SGLang, TensorRT-LLM, llama.cpp; Llama models only)"),
            _arg("--infer-shapes", action="store_true",
                 help="derive the per-layer config from the tensor shapes where they contradict config.json "
                      "(a pruned model saved under its parent's config: LLM-Pruner, FLAP)"),
            _arg("--max-shard-size", default="2GB", help="largest shard, e.g. 2GB, 500MB, 64MiB (default 2GB)"),
            _arg("--quiet", action="store_true", help="no progress bar"),
        ),
    ),
    Command(
        "cut",
        cut,
        (
            _arg("src", help="parent checkpoint directory (config.json + safetensors) in any layout hetgraph reads"),
            _arg("dst", help="new directory for the cut model (per_layer_config layout; must not exist or be empty)"),
            _arg("--plan", required=True,
                 help='JSON file: layer -> per-layer entries, e.g. {"3": {"skip": ["attention"]}, '
                      '"5": {"intermediate_size": 256}} (or a config with "per_layer_config")'),
            _arg("--prune", default="first", choices=("first", "magnitude"),
                 help="which channels / heads a narrower block keeps: the first ones (default) or the largest "
                      "by L2 norm of their weights"),
        ),
    ),
    Command(
        "export",
        export,
        (
            _arg("src", help="checkpoint directory (config.json + safetensors)"),
            _arg("--out", required=True,
                 help="directory for prefill.pt2 (and decode.pt2, *.aoti.pt2), or a FILE.pt2 for the prefill program alone"),
            _arg("--decode", action="store_true", help="also a decode step with the KV cache as explicit state"),
            _arg("--package", action="store_true", help="also compile each program into an AOTInductor package"),
            _arg("--batch-size", type=int, default=1, help="batch the programs serve (default 1)"),
            _arg("--max-cache-len", type=int, help="positions a full-attention layer holds (needed with --decode)"),
            _arg("--prompt-len", type=int, default=8, help="traced prompt length (default 8; any up to the maximum is served, exactly this one with mamba layers)"),
        ),
    ),
    Command(
        "profile",
        profile,
        (
            _arg("path", help="checkpoint directory or config.json (the model, or with --variants the parent)"),
            _arg("--out", required=True, help="directory for table.json, table.md and table.png"),
            _arg("--variants", help="JSON list of per-layer overrides to time against the parent (profile_variants)"),
            _arg("--prompt-len", type=int, default=512, help="prefill tokens (default 512)"),
            _arg("--context-len", type=int, default=1024, help="history of a decode step (default 1024)"),
            _arg("--batch-size", type=int, default=1, help="batch (default 1)"),
            _arg("--repeats", type=int, default=5, help="timed repeats per model and phase (default 5)"),
            _arg("--backend", default="hetgraph", help="torch.compile backend, or none for eager (default hetgraph)"),
            *DTYPE_DEVICE,
        ),
    ),
    Command(
        "warmup",
        warmup,
        (
            _arg("path", help="checkpoint directory (config.json + safetensors)"),
            _arg("--cache-dir", required=True,
                 help="directory for the compiled graphs (later: hetgraph.compile_cache_dir(DIR))"),
            _arg("--max-cache-len", type=int, required=True, help="make_cache's max_cache_len the server uses"),
            _arg("--batch-size", type=int, default=1, help="make_cache's batch_size the server uses (default 1)"),
            _arg("--prompt-lens",
                 help="comma-separated prompt lengths to run (default: a quarter and a half of max-cache-len)"),
            _arg("--mode", help="torch.compile mode the server uses (default: none)"),
            *DTYPE_DEVICE,
        ),
    ),
    Command(
        "generate",
        generate,
        (
            _arg("path", help="checkpoint directory (config.json + safetensors)"),
            _arg("--prompt-ids", required=True, help="comma-separated token ids of the prompt, e.g. 1,2,3"),
            _arg("--max-new-tokens", type=int, default=16, help="tokens to generate (default 16)"),
            _arg("--tp", type=int, help="tensor parallel over this many processes (run under torchrun)"),
            _arg("--pp", type=int, help="pipeline stages, one per process (run under torchrun)"),
            _arg("--no-replicate", action="store_true",
                 help="--tp: refuse a layer whose attention does not split over the ranks instead of replicating it"),
            _arg("--device-map", help="one process: place the layers over devices (auto, or a device), as "
                                      "from_pretrained(device_map=...)"),
            _arg("--split", default="balanced",
                 help="--pp layer split: balanced (by parameter bytes), even, or counts per stage like 4,4,2"),
            _arg("--compile", action="store_true", help='torch.compile the forward with backend="hetgraph"'),
            _arg("--sample", action="store_true", help="sample (softmax at --temperature) instead of greedy"),
            _arg("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)"),
            _arg("--seed", type=int, default=0, help="sampling seed (default 0)"),
            _arg("--json", action="store_true",
                 help="print one JSON line: tokens (prompt included), ms_per_token (generate's wall time per new "
                      "token), and with --pp the stages' [start, stop) layer ranges"),
            *DTYPE_DEVICE,
        ),
    ),
    Command("bench", bench, (_arg("bench_args", nargs=argparse.REMAINDER, help="options of benchmarks/run.py"),)),
    Command("lm-eval", lm_eval, (_arg("lm_eval_args", nargs=argparse.REMAINDER, help="lm_eval's options"),)),
    Command(
        "show-graph",
        show_graph,
        (
            _arg("src", help="checkpoint directory (config.json + safetensors)"),
            _arg("--prompt-len", type=int, default=8, help="example prompt length to trace with (default 8)"),
        ),
    ),
)


def build_parser() -> argparse.ArgumentParser:
    prog = "python -m hetgraph" if os.path.basename(sys.argv[0]) == "__main__.py" else "hetgraph"
    parser = argparse.ArgumentParser(prog=prog, description="Heterogeneous transformer models on stock classes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        summary = (command.run.__doc__ or "").strip().splitlines()[0] if command.run.__doc__ else None
        p = sub.add_parser(command.name, help=summary, description=summary)
        for names, kwargs in command.arguments:
            p.add_argument(*names, **kwargs)
        p.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its options (and --help) belong to benchmarks/run.py
        from hetgraph.bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["lm-eval"]:  # its options (and --help) belong to lm_eval
        return lm_eval(argparse.Namespace(lm_eval_args=argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except HeteroConfigError as e:
        # A bad input is the user's to fix: say what, without a traceback.
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
