"""Per-window mask selection: one mask computation per distinct window, each layer wired to its own.

hetgraph's model hook builds one mask per distinct window; the stock code may build more (a mask
per layer type, or the same mask twice). This pass finds the mask each attention op reads, merges
mask computations that are structurally identical (same ops on the same inputs), lets dead-code
elimination drop masks no layer reads, and checks against the LayerSpec table that layers sharing
a mask share a window and layers with different windows read different masks.
"""

from __future__ import annotations

from collections import defaultdict

import torch.fx as fx

from hetgraph.passes._graph import SDPA, finish, is_op, layer_of
from hetgraph.passes._types import DYNAMO, EXPORT, PassContext, PassResult, applies_to


def mask_input(node: fx.Node) -> fx.Node | None:
    mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
    return mask if isinstance(mask, fx.Node) else None


def _signature(node, memo: dict) -> object:
    """A hashable description of how a value is computed: equal signatures, equal values."""
    if not isinstance(node, fx.Node):
        if isinstance(node, (list, tuple)):
            return tuple(_signature(a, memo) for a in node)
        if isinstance(node, dict):
            return tuple(sorted((k, _signature(v, memo)) for k, v in node.items()))
        return ("const", repr(node))
    if node in memo:
        return memo[node]
    if node.op in ("placeholder", "get_attr"):
        sig = (node.op, node.target)
    else:
        sig = (node.op, str(node.target), _signature(node.args, memo), _signature(node.kwargs, memo))
    memo[node] = sig
    return sig


@applies_to(DYNAMO, EXPORT)
def select_window_masks(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    attention_ops = [n for n in gm.graph.nodes if is_op(n, SDPA) and layer_of(n) is not None]
    report, refused = {}, {}
    changed = False

    # Merge structurally identical mask computations built outside the layers.
    memo: dict = {}
    canonical: dict[object, fx.Node] = {}
    for op in attention_ops:
        mask = mask_input(op)
        if mask is None or layer_of(mask) is not None:
            continue
        first = canonical.setdefault(_signature(mask, memo), mask)
        if first is not mask:
            mask.replace_all_uses_with(first)
            changed = True
    if changed:
        finish(gm)

    # Which layers read which mask.
    readers: dict[fx.Node | None, list[int]] = defaultdict(list)
    for op in attention_ops:
        readers[mask_input(op)].append(layer_of(op))
    names = {mask: f"mask{k}" for k, mask in enumerate(m for m in readers if m is not None)}
    for mask, layers in readers.items():
        name = names.get(mask, "causal (no mask tensor)")
        for layer in layers:
            report[layer] = name
    report[None] = f"{len(names)} mask computation(s) for {len(attention_ops)} attention op(s)"

    for mask, layers in readers.items():
        windows = {ctx.spec[i].window for i in layers if i < len(ctx.spec)}
        if mask is not None and len(windows) > 1:
            refused[None] = f"layers {layers} read one mask but have windows {sorted(map(str, windows))}"
    expected = {ctx.spec[layer_of(op)].window for op in attention_ops if layer_of(op) < len(ctx.spec)}
    if len(names) > len(expected):
        refused[None] = (
            f"{len(names)} distinct masks for {len(expected)} distinct windows: some could not be proven "
            "identical and were kept"
        )
    return PassResult(gm, changed=changed, report=report, refused=refused)
