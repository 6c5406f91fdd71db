"""Per-layer attention forms: each masked SDPA gets the cheapest exact form for its window and shapes.

The mask each attention op reads was built by hetgraph's model hook, which annotates it
(`attention.MASK_META` in `node.meta["custom"]`) with the window and the key layout it proved. From
that, the LayerSpec table and the op's shapes this pass chooses, per layer:

* sliding window W, aligned keys, more keys than a band: `banded_attention` (the same mask, read
  only in the band each query block can see: T * (W + block) scores instead of T * K);
* chunk C, no padding, a fresh prefill (keys = the queries' own, positions from 0): per-chunk
  `is_causal` SDPA (`chunked_attention`), or plain `is_causal` SDPA when the prompt fits one chunk;
  with padding or held keys, the banded form with extent C;
* otherwise the masked SDPA stays, with the reason: decode (one query over the small held window),
  full attention with padding or a cache holding tokens, keys not aligned (a ring buffer in
  decode), a mask the hook did not build, dropout, or a mask that is not boolean.

Every rewrite computes what the masked SDPA computes (`attention_forms`); the backward is autograd's
of the same aten ops. The exported programs get the forms too (trace.py inlines them to aten).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from hetgraph.attention import MASK_META
from hetgraph.attention_forms import band_size, banded_attention, chunked_attention
from hetgraph.passes._graph import SDPA, finish, is_op, layer_of, value
from hetgraph.passes._types import DYNAMO, EXPORT, PassContext, PassResult, applies_to

SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
SDPA_KWARGS = {"attn_mask": "attn_mask", "dropout_p": "dropout_p", "is_causal": "is_causal", "scale": "scale"}
FORMS = (banded_attention, chunked_attention)


def block_for(extent: int) -> int:
    """Query block of the banded form: the window's size rounded up to a power of two, 16 to 128
    (a block much wider than the window reads keys nobody sees; a narrower one, many small matmuls)."""
    return min(128, max(16, 1 << (extent - 1).bit_length()))


def sdpa_arguments(node: fx.Node) -> dict:
    """An SDPA call's arguments by name (dynamo's torch-level and export's aten calls alike)."""
    args = dict(zip(SDPA_PARAMS, node.args))
    args.update(node.kwargs)
    return args


def _static(n) -> int | None:
    return n if isinstance(n, int) else None


def choose_form(node: fx.Node, window: tuple) -> tuple[str, object, dict, str | None]:
    """(form description, callable or None to keep the SDPA, its keyword arguments, why not cheaper)."""
    a = sdpa_arguments(node)
    mask = a.get("attn_mask")
    if mask is None:
        kept = "is_causal SDPA" if a.get("is_causal") else "SDPA without a mask"
        return kept, None, {}, None
    info = mask.meta.get("custom", {}).get(MASK_META) if isinstance(mask, fx.Node) else None
    if info is None:
        return "masked SDPA", None, {}, "mask not built by hetgraph's model hook"
    kind, size = info["kind"], info["size"]
    if (kind, size) != tuple(window):
        return "masked SDPA", None, {}, f"mask built for window {(kind, size)}, layer has {tuple(window)}"
    q, k, m = value(a["query"]), value(a["key"]), value(mask)
    if q is None or k is None or m is None or m.dtype != torch.bool:
        return "masked SDPA", None, {}, "mask is not boolean (eager attention) or shapes unknown"
    if a.get("dropout_p", 0.0) not in (0, 0.0):
        return "masked SDPA", None, {}, "dropout in the attention"
    length, keys = _static(q.shape[-2]), _static(k.shape[-2])
    if length == 1:
        return "SDPA over the held keys (decode)", None, {}, None
    if kind == "full":
        why = "padding: is_causal cannot hide padded keys" if info["padded"] else "cache holds tokens"
        return "masked SDPA", None, {}, why
    if not info["aligned"]:
        return "masked SDPA", None, {}, "keys not in position order ending at the queries (cache layout)"
    scale = a.get("scale")
    own_keys = statically_known_true(q.shape[-2] == k.shape[-2])  # no held keys
    if kind == "chunked" and not info["padded"] and info["fresh"] and own_keys:
        if length is not None and length <= size:
            return "is_causal SDPA (prompt within one chunk)", "causal", {}, None
        return f"per-chunk is_causal SDPA (chunk {size})", chunked_attention, {"chunk": size, "scale": scale}, None
    block = block_for(size)
    band = band_size(size, block)
    if keys is not None and keys <= band:
        return "masked SDPA", None, {}, f"{keys} keys: no more than one band of {band}"
    form = f"banded attention (extent {size}, block {block}, {band} keys per query)"
    return form, banded_attention, {"extent": size, "block": block, "scale": scale}, None


def _rewrite(gm: fx.GraphModule, node: fx.Node, fn, kwargs: dict) -> None:
    a = sdpa_arguments(node)
    if fn == "causal":  # the same SDPA, its mask replaced by is_causal
        node.args = tuple(a[p] for p in SDPA_PARAMS[:3])
        node.kwargs = {**{k: v for k, v in node.kwargs.items() if k not in SDPA_KWARGS}, "is_causal": True}
        if a.get("scale") is not None:
            node.kwargs = {**node.kwargs, "scale": a["scale"]}
        return
    args = (a["query"], a["key"], a["value"]) + (() if fn is chunked_attention else (a["attn_mask"],))
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(fn, args, kwargs)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


@applies_to(DYNAMO, EXPORT)
def specialize_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    report, refused = {}, {}
    changed = False
    for node in [n for n in gm.graph.nodes if is_op(n, SDPA) and layer_of(n) is not None]:
        layer = layer_of(node)
        if layer >= len(ctx.spec):
            continue
        form, fn, kwargs, why = choose_form(node, ctx.spec[layer].window)
        report[layer] = form
        if why is not None:
            refused[layer] = why
        if fn is not None:
            _rewrite(gm, node, fn, kwargs)
            changed = True
    if changed:
        finish(gm)
    return PassResult(gm, changed=changed, report=report, refused=refused)
