"""Attribute every node to (layer, block) from the `nn_module_stack` dynamo or torch.export records.

A node inside `model.layers[i].self_attn` belongs to layer i, block "attention"; a node in the
layer's own frame (the residual adds) belongs to layer i, block None. The layer index comes from
the module path, or, when a single layer was compiled on its own, from the layer tag hetgraph puts
on that layer's parameters. Layers and blocks found are checked against the LayerSpec table.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch.fx as fx

from hetgraph.passes._graph import TAG, NodeTag, compute_nodes, layer_index_from_path
from hetgraph.passes._types import DYNAMO, EXPORT, PassContext, PassResult, applies_to


def _block_attrs(ctx: PassContext) -> dict[str, str]:
    """Decoder-layer attribute name -> block name, e.g. "input_layernorm" -> "attention"."""
    adapter = ctx.spec.adapter
    mapping = {}
    for block in adapter.blocks:
        mapping[block.module] = block.name
        mapping[block.norm] = block.name
    return mapping


def _tag_for(node: fx.Node, block_attrs: dict[str, str]) -> NodeTag:
    stack = node.meta.get("nn_module_stack") or {}
    entries = list(stack.values())
    layer, block, depth = None, None, None
    for d, (path, _) in enumerate(entries):
        i = layer_index_from_path(path)
        if i is not None and depth is None:
            layer, depth = i, d  # the outermost entry naming a layer is the decoder layer itself
    # The block is the first module below the layer whose attribute name is a known block part.
    start = 0 if depth is None else depth + 1
    for path, _ in entries[start:]:
        attr = _attr_name(path)
        if attr in block_attrs:
            block = block_attrs[attr]
            break
    module_type = entries[-1][1] if entries else None
    # dynamo records the class, torch.export its qualified name as a string.
    module_type = getattr(module_type, "__name__", module_type)
    if isinstance(module_type, str):
        module_type = module_type.rsplit(".", 1)[-1]
    module_name = _attr_name(entries[-1][0]) if entries else None
    return NodeTag(layer=layer, block=block, module_type=module_type, module_name=module_name)


def _attr_name(path: str) -> str:
    """The last attribute of a module path like "L['self'].model.layers[3].self_attn"."""
    return path.replace("]", "").replace("[", ".").split(".")[-1].strip("'\"")


def _single_layer(gm: fx.GraphModule, ctx: PassContext) -> int | None:
    """When one decoder layer is compiled alone, its parameters say which layer it is."""
    layers = {ctx.input_layers[n.name] for n in gm.graph.nodes if n.op == "placeholder" and n.name in ctx.input_layers}
    return layers.pop() if len(layers) == 1 else None


@applies_to(DYNAMO, EXPORT)
def attribute_nodes(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    block_attrs = _block_attrs(ctx)
    tags = {node: _tag_for(node, block_attrs) for node in compute_nodes(gm)}
    # No module path names a layer: one decoder layer compiled alone. (A whole model's graph, even
    # of a single layer, keeps its embedding, rotary table and head outside the layers.)
    default_layer = None if any(t.layer is not None for t in tags.values()) else _single_layer(gm, ctx)
    counts: Counter = Counter()
    for node, t in tags.items():
        if default_layer is not None:
            t = dataclasses.replace(t, layer=default_layer)
        node.meta[TAG] = t
        counts[(t.layer, t.block)] += 1

    report, refused = {}, {}
    for layer in sorted({k[0] for k in counts if k[0] is not None}):
        parts = [f"{block or 'glue'}={counts[(layer, block)]}" for (l, block) in counts if l == layer]
        report[layer] = "ops " + " ".join(sorted(parts))
        if layer >= len(ctx.spec):
            refused[layer] = f"layer {layer} is not in the LayerSpec table ({len(ctx.spec)} layers)"
    report[None] = f"ops outside layers={counts[(None, None)]}"
    # Tags live in node.meta only: the graph's code is unchanged.
    return PassResult(gm, changed=False, report=report, refused=refused)
