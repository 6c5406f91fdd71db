"""`python -m hetgraph generate`: one process, or several under `torchrun` with `--tp N` or `--pp N`."""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist


def generate_command(args) -> int:
    from hetgraph.build import from_pretrained
    from hetgraph.cache import make_cache

    ids = torch.tensor([[int(t) for t in args.prompt_ids.split(",")]])
    dtype, device = getattr(torch, args.dtype), args.device
    if args.tp and args.pp:
        raise SystemExit("error: --tp and --pp together are not supported yet; choose one")
    if args.device_map and (args.tp or args.pp):
        raise SystemExit("error: --device-map places one process's layers; it does not go with --tp / --pp")
    parts = args.tp or args.pp
    rank = _rank(parts) if parts else 0  # the process group starts once the request is known to be good
    generator = torch.Generator(device=device).manual_seed(args.seed)
    stages = None
    if args.pp:
        from hetgraph.distributed.pipeline import generate, pipeline_stage

        split = args.split if args.split in ("balanced", "even") else [int(c) for c in args.split.split(",")]
        stage = pipeline_stage(args.path, rank, args.pp, split=split, dtype=dtype, device=device)
        _init(device)
        gathered = [None] * args.pp
        dist.all_gather_object(gathered, [stage.layers.start, stage.layers.stop])
        stages = gathered
        start = time.perf_counter()
        if args.compile:
            stage.base.forward = torch.compile(stage.base.forward, backend="hetgraph")
        tokens, _ = generate(stage, ids, args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                             generator=generator)  # fmt: skip
    else:
        placed = dict(device_map=args.device_map) if args.device_map else dict(device=device)
        model = from_pretrained(args.path, dtype=dtype, **placed)
        if args.tp:
            from torch.distributed.device_mesh import init_device_mesh

            from hetgraph.distributed.tensor import tensor_parallel, tp_plan

            tp_plan(model, args.tp, replicate=not args.no_replicate)  # refusals before any process group work
            _init(device)
            tensor_parallel(model, init_device_mesh(torch.device(device).type, (args.tp,)),
                            replicate=not args.no_replicate)  # fmt: skip
        cache = make_cache(model, batch_size=1, max_cache_len=ids.shape[1] + args.max_new_tokens)
        start = time.perf_counter()
        if args.compile:
            model.forward = torch.compile(model.forward, backend="hetgraph", fullgraph=True)
        sampling = dict(do_sample=True, temperature=args.temperature) if args.sample else dict(do_sample=False)
        if args.sample:
            torch.manual_seed(args.seed)  # every TP rank draws the same token
        with torch.no_grad():
            tokens = model.generate(ids.to(model.device), cache=cache, max_new_tokens=args.max_new_tokens,
                                    pad_token_id=0, eos_token_id=None, **sampling)  # fmt: skip
    ms_per_token = (time.perf_counter() - start) * 1e3 / args.max_new_tokens  # compile included with --compile
    if rank == 0:
        out = tokens[0].tolist()
        report = {"tokens": out, "ms_per_token": round(ms_per_token, 3)}
        if stages is not None:
            report["stages"] = stages  # [start, stop) layer range of each stage
        print(json.dumps(report) if args.json else " ".join(map(str, out)))
    if parts:
        dist.destroy_process_group()
    return 0


def _rank(parts: int) -> int:
    """This process's rank from torchrun's environment, checked against the parts asked for."""
    if "RANK" not in os.environ:
        raise SystemExit(f"error: --tp/--pp {parts} runs one process per part: start it with "
                         f"`torchrun --nproc-per-node {parts} -m hetgraph generate ...`")  # fmt: skip
    if int(os.environ.get("WORLD_SIZE", "1")) != parts:
        raise SystemExit(f"error: {parts} parts but torchrun started {os.environ.get('WORLD_SIZE')} processes")
    return int(os.environ["RANK"])


def _init(device: str) -> None:
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
