"""Timing models and their layers on the real path: `ModelTimer` compiles models from configs as a
torch.compile backend does, with `make_cache`, and times their prefill and decode calls
interleaved; `LayerClock` also times each decoder layer's call inside those calls.

A compiled model's layers are timed by a backend that cuts the graph at the layers' boundaries
(`split_by_layer`) after the whole graph was specialized, and compiles each piece as the chosen
backend would; eager models by forward hooks. Tried and dropped: evicting the last-level cache
before each layer's call, to mimic a model too deep for the cache (drop-attn decode predicted +21%
with it, -3% without, one process, interleaved).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.fx as fx
from torch._dynamo.backends.registry import lookup_backend
from torch.fx.passes.split_module import split_module
from tqdm.auto import tqdm

from hetgraph.backend import HetgraphBackend
from hetgraph.build import from_config
from hetgraph.cache import make_cache
from hetgraph.contract import context_from_inputs, model_spec
from hetgraph.errors import HeteroConfigError
from hetgraph.passes import DYNAMO, run_passes
from hetgraph.passes._graph import layer_of
from hetgraph.regions import INLINES_REGIONS, inline_regions

PHASES = ("prefill_ms", "decode_ms")


class ModelTimer:
    """Compiles configs' models as `backend` does (`"none"`: eager), with `make_cache`, and times
    their prefill and decode interleaved (model after model, repeat after repeat)."""

    def __init__(self, shapes, backend, repeats, dtype, device, progress=False):
        self.shapes, self.backend, self.repeats, self.dtype, self.device = shapes, backend, repeats, dtype, device
        self.progress = progress

    def time(self, *configs: dict) -> list[dict[str, float]]:
        """Median prefill_ms and decode_ms of each config's model, in order."""
        with torch.no_grad():
            runs = [self._compiled(config, self.backend) for config in configs]
            times = self._time(runs)
        torch._dynamo.reset()
        return [{p: statistics.median(v) for p, v in t.items()} for t in times]

    def time_layers(self, config: dict, *others: dict):
        """Median prefill_ms and decode_ms of config's model, and of each of its layers' calls
        within those (one list per phase, a time per layer), measured in the same calls; and the
        medians of `others`' models, timed interleaved with it (whole calls)."""
        clock = LayerClock(self.device)
        with torch.no_grad():
            runs = [self._compiled(config, self.backend, clock)] + [self._compiled(c, self.backend) for c in others]
            times = self._time(runs)
        torch._dynamo.reset()
        n = len(runs[0].spec)
        layers = {p: [statistics.median(c[i] if i < len(c) else 0.0 for c in clock.calls[p]) for i in range(n)]
                  for p in PHASES}  # fmt: skip
        medians = [{p: statistics.median(v) for p, v in t.items()} for t in times]
        return medians[0], layers, medians[1:]

    def _time(self, runs: list["_Run"]) -> list[dict[str, list[float]]]:
        times = [{p: [] for p in PHASES} for _ in runs]
        for phase in PHASES:
            for run in runs:
                run.start(phase)
            for _ in tqdm(range(self.repeats), desc=phase.removesuffix("_ms"), disable=not self.progress):
                for run, t in zip(runs, times):
                    t[phase].append(run.timed(phase, self.device))
        return times

    def _compiled(self, config: dict, backend: str, clock: "LayerClock | None" = None) -> "_Run":
        torch.manual_seed(0)
        model = from_config(config, dtype=self.dtype, device=self.device)
        b, prompt, context = self.shapes["batch_size"], self.shapes["prompt_len"], self.shapes["context_len"]
        cache = make_cache(model, batch_size=b, max_cache_len=max(prompt, context) + self.repeats + 2)
        spec = model_spec(model)
        if backend == "none":
            fwd = model.forward
            if clock is not None:
                clock.hook_layers(getattr(model, spec.adapter.base_model_attr).layers)
        else:
            # Static shapes: dynamo's automatic-dynamic state is kept per code object, which every model
            # of a family shares, so a model compiled after another of other shapes (the probe's decode
            # after its prefill) would get a graph of symbolic lengths; each model is timed as compiled
            # for the shapes timed.
            fwd = torch.compile(model.forward, backend=backend if clock is None else clock.backend(backend),
                                dynamic=False)
        vocab = config["vocab_size"]
        run = _Run(
            spec,
            fwd,
            model.forward,
            cache,
            torch.randint(0, vocab, (b, prompt), device=self.device),
            torch.randint(0, vocab, (b, context), device=self.device),
            clock,
        )
        run.start("prefill_ms")
        run.calls["prefill_ms"]()  # compiles the prefill graph
        run.start("decode_ms")
        run.calls["decode_ms"]()  # compiles the decode graph
        return run


class _Run:
    """One compiled model's timed calls: a prefill into an empty cache, a decode step after
    `context` tokens of history (filled by the eager model, so that no graph is compiled for it;
    each timed step extends it by one)."""

    def __init__(self, spec, fwd, eager, cache, prompt_ids, context_ids, clock=None):
        self.spec, self.fwd, self.eager, self.cache, self.clock = spec, fwd, eager, cache, clock
        self.prompt_ids, self.context_ids = prompt_ids, context_ids
        self.calls = {"prefill_ms": self.prefill, "decode_ms": self.decode}

    def start(self, phase: str) -> None:
        self.cache.reset()
        if phase == "decode_ms":
            self.eager(input_ids=self.context_ids, cache=self.cache)

    def timed(self, phase: str, device) -> float:
        if self.clock is None:
            return _ms(self.calls[phase], device)
        self.clock.begin(phase)
        try:
            return _ms(self.calls[phase], device)
        finally:
            self.clock.on = False

    def prefill(self) -> None:
        self.cache.reset()
        self.fwd(input_ids=self.prompt_ids, cache=self.cache)

    def decode(self) -> None:
        self.fwd(input_ids=self.context_ids[:, -1:], cache=self.cache)


class LayerClock:
    """Wall time of each decoder layer's call, per timed model call.

    Eager: forward hooks on the layers. Compiled: `backend(name)` is a torch.compile backend that
    specializes the graph as `name` does (hetgraph's passes for "hetgraph"), cuts it into pieces at
    the decoder layers' boundaries (`split_by_layer`) and compiles each piece as `name` would, so a
    layer's time is the time of its own compiled code; what lies outside the layers (embedding,
    masks, final norm, head, per-step overhead) is the model's time less the layers'.
    """

    def __init__(self, device):
        self.device, self.on = device, False
        self.calls: dict[str, list[list[float]]] = {p: [] for p in PHASES}
        self._current: list[float] = []

    def begin(self, phase: str) -> None:
        """Starts timing one call of `phase` (until `on` is set False)."""
        self.on, self._current = True, []
        self.calls[phase].append(self._current)

    def add(self, layer: int, ms: float) -> None:
        self._current.extend([0.0] * (layer + 1 - len(self._current)))
        self._current[layer] += ms

    def hook_layers(self, layers) -> None:
        for i, layer in enumerate(layers):
            starts: list[float] = []

            def pre(module, args, starts=starts):
                if self.on:
                    _sync(self.device)
                    starts.append(time.perf_counter())

            def post(module, args, out, i=i, starts=starts):
                if self.on and starts:
                    _sync(self.device)
                    self.add(i, (time.perf_counter() - starts.pop()) * 1e3)

            layer.register_forward_pre_hook(pre)
            layer.register_forward_hook(post)

    def backend(self, name: str):
        def compile_by_layer(gm: fx.GraphModule, example_inputs):
            if name == "hetgraph":
                from torch._inductor.compile_fx import compile_fx

                hetgraph = HetgraphBackend()
                specialized = hetgraph.specialize(gm, example_inputs)
                # A pass that failed leaves the graph untagged; the backend compiles it unchanged.
                gm = specialized if specialized is not gm else tag_layers(gm, example_inputs)

                def compile_piece(piece, args):
                    return compile_fx(piece, args, config_patches=hetgraph.patches)
            else:
                gm = tag_layers(gm, example_inputs)
                compile_piece = lookup_backend(name)
            return split_by_layer(gm, compile_piece, self)

        setattr(compile_by_layer, INLINES_REGIONS, True)  # both paths inline them (`specialize`, `tag_layers`)
        return compile_by_layer

    def timed_call(self, layer: int, fn, args):
        if not self.on:
            return fn(*args)
        _sync(self.device)
        start = time.perf_counter()
        out = fn(*args)
        _sync(self.device)
        self.add(layer, (time.perf_counter() - start) * 1e3)
        return out


def split_by_layer(gm: fx.GraphModule, compile_piece, clock: LayerClock) -> fx.GraphModule:
    """`gm` cut at its decoder layers' boundaries into pieces run one after another: the nodes
    before the first layer's, each layer's (with any untagged node between it and the next
    layer), the nodes after the last layer's. Each piece is compiled by `compile_piece(piece,
    args)` on its first call; `clock` times the layers' pieces."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    last = max((k for k, n in enumerate(nodes) if layer_of(n) is not None), default=-1)
    if last < 0:
        raise HeteroConfigError("profile: no node of the compiled graph belongs to a decoder layer")
    part, current = {}, 0
    for k, n in enumerate(nodes):
        layer = layer_of(n)
        current = _AFTER if k > last else current if layer is None else layer + 1
        part[n] = current
    try:
        split = split_module(gm, None, part.__getitem__, keep_original_order=True)
    except Exception as e:  # e.g. a layer's node placed among another layer's: no order of pieces
        raise HeteroConfigError(f"profile: the graph cannot be cut into one piece per layer ({e})") from e
    for name, piece in list(split.named_children()):
        p = int(name.removeprefix("submod_"))
        setattr(split, name, _Piece(piece, compile_piece, clock, None if p in (0, _AFTER) else p - 1))
    return split


_AFTER = 1 << 20  # the piece after the last layer


class _Piece(torch.nn.Module):
    """One piece of a graph cut by `split_by_layer`, compiled on its first call."""

    def __init__(self, gm: fx.GraphModule, compile_piece, clock: LayerClock, layer: int | None):
        super().__init__()
        self.gm, self.compile_piece, self.clock, self.layer = gm, compile_piece, clock, layer
        self.fn = None

    def forward(self, *args):
        if self.fn is None:
            self.fn = self.compile_piece(self.gm, list(args))
        if self.layer is None:
            return self.fn(*args)
        return self.clock.timed_call(self.layer, self.fn, args)


def tag_layers(gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
    """A copy of `gm` whose nodes carry their layer tags (hetgraph's `attribute_nodes` pass alone);
    `gm`'s layer regions are inlined first, in place."""
    inline_regions(gm)
    work = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    work, _ = run_passes(work, context_from_inputs(gm, example_inputs), graph=DYNAMO, names=["attribute_nodes"])
    return work


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _ms(call, device) -> float:
    _sync(device)
    start = time.perf_counter()
    call()
    _sync(device)
    return (time.perf_counter() - start) * 1e3
