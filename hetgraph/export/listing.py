"""Per-layer listings of a specialized program (`python -m hetgraph show-graph`)."""

from __future__ import annotations

from collections import Counter

import torch

from hetgraph.passes._graph import compute_nodes, tag

# Dtype and device assertions export inserts: checks, not compute; left out of listings.
_BOOKKEEPING = {torch.ops.aten._assert_tensor_metadata.default}


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    return getattr(target, "__name__", str(target))


def layer_ops(ep: torch.export.ExportedProgram) -> dict[tuple[int | None, str | None], Counter]:
    """(layer, block) -> op name -> count, from the tags `specialize` left on the program's nodes."""
    table: dict = {}
    for node in compute_nodes(ep.graph_module):
        if node.target in _BOOKKEEPING:
            continue
        t = tag(node)
        key = (t.layer, t.block) if t is not None else (None, None)
        table.setdefault(key, Counter())[_op_name(node)] += 1
    return table


def describe_graph(ep: torch.export.ExportedProgram, spec, records=()) -> str:
    """A per-layer listing of a specialized program: each layer's spec line, the attention form
    `specialize_attention` gave it (from the pass `records`, if given) and its ops by count."""
    table = layer_ops(ep)
    forms = {}
    for record in records:
        if record.name == "specialize_attention":
            forms = {**{k: f"kept: {v}" for k, v in record.refused.items()}, **record.report}

    def ops(counts: Counter) -> str:
        return ", ".join(f"{name} x{n}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    total = sum(sum(c.values()) for c in table.values())
    attention = sum(c[name] for c in table.values() for name in c if "attention" in name)
    lines = [f"{total} ops, {attention} SDPA op(s) for {len(spec.attention_layers)} attention layer(s)"]
    for i, s in enumerate(spec):
        lines.append(f"layer {i}: {s.describe()}")
        if i in forms:
            lines.append(f"    form: {forms[i]}")
        parts = sorted(((block, c) for (layer, block), c in table.items() if layer == i), key=lambda p: p[0] or "~")
        if not parts:
            lines.append("    (no ops)")
        for block, counts in parts:
            lines.append(f"    {block or 'residual'} ({sum(counts.values())}): {ops(counts)}")
    glue = Counter()
    for (layer, _), counts in table.items():
        if layer is None:
            glue.update(counts)
    lines.append(f"outside layers ({sum(glue.values())}): {ops(glue)}")
    return "\n".join(lines)
