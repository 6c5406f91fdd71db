"""Shape specialization: every per-layer shape constant checked against that layer's spec.

Dynamo bakes Python ints into the graph. In each attention block the head split
`view(B, T, -1, head_dim)` and the `scale` of the attention op must be the layer's own; in each
projection the weight must have the layer's own shape. A constant that carries another value (a
global one baked in by code that read the global config) is rewritten to the spec's value, and
the whole graph is re-propagated with fake tensors: the rewrite is kept only if every node still
gets a consistent shape and the graph's outputs keep theirs. Otherwise it is undone and reported.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from hetgraph.passes._graph import LINEAR, SDPA, is_op, is_view, tag, value
from hetgraph.passes._types import DYNAMO, EXPORT, PassContext, PassResult, applies_to
from hetgraph.spec import FULL


def _view_shape(node: fx.Node) -> tuple | None:
    shape = node.args[1:] if node.op == "call_method" else node.args[1:2]
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return tuple(shape) if shape else None


def _is_head_split(node: fx.Node) -> bool:
    """`proj(x).view(B, T, -1, head_dim)`: a view of a projection's output (not e.g. GptOss's sinks reshape)."""
    return is_view(node) and isinstance(node.args[0], fx.Node) and is_op(node.args[0], LINEAR)


def _set_view_shape(node: fx.Node, shape: tuple) -> None:
    if node.op == "call_method" and not isinstance(node.args[1], (tuple, list)):
        node.args = (node.args[0], *shape)
    else:
        node.args = (node.args[0], tuple(shape), *node.args[2:])


def _outputs_shapes(gm: fx.GraphModule) -> list:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    flat = torch.utils._pytree.tree_leaves(out.args)
    return [tuple(v.shape) if (v := value(a)) is not None else None for a in flat if isinstance(a, fx.Node)]


def _repropagate(gm: fx.GraphModule) -> str | None:
    """Fake-tensor propagation of the whole graph; returns an error message or None."""
    inputs = [value(n) for n in gm.graph.nodes if n.op == "placeholder"]
    fake_mode = detect_fake_mode(inputs)
    if fake_mode is None or any(v is None for v in inputs):
        return "no fake example values to re-propagate with"
    before = _outputs_shapes(gm)
    try:
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        gm.recompile()
        FakeTensorProp(gm, fake_mode).propagate_dont_convert_inputs(*inputs)
    except Exception as e:  # any failure means the rewrite is not proven
        return f"{type(e).__name__}: {e}"
    for n in gm.graph.nodes:
        if "val" in n.meta and "example_value" in n.meta:
            n.meta["example_value"] = n.meta["val"]
    after = _outputs_shapes(gm)
    return None if after == before else f"output shapes changed from {before} to {after}"


@applies_to(DYNAMO, EXPORT)
def specialize_shapes(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    report, refused = {}, {}
    checked: dict[int, int] = {}
    rewrites: list[tuple[fx.Node, str, object, object]] = []  # node, what, old, new
    projections = ctx.spec.adapter.projections  # module name -> (dim, LayerSpec size attribute)

    for node in gm.graph.nodes:
        t = tag(node)
        if t is None or t.layer is None or t.layer >= len(ctx.spec):
            continue
        s = ctx.spec[t.layer]
        if t.block == "attention" and s.attention == FULL:
            if _is_head_split(node) and (shape := _view_shape(node)) and len(shape) == 4 and isinstance(shape[-1], int):
                checked[t.layer] = checked.get(t.layer, 0) + 1
                if shape[-1] != s.head_dim:
                    rewrites.append((node, "head_dim", shape, (*shape[:-1], s.head_dim)))
            # A scale dynamo made a graph input (`dynamic=True` traces float attributes as symbols)
            # is the module's own value at run time: nothing baked in to check.
            if is_op(node, SDPA) and isinstance(node.kwargs.get("scale"), (int, float)):
                checked[t.layer] = checked.get(t.layer, 0) + 1
                want = s.head_dim**-0.5
                if not math.isclose(node.kwargs["scale"], want, rel_tol=1e-6):
                    rewrites.append((node, "scale", node.kwargs["scale"], want))
        if is_op(node, LINEAR) and t.module_name in projections:
            dim, attr = projections[t.module_name]
            weight, size = value(node.args[1]), getattr(s, attr)
            block_kind = getattr(s, t.block) if t.block else None
            if weight is not None and block_kind == FULL and size is not None:
                checked[t.layer] = checked.get(t.layer, 0) + 1
                if weight.shape[dim] != size:
                    problem = f"{t.module_name} weight has {weight.shape[dim]} on dim {dim}, spec says {size}"
                    refused[t.layer] = "; ".join(filter(None, (refused.get(t.layer), problem)))

    for layer in refused:
        refused[layer] += ": weights cannot be rewritten, layer left unchanged"
    changed = False
    for node, what, old, new in rewrites:
        layer = tag(node).layer
        if layer in refused:
            continue
        saved = (node.args, node.kwargs)
        if what == "head_dim":
            _set_view_shape(node, new)
        else:
            node.kwargs = {**node.kwargs, "scale": new}
        problem = _repropagate(gm)
        if problem is None:
            changed = True
            report[layer] = f"{what}: {old} -> {new}"
        else:
            node.args, node.kwargs = saved
            refused[layer] = f"{what} {old} -> {new} not proven: {problem}; left unchanged"
    if changed:
        gm.graph.lint()
        gm.recompile()
    for layer, n in checked.items():
        report.setdefault(layer, f"{n} shape constants consistent with spec")
    return PassResult(gm, changed=changed, report=report, refused=refused)
