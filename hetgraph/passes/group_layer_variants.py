"""Group identical layer variants: layers that compute the same thing share one subgraph.

Each decoder layer's nodes are cut out into a subgraph (inputs: the values it reads from outside;
outputs: the values read outside it). Two layers are the same variant when their subgraphs have
the same code and their inputs the same shapes, strides and dtypes — compared, not assumed from the
spec. Every variant used by two or more layers becomes one shared module called through
`torch.ops.higher_order.invoke_subgraph`, which Inductor compiles once per identifier and calls for
each layer; a variant used once stays inline, where Inductor can fuse it with its neighbours.
A layer whose nodes are not a self-contained region of the graph is left inline and reported.

The regions are cut at the residual stream, not at the module boundary: a layer's closing residual
add opens the region of the layer that reads it, so that add and that layer's first norm stay in
one graph, where Inductor fuses them (`_carry_residual_adds`); the first layer opens with `x + 0`
to keep the same code as the later layers of its variant (`_open_first_layer`).

Not when the graph will be differentiated: Inductor (torch 2.13) plans the outer graph's buffers as
if a subgraph call's outputs were fresh, but the partitioned forward subgraph returns its inputs
(the layer's input activations) as values saved for backward, and the outer graph then reuses those
buffers in place; a subgraph's backward also inherits the outer graph's donated-buffer indices
(pytorch/pytorch#192840). The forward stays exact; the gradients do not (relative errors up to
9e4, tests/test_training.py). So with gradients needed every layer stays inline, and the pass says why.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx as fx

from hetgraph.passes._graph import ADD, TAG, NodeTag, compute_nodes, finish, layer_of, tag, value
from hetgraph.passes._types import DYNAMO, PassContext, PassResult, applies_to

INVOKE = torch.ops.higher_order.invoke_subgraph
PREFIX = "hetgraph_variant_"
GRAD_REFUSAL = (
    "gradients are needed: layers are not shared, since Inductor's buffer reuse around a shared "
    "subgraph corrupts the saved activations its backward reads (pytorch/pytorch#192840); "
    "each layer compiles inline and the backward is exact"
)


def _region(nodes: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]] | str:
    """(inputs, outputs) of a layer's nodes, or why they cannot be cut out as one call."""
    members = set(nodes)
    inputs: dict[fx.Node, None] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in members:
                inputs.setdefault(a)
    outputs = [n for n in nodes if any(u not in members for u in n.users)]
    order = {n: i for i, n in enumerate(nodes[0].graph.nodes)}
    last = order[nodes[-1]]
    for a in inputs:
        if order[a] > order[nodes[0]]:
            return f"input {a.name} is computed in the middle of the layer"
    for n in outputs:
        if not isinstance(value(n), torch.Tensor):
            return f"output {n.name} is not a tensor"
        early = [u.name for u in n.users if u not in members and order[u] < last]
        if early:
            return f"{early} read the layer's values before the layer ends"
    return list(inputs), outputs


def _carry_residual_adds(by_layer: dict[int, list[fx.Node]]) -> dict[int, list[fx.Node]]:
    """Cut the regions so that each layer's closing residual add opens the region that reads it.

    A layer ends with `residual + block output` and the next begins with a norm of that sum: inside
    one graph Inductor fuses the two into one kernel; across a subgraph call it cannot (one more
    kernel and one more pass over the hidden states per shared layer). So a layer's last node, when
    it is that add, goes to the front of the one later layer that reads it, or out of every region
    when only the glue after the layers reads it (the final norm, inline). Every later layer of one
    variant still has the same code; the first layer, which opens with no add, gets one in
    `_open_first_layer`.
    """
    owner = {n: layer for layer, nodes in by_layer.items() for n in nodes}
    cut = {layer: list(nodes) for layer, nodes in by_layer.items()}
    for layer in sorted(by_layer):
        tail = by_layer[layer][-1]
        t = tag(tail)
        if not (tail.op == "call_function" and tail.target in ADD and t.block is None and tail.users):
            continue
        readers = {owner.get(u) for u in tail.users}
        if len(readers) != 1:
            continue
        (reader,) = readers
        if reader == layer:
            continue
        cut[layer].remove(tail)
        if reader is not None:
            cut[reader].insert(0, tail)
    return {layer: nodes for layer, nodes in cut.items() if nodes}


def _open_first_layer(gm: fx.GraphModule, by_layer, cut, groups) -> None:
    """Give the first layer the opening the others carry, `x + 0`, when that makes it their variant.

    The first layer reads the embeddings, not a residual add, so its region alone opens without one;
    with `x + zeros_like(x)` in front (exact: adding zero changes no value; at most a -0.0 becomes
    0.0, which the norms, matmuls and sums after it do not tell apart) it has the code of the
    later layers of its variant and shares their subgraph. Tried, and undone if it matches none.
    """
    first = min(cut, default=None)
    if first is None or layer_of(by_layer[first][0]) != first:
        return  # no region, or the first one already opens with a carried add
    alone = _signature(cut[first][3], cut[first][1])
    if len(groups[alone]) > 1:
        return
    # A later region opens with an add carried from the layer before it (`_carry_residual_adds`).
    carried = [by_layer[k][0] for k in cut if k != first and layer_of(by_layer[k][0]) != k]
    nodes = by_layer[first]
    members = set(nodes)
    residual = next((n.args[0] for n in nodes if n.op == "call_function" and n.target in ADD
                     and tag(n).block is None and isinstance(n.args[0], fx.Node) and n.args[0] not in members), None)
    if not carried or residual is None or not isinstance(value(residual), torch.Tensor):
        return
    graph, template = gm.graph, carried[0]
    with graph.inserting_before(nodes[0]):
        zeros = graph.call_function(torch.zeros_like, (residual,))
        opened = graph.call_function(template.target, (residual, zeros))
    zeros.meta = {"example_value": value(residual)}
    opened.meta = {TAG: NodeTag(layer=first, block=None, module_type=None, module_name=None),
                   "example_value": value(residual)}
    residual.replace_all_uses_with(opened, delete_user_cb=lambda user: user in members)
    trial = [opened, *nodes]
    region = _region(trial)
    if not isinstance(region, str):
        sub = _subgraph(trial, *region)
        key = _signature(sub, region[0])
        if key in groups:
            del groups[alone]
            groups[key].insert(0, first)
            cut[first] = (trial, *region, sub)
            by_layer[first] = trial
            return
    opened.replace_all_uses_with(residual)
    graph.erase_node(opened)
    graph.erase_node(zeros)


def _is_complex(node: fx.Node) -> bool:
    v = value(node)
    return isinstance(v, torch.Tensor) and v.is_complex()


def _subgraph(nodes, inputs, outputs) -> fx.GraphModule:
    graph = fx.Graph()
    env = {}
    for k, a in enumerate(inputs):
        env[a] = p = graph.placeholder(f"arg{k}")
        p.meta = {"example_value": value(a)} if value(a) is not None else {}
        if _is_complex(a):
            # Complex inputs (Llama4's RoPE `freqs_cis`) cross the call as real views: functionalizing
            # a call that has both a complex input and mutated inputs (the cache) left an
            # `auto_functionalized_v2` node Inductor failed on ("was not removed").
            p.meta = {"example_value": torch.view_as_real(value(a))}
            env[a] = graph.call_function(torch.view_as_complex, (p,))
            env[a].meta = {"example_value": value(a)}
    for k, n in enumerate(nodes):
        # Positional names, so that identical layers get identical code.
        args = fx.map_arg(n.args, lambda a: env[a])
        kwargs = fx.map_arg(n.kwargs, lambda a: env[a])
        env[n] = graph.create_node(n.op, n.target, args, kwargs, name=f"v{k}")
        env[n].meta = dict(n.meta)
    graph.output(tuple(env[n] for n in outputs))
    return fx.GraphModule(torch.nn.Module(), graph)


def _signature(sub: fx.GraphModule, inputs) -> tuple:
    metas = []
    for a in inputs:
        v = value(a)
        # Sizes may be symbolic (dynamic shapes): the same symbol means the same size.
        metas.append(None if v is None else (_dims(v.shape), _dims(v.stride()), v.dtype, str(v.device)))
    return (sub.code, tuple(metas))


def _dims(sizes) -> tuple[str, ...]:
    return tuple(str(d) for d in sizes)


# Not on exported graphs: the shared submodules are not part of an ExportedProgram's signature.
@applies_to(DYNAMO)
def group_layer_variants(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    report, refused = {}, {}
    if ctx.needs_grad:
        return PassResult(gm, changed=False, refused={None: GRAD_REFUSAL})
    by_layer: dict[int, list[fx.Node]] = defaultdict(list)
    for n in compute_nodes(gm):
        if layer_of(n) is not None:
            by_layer[layer_of(n)].append(n)
    by_layer = _carry_residual_adds(by_layer)

    cut: dict[int, tuple] = {}
    groups: dict[tuple, list[int]] = defaultdict(list)
    for layer, nodes in sorted(by_layer.items()):
        if any(n.target is INVOKE for n in nodes):
            refused[layer] = "already calls a shared subgraph"
            continue
        region = _region(nodes)
        if isinstance(region, str):
            refused[layer] = f"not a self-contained region ({region}); left inline"
            continue
        inputs, outputs = region
        sub = _subgraph(nodes, inputs, outputs)
        cut[layer] = (nodes, inputs, outputs, sub)
        groups[_signature(sub, inputs)].append(layer)
    _open_first_layer(gm, by_layer, cut, groups)

    changed = False
    renamed: dict[fx.Node, fx.Node] = {}
    for k, layers in enumerate(sorted(groups.values(), key=min)):  # named in layer order
        name = f"{PREFIX}{k}"
        if len(layers) < 2:
            report[layers[0]] = "variant used once: inline"
            continue
        gm.add_submodule(name, cut[layers[0]][3])
        for layer in layers:
            nodes, inputs, outputs, _ = cut[layer]
            # An input may be another layer's output that an earlier call already replaced.
            inputs = [renamed.get(a, a) for a in inputs]
            renamed.update(_replace_with_call(gm, name, nodes, inputs, outputs, layer))
            report[layer] = f"shares {name} with layers {layers}"
        changed = True
    if changed:
        finish(gm)
    report[None] = f"{len(groups)} layer variant(s) for {len(by_layer)} layer(s) with ops"
    return PassResult(gm, changed=changed, report=report, refused=refused)


def _replace_with_call(gm, name, nodes, inputs, outputs, layer) -> dict[fx.Node, fx.Node]:
    """Replace a layer's nodes by one call of the shared subgraph; returns {old output: new value}."""
    graph = gm.graph
    tag = NodeTag(layer=layer, block=None, module_type="invoke_subgraph", module_name=name)
    with graph.inserting_after(nodes[-1]):
        attr = graph.get_attr(name)
    args = []
    for a in inputs:
        if _is_complex(a):  # the subgraph takes it as a real view (see `_subgraph`)
            with graph.inserting_before(attr):
                a = graph.call_function(torch.view_as_real, (a,))
            a.meta = {TAG: tag, "example_value": torch.view_as_real(value(a.args[0]))}
        args.append(a)
    with graph.inserting_after(attr):
        call = graph.call_function(INVOKE, (attr, name, *args))
    call.meta = {TAG: tag, "example_value": tuple(value(n) for n in outputs)}
    members = set(nodes)
    anchor, replaced = call, {}
    for k, out in enumerate(outputs):
        with graph.inserting_after(anchor):
            anchor = graph.call_function(operator.getitem, (call, k))
        anchor.meta = {TAG: tag, "example_value": value(out)}
        out.replace_all_uses_with(anchor, delete_user_cb=lambda user: user not in members)
        replaced[out] = anchor
    for n in reversed(nodes):
        graph.erase_node(n)
    return replaced
