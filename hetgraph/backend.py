"""The `hetgraph` torch.compile backend: dynamo's FX graph -> hetgraph passes -> TorchInductor.

    torch.compile(model, backend="hetgraph")                       # after `import hetgraph`, or via
    torch.compile(model, backend="hetgraph", mode="max-autotune")  # the entry point, without it
    torch.compile(model, backend="hetgraph", options={"passes": ["attribute_nodes"]})

The passes get the model's LayerSpec table from the graph's inputs (`hetgraph.contract`). A model
hetgraph did not build compiles as with Inductor (no pass runs). A pass that fails leaves the
graph as dynamo produced it, with a warning naming the pass (or raises, with
`options={"strict": True}`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.fx as fx

from hetgraph.contract import context_from_inputs
from hetgraph.errors import PassError
from hetgraph.passes import DYNAMO, PASSES, PassRecord, run_passes
from hetgraph.regions import INLINES_REGIONS, inline_regions
from hetgraph.spec import ModelSpec

logger = logging.getLogger(__name__)

BACKEND_NAME = "hetgraph"
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class BackendOptions:
    """hetgraph's own options, passed as `torch.compile(..., options={...})`."""

    passes: tuple[str, ...] = tuple(p.__name__ for p in PASSES)  # which passes run (always in PASSES order)
    inductor: Mapping[str, Any] = field(default_factory=dict)  # extra Inductor config, applied in a scope
    strict: bool = False  # raise instead of compiling the unchanged graph when a pass fails

    def __post_init__(self):
        known = [p.__name__ for p in PASSES]
        unknown = [p for p in self.passes if p not in known]
        if unknown:
            raise ValueError(f"hetgraph backend: unknown pass(es) {unknown}; known passes: {known}")
        from torch._inductor import config as inductor_config

        bad = [k for k in self.inductor if not hasattr(inductor_config, k.split(".")[0])]
        if bad:
            raise ValueError(f"hetgraph backend: {bad} are not Inductor config options (torch._inductor.config)")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "BackendOptions":
        options = dict(options or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"hetgraph backend: unknown option(s) {unknown}; known options: {known}")
        if "passes" in options:
            options["passes"] = tuple(options["passes"])
        return cls(**options)


# Inductor's per-call size and alignment asserts re-check, on every call, what dynamo's guards
# already checked (sizes and strides of every graph input, weights included: a restrided weight
# recompiles, tests/test_backend.py); inside a shared layer variant they run again on each layer's
# call: drop-attn decode 1.03x Inductor's with them, 1.01x without (benchmarks/variant_sharing_cost.py).
DEFAULT_INDUCTOR: dict[str, Any] = {"size_asserts": False, "alignment_asserts": False}


def inductor_patches(mode: str | None, options: BackendOptions) -> dict[str, Any]:
    """Inductor config for one compile: hetgraph's defaults, then the mode's options, then the user's."""
    mode = mode or "default"
    if mode not in MODES:
        raise ValueError(f"hetgraph backend: unknown mode {mode!r}; allowed: {list(MODES)}")
    patches = dict(DEFAULT_INDUCTOR)
    if mode != "default":
        patches.update(torch._inductor.list_mode_options(mode))
    patches.update(options.inductor)
    return patches


@dataclass
class GraphReport:
    """What the passes did to one graph dynamo handed the backend."""

    spec: ModelSpec | None
    records: list[PassRecord]
    gm: fx.GraphModule | None = None  # the graph handed to Inductor
    fallback: str | None = None  # why the unchanged graph was compiled, if it was


class HetgraphBackend:
    """The backend as a callable; keeps the reports of every graph it compiled (see `explain`)."""

    hetgraph_inlines_regions = True  # `hetgraph.regions`: dynamo may trace each layer variant once

    def __init__(self, mode: str | None = None, options: Mapping[str, Any] | None = None):
        self.options = BackendOptions.from_options(options)
        self.patches = inductor_patches(mode, self.options)
        self.reports: list[GraphReport] = []

    def __call__(self, gm: fx.GraphModule, example_inputs):
        with _no_disk_caches_if_sharded(gm, example_inputs) as patches:
            return self._compile(gm, example_inputs, {**self.patches, **patches})

    def _compile(self, gm: fx.GraphModule, example_inputs, patches: dict[str, Any]):
        from torch._inductor.compile_fx import compile_fx

        work = self.specialize(gm, example_inputs)
        report = self.reports[-1]
        if work is not gm:
            try:
                return compile_fx(work, example_inputs, config_patches=patches)
            except Exception as e:
                # Inductor refusing the specialized graph is a hetgraph bug; the unchanged graph
                # still computes the right thing.
                if self.options.strict:
                    raise
                reason = f"Inductor: {type(e).__name__}: {_first_line(e)}"
                logger.warning("hetgraph: %s on the specialized graph; compiling the graph unchanged", reason)
                report.fallback, report.gm = reason, gm
        return compile_fx(gm, example_inputs, config_patches=patches)

    def specialize(self, gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
        """The graph hetgraph hands Inductor: a specialized copy of `gm`, or `gm` itself when a pass
        failed (its report, appended to `reports`, says why). The layer regions dynamo traced once
        (`hetgraph.regions`) are inlined into `gm` first, in place."""
        inline_regions(gm)
        ctx = context_from_inputs(gm, example_inputs)
        work = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        try:
            work, records = run_passes(work, ctx, graph=DYNAMO, names=self.options.passes)
            report = GraphReport(ctx.spec, records, work)
        except PassError as e:
            if self.options.strict:
                raise
            reason = str(e)
            logger.warning("hetgraph: %s; compiling the graph unchanged", reason)
            work, report = gm, GraphReport(ctx.spec, [], gm, fallback=reason)
        self.reports.append(report)
        for record in report.records:
            for layer, reason in record.refused.items():
                logger.info("hetgraph %s: layer %s: %s", record.name, layer, reason)
        return work


@contextlib.contextmanager
def _no_disk_caches_if_sharded(gm: fx.GraphModule, example_inputs):
    """Inductor's and AOTAutograd's disk caches off for a graph of a tensor-parallel model.

    Their keys hold a DTensor's global shape, not this rank's slice of it, so ranks sharing a cache
    directory are served each other's graphs: with an MLP width that does not divide, rank 0 ran
    rank 1's graph (49 vs 48 rows; NaN logits with size asserts off, an assertion with them on; torch
    2.13). Yields the Inductor config patches to add.
    """
    if not torch.distributed.is_available():
        yield {}
        return
    from torch.distributed.tensor import DTensor

    sharded = any(isinstance(x, DTensor) for x in example_inputs) or any(
        n.op == "call_function" and "c10d" in str(getattr(n.target, "__module__", "")) + str(n.target)
        for n in gm.graph.nodes
    )
    if not sharded:
        yield {}
        return
    with torch._functorch.config.patch(enable_autograd_cache=False):
        yield {"fx_graph_cache": False}


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


def hetgraph_backend(gm: fx.GraphModule, example_inputs, mode: str | None = None, options=None):
    """The registered backend function (`backend="hetgraph"`)."""
    return HetgraphBackend(mode, options)(gm, example_inputs)


setattr(hetgraph_backend, INLINES_REGIONS, True)


def register() -> None:
    """Register `backend="hetgraph"` with dynamo, unless its entry point already provides it."""
    from torch._dynamo.backends.registry import list_backends, register_backend

    # With the package installed, dynamo finds the entry point and registers it on first lookup;
    # registering here too would make that lookup fail with "duplicate name".
    if BACKEND_NAME not in list_backends(exclude_tags=()):
        register_backend(compiler_fn=hetgraph_backend, name=BACKEND_NAME)

