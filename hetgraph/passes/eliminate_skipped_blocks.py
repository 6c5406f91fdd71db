"""Dead-branch elimination for removed attention / MLP blocks.

A removed block is a hetgraph marker that returns `zeros_like(x)`, added to the residual by the
stock layer code. The pass rewrites `residual + zeros` to `residual` and drops the zeros: the block
leaves no op behind (no norm, no zeros, no add, no cache access). It proves each rewrite first:
the zeros come from the removed block of a layer the LayerSpec table says is removed, reach the
add directly or through views that keep their shape (Llama4's `ff.view(residual.shape)`), and the
add neither broadcasts nor changes dtype. Anything else is left alone and reported.
"""

from __future__ import annotations

import torch.fx as fx

from hetgraph.passes._graph import ADD, ZEROS_LIKE, finish, is_op, is_view, ops_per_layer, same_tensor_type, tag
from hetgraph.passes._types import DYNAMO, EXPORT, PassContext, PassResult, applies_to
from hetgraph.spec import SKIP


def _removed(ctx: PassContext, layer: int | None, block: str | None) -> bool:
    if layer is None or block is None or layer >= len(ctx.spec):
        return False
    return getattr(ctx.spec[layer], block) == SKIP


def _residual_add(zeros: fx.Node, user: fx.Node) -> fx.Node | None:
    """The other operand if `user` is `other + zeros` (either order) that neither broadcasts nor casts."""
    if not is_op(user, ADD) or len(user.args) != 2 or user.kwargs.get("alpha", 1) != 1:
        return None
    a, b = user.args
    other = b if a is zeros else a if b is zeros else None
    if other is None or other is zeros or not isinstance(other, fx.Node):
        return None
    return other if same_tensor_type(other, user) else None


def _zero_views(zeros: fx.Node) -> list[fx.Node]:
    """The zeros and the views of them that keep their shape and dtype (still all zeros), in graph order."""
    chain = [zeros]
    for node in chain:
        chain.extend(u for u in node.users if is_view(u) and u.args[0] is node and same_tensor_type(u, zeros))
    return chain


@applies_to(DYNAMO, EXPORT)
def eliminate_skipped_blocks(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    before = ops_per_layer(gm)
    report, refused = {}, {}
    changed = False
    for zeros in [n for n in gm.graph.nodes if is_op(n, ZEROS_LIKE)]:
        t = tag(zeros)
        if t is None or not _removed(ctx, t.layer, t.block):
            continue
        chain = _zero_views(zeros)
        rewrites = [(user, _residual_add(z, user)) for z in chain for user in z.users if user not in chain]
        unproven = [user.name for user, other in rewrites if other is None]
        if unproven:
            refused[t.layer] = f"{t.block}: zeros feed {unproven}, not a plain residual add; left unchanged"
            continue
        for user, other in rewrites:
            user.replace_all_uses_with(other)
            gm.graph.erase_node(user)
        for z in reversed(chain):
            gm.graph.erase_node(z)
        changed = True
    if changed:
        finish(gm)
        after = ops_per_layer(gm)
        for layer in sorted(k for k in before if k is not None and before[k] != after.get(k, 0)):
            report[layer] = f"removed {before[layer] - after.get(layer, 0)} ops of removed blocks"
    return PassResult(gm, changed=changed, report=report, refused=refused)
