"""Route a dense mixture of experts: each token through only the experts its router chose.

A stock MoE block may compute every expert on every token (Llama4's: E times the expert work a
top-1 router needs, and in decode E times the weight bytes):

    scores = to(sigmoid(float(full_like(logits, -inf).scatter_(1, top_indices, top_values))))
    rows   = repeat(x, E, 1) * reshape(transpose(scores, 0, 1), -1, 1)
    h      = up * act(gate), with gate, up = chunk(bmm(view(rows, E, -1, H), W_gate_up), 2, -1)
    out    = sum(reshape(view(bmm(h, W_down), -1, H), E, -1, H), dim=0)

The scores are sigmoid(-inf) = 0 outside the top k, so every other expert's row is zero and adds
exactly zero. The pass proves that graph, node by node (the -inf fill, the scatter of `topk`'s own
indices, the sigmoid, the repeat and the per-expert views), and gives it `hetgraph.expert_forms`:
the T*k chosen rows sorted by expert, a grouped matmul in place of each `bmm`, the rows added
back to their tokens. The same activation and product run between the two matmuls. A graph that
differs anywhere is left dense and the layer says why. Not for graphs that will be differentiated
(training keeps the stock form).
"""

from __future__ import annotations

import contextlib
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from hetgraph import expert_forms
from hetgraph.passes._graph import finish, layer_of, value, wrapped_meta
from hetgraph.passes._types import DYNAMO, PassContext, PassResult, applies_to

GRAD_REFUSAL = "gradients are needed: the dense experts are kept (the routed form is for inference)"
F = torch.nn.functional
_MUL = {operator.mul, torch.mul}
_SIGMOID = {torch.sigmoid, F.sigmoid}
_CASTS = {"float", "to", "type_as"}
# Activations that act on each element alone (so on rows in any layout): ACT2FN's, as dynamo records them.
_ELEMENTWISE = {F.silu, F.gelu, F.relu, F.mish, F.elu, F.leaky_relu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh}


def _method(node, *names) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def _function(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _only_user(node: fx.Node, user: fx.Node) -> bool:
    return list(node.users) == [user]


def _shape(node) -> tuple | None:
    v = value(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _uncast(node):
    """The value under a chain of dtype conversions (`.float()`, `.to(dtype)`, `.type_as(t)`)."""
    while _method(node, *_CASTS):
        node = node.args[0]
    return node


@dataclass
class _Site:
    """One dense MoE block, proven: the nodes the rewrite reads and replaces."""

    total: fx.Node
    x: fx.Node
    indices: fx.Node
    scores: fx.Node
    first_mm: fx.Node
    second_mm: fx.Node
    rows_view: fx.Node
    between: tuple  # (chunk, gate, up, act, h): row-wise, between the two matmuls
    experts: int
    k: int


def _dense_sum(node: fx.Node):
    """`sum(reshape(out, E, -1, H), dim=0)` whose `out` comes from a `bmm`: a candidate, or None."""
    if not (_method(node, "sum") and node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None) == 0):
        return None
    if node.kwargs.get("keepdim", False) or not _method(node.args[0], "reshape", "view"):
        return None
    out = node.args[0].args[0]
    if not (_method(out, "view", "reshape") and _function(out.args[0], {torch.bmm})):
        return None
    return node.args[0], out, out.args[0]


def _prove(total: fx.Node) -> _Site | str:
    """The site of a candidate `total`, or why it is not the dense-experts graph this pass knows."""
    folded, out, second_mm = _dense_sum(total)
    h, down = second_mm.args
    if not all(_only_user(a, b) for a, b in ((folded, total), (out, folded), (second_mm, out), (h, second_mm))):
        return "an intermediate of the experts is read elsewhere"
    if not _function(h, _MUL):
        return f"the down projection reads {h.name}, not a product"
    parts = [a for a in h.args if isinstance(a, fx.Node)]
    halves = [p for p in parts if _function(p, {operator.getitem})]
    acts = [p for p in parts if p not in halves and _function(p, _ELEMENTWISE) and len(p.all_input_nodes) == 1]
    if not (len(parts) == 2 and len(halves) == 1 and len(acts) == 1):
        return "the down projection's input is not up * act(gate) with an elementwise activation"
    (up,), (act,) = halves, acts
    gate = act.all_input_nodes[0]
    if not (_function(up, {operator.getitem}) and _function(gate, {operator.getitem})):
        return "the activation is not of one half of the gate-up projection"
    chunk = up.args[0]
    if not (gate.args == (chunk, 0) and up.args == (chunk, 1) and _method(chunk, "chunk")
            and chunk.args[1:] == (2,) and chunk.kwargs.get("dim") in (-1, 2)):
        return "the gate and up halves are not chunk(2, dim=-1) of one projection"
    first_mm = chunk.args[0]
    if not (_function(first_mm, {torch.bmm}) and _only_user(first_mm, chunk) and _only_user(act, h)):
        return "the gate-up projection is not one bmm"
    rows_view, gate_up = first_mm.args
    if not (_method(rows_view, "view", "reshape") and _only_user(rows_view, first_mm)):
        return "the experts' input is not a view of the routed rows"
    routed = rows_view.args[0]
    if not (_function(routed, _MUL) and _only_user(routed, rows_view) and len(routed.args) == 2):
        return "the experts' input is not the repeated tokens times their scores"
    repeated, column = routed.args
    if not (_method(repeated, "repeat") and _method(column, "reshape", "view")
            and _method(column.args[0], "transpose") and column.args[1:] == (-1, 1)):
        return "the experts' input is not repeat(x, E, 1) * reshape(transpose(scores, 0, 1), -1, 1)"
    x, scores = repeated.args[0], column.args[0].args[0]
    experts = repeated.args[1]
    if not (isinstance(experts, int) and repeated.args[2:] == (1,) and column.args[0].args[1:] in ((0, 1), (1, 0))):
        return "the tokens are not repeated once per expert"
    why = _zero_outside_top_k(scores)
    if isinstance(why, str):
        return why
    indices, k = why
    shapes = [_shape(n) for n in (x, scores, gate_up, down, out)]
    if any(s is None for s in shapes):
        return "a tensor without a recorded shape"
    (t, hidden), (t2, e), (e1, h1, two_i), (e2, i, h2), _ = shapes
    if not (e == e1 == e2 == experts and h1 == h2 == hidden and two_i == 2 * i and t == t2):
        return f"the shapes do not match one MoE block ({shapes})"
    if folded.args[1:] != (experts, -1, hidden) or rows_view.args[1:] != (experts, -1, hidden):
        return "the per-expert views are not (E, -1, H)"
    return _Site(total, x, indices, scores, first_mm, second_mm, rows_view, (chunk, gate, up, act, h), experts, k)


def _zero_outside_top_k(scores: fx.Node) -> tuple[fx.Node, int] | str:
    """(top-k indices, k) when `scores` is sigmoid of -inf scattered with `topk`'s own values."""
    sig = _uncast(scores)
    if not (_function(sig, _SIGMOID) or _method(sig, "sigmoid")):
        return "the router scores are not a sigmoid"
    scattered = _uncast(sig.args[0])
    if not (_method(scattered, "scatter_", "scatter") and scattered.args[1:2] == (1,) and len(scattered.args) == 4):
        return "the router scores are not scattered into the experts' dim"
    fill, indices, values = scattered.args[0], scattered.args[2], scattered.args[3]
    if not (_function(fill, {torch.full_like}) and fill.args[1:] == (-math.inf,)):
        return "the scores outside the top k are not -inf (so not zero after the sigmoid)"
    top = indices.args[0] if _function(indices, {operator.getitem}) else None
    if not (indices.args[1:] == (1,) and _function(top, {torch.topk}) and values.args == (top, 0)):
        return "the scattered experts are not the indices and values of one topk (distinct per token)"
    dim = top.kwargs.get("dim", top.args[2] if len(top.args) > 2 else -1)
    k = top.kwargs.get("k", top.args[1] if len(top.args) > 1 else None)
    if dim not in (1, -1) or not isinstance(k, int):
        return "the topk is not over the experts"
    return indices, k


@applies_to(DYNAMO)
def specialize_experts(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    report, refused = {}, {}
    candidates = [n for n in gm.graph.nodes if layer_of(n) is not None and _dense_sum(n) is not None]
    if candidates and ctx.needs_grad:
        return PassResult(gm, changed=False, refused={None: GRAD_REFUSAL})
    for total in candidates:
        layer = layer_of(total)
        site = _prove(total)
        if isinstance(site, str):
            refused[layer] = f"dense experts kept: {site}"
            continue
        _rewrite(gm, site)
        report[layer] = f"routed experts: top-{site.k} of {site.experts} per token through grouped_mm"
    if report:
        finish(gm)
    return PassResult(gm, changed=bool(report), report=report, refused=refused)


def _rewrite(gm: fx.GraphModule, site: _Site) -> None:
    graph, key = gm.graph, "example_value" if "example_value" in site.total.meta else "val"
    x, gate_up, down = value(site.x), value(site.first_mm.args[1]), value(site.second_mm.args[1])
    matmul = expert_forms.expert_matmul(x, gate_up)
    wrapped = wrapped_meta(expert_forms) if matmul is not torch._grouped_mm else {}
    chunk, gate, up, act, h = site.between
    # The new values, and those of the row-wise ops now over [T*k, ...] rows (later passes read shapes).
    with getattr(x, "fake_mode", None) or contextlib.nullcontext():
        rows, token, offsets = expert_forms.routed_rows(x, value(site.indices), value(site.scores), site.experts)
        first = matmul(rows, gate_up, offs=offsets)
        halves = first.chunk(2, dim=-1)
        inner = halves[0].new_empty(halves[0].shape)
        second = rows.new_empty((rows.shape[0], down.shape[2]))
        added = expert_forms.add_rows(x, token, second)
    out = next(iter(site.second_mm.users))
    for node, v in ((site.first_mm, first), (chunk, halves), (gate, halves[0]), (up, halves[1]), (act, inner),
                    (h, inner), (site.second_mm, second), (out, second)):
        node.meta[key] = v

    def call(target, args, v, like, meta=()):
        new = graph.call_function(target, args)
        new.meta.update(like.meta)
        new.meta.update(meta)
        new.meta[key] = v
        return new

    with graph.inserting_before(site.rows_view):
        routed = call(expert_forms.routed_rows, (site.x, site.indices, site.scores, site.experts),
                      (rows, token, offsets), site.rows_view, wrapped_meta(expert_forms))
        rows_n, token_n, offsets_n = (call(operator.getitem, (routed, k), v, site.rows_view)
                                      for k, v in enumerate((rows, token, offsets)))
    for mm, lhs in ((site.first_mm, rows_n), (site.second_mm, site.second_mm.args[0])):
        mm.target, mm.args, mm.kwargs = matmul, (lhs, mm.args[1]), {"offs": offsets_n}
        mm.meta.update(wrapped)  # cacheable by AOTAutograd
    with graph.inserting_after(site.total):
        new = call(expert_forms.add_rows, (site.x, token_n, out), added, site.total, wrapped_meta(expert_forms))
    site.total.replace_all_uses_with(new)
