"""`hetgraph.explain(model, *args, **kwargs)`: compile, run once, and say what each pass did per layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetgraph.backend import GraphReport, HetgraphBackend


@dataclass
class Explanation:
    graphs: list[GraphReport]

    def to_text(self) -> str:
        out = []
        for g, graph in enumerate(self.graphs):
            if graph.spec is None:
                out.append(f"graph {g}: model not built by hetgraph: no pass ran, compiled as with Inductor")
                continue
            out.append(f"graph {g}: hetgraph model")
            if graph.fallback:
                out.append(f"  compiled unchanged: {graph.fallback}")
                continue
            out.extend(_table(graph))
            for record in graph.records:
                for layer, reason in sorted(record.refused.items(), key=lambda kv: (kv[0] is not None, kv[0] or 0)):
                    where = "graph" if layer is None else f"layer {layer}"
                    out.append(f"  refused by {record.name} ({where}): {reason}")
                summary = f": {record.report[None]}" if None in record.report else ""
                out.append(f"  {record.name} ({record.seconds * 1e3:.1f} ms){summary}")
        return "\n".join(out)

    __str__ = to_text


def _table(graph: GraphReport) -> list[str]:
    records = graph.records
    layers = sorted({k for r in records for k in r.ops_before if k is not None})
    header = ["layer", "spec", "ops traced"] + [f"after {r.name}" for r in records[1:]] + ["notes"]
    rows = []
    for layer in [None, *layers]:
        spec = graph.spec[layer].describe() if graph.spec and layer is not None and layer < len(graph.spec) else ""
        counts = [str(records[0].ops_after.get(layer, 0))] + [str(r.ops_after.get(layer, 0)) for r in records[1:]]
        notes = "; ".join(f"{r.report[layer]}" for r in records[1:] if layer in r.report)
        rows.append(["glue" if layer is None else str(layer), spec, *counts, notes])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  " + "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), *(fmt.format(*r) for r in rows)]


def explain(
    model: torch.nn.Module, *args, mode: str | None = None, options=None, grad: bool = False, **kwargs
) -> Explanation:
    """Compile `model` with the hetgraph backend, run it once on the given inputs, return the report.

    `grad=True` runs with gradients enabled, as a training step does (some passes then refuse).
    """
    backend = HetgraphBackend(mode, options)
    compiled = torch.compile(model, backend=backend)
    with torch.set_grad_enabled(grad):
        compiled(*args, **kwargs)
    return Explanation(backend.reports)
