"""Per-layer attention forms: each masked SDPA gets the cheapest exact form for its window and shapes.

The mask each attention op reads was built by hetgraph's model hook, which annotates it
(`attention.MASK_META` in `node.meta["custom"]`) with the window and the key layout it proved. From
that, the LayerSpec table and the op's shapes this pass chooses, per layer:

* sliding window W, aligned keys, more keys than a band: `banded_attention` (the same mask, read
  only in the band each query block can see: T * (W + block) scores instead of T * K);
* chunk C, no padding, a fresh prefill (keys = the queries' own, positions from 0): per-chunk
  `is_causal` SDPA (`chunked_attention`), or plain `is_causal` SDPA when the prompt fits one chunk;
  with padding or held keys, the banded form with extent C;
* GptOss (eager attention only): the same choice for `matmul, * scale, + mask, sink column,
  softmax, matmul` (`sinks_site`), the banded form keeping the sink column before its softmax;
* decode (one query) with grouped KV heads: the queries of a KV head's group packed as that head's
  queries (`[B, H, 1, D]` viewed as `[B, Hk, H/Hk, D]`) and SDPA over the held keys as they are
  (`_pack_queries`), instead of over transformers' `repeat_kv` copy of them, which under torch.compile
  copies every key and value slot of the cache to every query head at every step (GptOss's eager
  attention with sinks: `grouped_decode_attention`, the sink column kept);
* any form, where the keys and values are `repeat_kv`'s copy: the form reads them before it (SDPA
  with `enable_gqa`, the per-chunk SDPA too; the banded form takes a KV head's query heads as rows
  of one matmul), so a prefill does not copy its keys to every query head either;
* otherwise the attention stays, with the reason: decode without grouped heads (one query over the
  held window), full attention with padding or a cache holding tokens, keys not aligned (a ring buffer in
  decode), a mask the hook did not build, dropout, or an additive mask without sinks.

Every rewrite computes what the masked SDPA computes (`attention_forms`); the backward is autograd's
of the same aten ops. The exported programs get the forms too (trace.py inlines them to aten).
A form's node is marked as a wrapped function with the hash of `attention_forms`' source, so
AOTAutograd's on-disk cache keeps graphs that hold it (a warm start; see `warmup.py`) and a changed
form is another key.
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from hetgraph import attention_forms
from hetgraph.attention import MASK_META
from hetgraph.attention_forms import band_size, banded_attention, chunked_attention, grouped_decode_attention
from hetgraph.passes._graph import ADD, SDPA, aten, finish, is_op, is_view, layer_of, value, wrapped_meta
from hetgraph.passes._types import DYNAMO, EXPORT, PassContext, PassResult, applies_to

SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
SDPA_KWARGS = {"attn_mask", "dropout_p", "is_causal", "scale"}

MATMUL = {torch.matmul, aten.matmul.default}
MUL = {operator.mul, torch.mul, aten.mul.Tensor}
CAT = {torch.cat, aten.cat.default}
# Between the sink column's softmax and the matmul with the values (GptOss's eager attention).
SOFTMAX_TO_VALUES = {torch.nn.functional.softmax, torch.softmax, operator.getitem, torch.nn.functional.dropout,
                     operator.sub, "to", "max"}


def block_for(extent: int) -> int:
    """Query block of the banded form: a quarter of the window (rounded up to a power of two),
    32 to 128; 16 for windows of 16 or less. A block of B queries reads W + B keys (rounded to
    blocks): a wider block scores keys nobody sees, a narrower one makes many small matmuls.
    Measured on the compiled op (CPU, prompts 2048 and 8192, windows 64-512):
    `benchmarks/attention_block_size.py`, results in benchmarks/results/cpu-2core/attention-block-size."""
    width = 1 << (extent - 1).bit_length()
    return 16 if width <= 16 else min(128, max(32, width // 4))


@dataclass
class Site:
    """One attention computation the pass may replace: its inputs, and the node whose value it is."""

    out: fx.Node
    query: fx.Node
    key: fx.Node
    value: fx.Node
    mask: fx.Node | None
    scale: float | None
    dropout: float = 0.0
    is_causal: bool = False
    sinks: fx.Node | None = None  # GptOss: the per-head sink logits (a parameter)


def sdpa_site(node: fx.Node) -> Site:
    """An SDPA call's arguments by name (dynamo's torch-level and export's aten calls alike)."""
    a = dict(zip(SDPA_PARAMS, node.args))
    a.update(node.kwargs)
    mask = a.get("attn_mask")
    return Site(node, a["query"], a["key"], a["value"], mask if isinstance(mask, fx.Node) else None,
                a.get("scale"), a.get("dropout_p", 0.0) or 0.0, bool(a.get("is_causal", False)))


def sinks_site(add: fx.Node) -> Site | None:
    """GptOss's eager attention around `add(scores * scale, mask)`: the sink column concatenated,
    max subtracted, softmax, the sink dropped, dropout, matmul with the values. None if the ops
    around `add` are not exactly these (in torch.export's aten graph they are not: matmul is
    decomposed there, and the pass keeps the eager attention)."""
    scaled = add.args[0]
    if not (is_op(scaled, MUL) and isinstance(scaled.args[1], float) and is_op(scaled.args[0], MATMUL)):
        return None
    query, transposed = scaled.args[0].args
    if not (isinstance(transposed, fx.Node) and transposed.op == "call_method" and transposed.target == "transpose"):
        return None
    if len(add.users) != 1 or not is_op(cat := next(iter(add.users)), CAT):
        return None
    parts = cat.args[0]
    if len(parts) != 2 or parts[0] is not add or cat.kwargs.get("dim", cat.args[1] if len(cat.args) > 1 else 0) != -1:
        return None
    sinks = parts[1]
    while isinstance(sinks, fx.Node) and sinks.op == "call_method" and sinks.target in ("expand", "reshape", "view"):
        sinks = sinks.args[0]
    if not (isinstance(sinks, fx.Node) and sinks.op in ("placeholder", "get_attr")):
        return None
    # Forward from the concatenation to the first matmul, through the softmax chain only.
    node, seen = cat, 0
    while seen < 12:
        node = next((u for u in node.users if u.target in SOFTMAX_TO_VALUES or is_op(u, MATMUL)), None)
        if node is None or (node.target is torch.nn.functional.dropout and node.kwargs.get("training")):
            return None
        if is_op(node, MATMUL):
            return Site(node, query, transposed.args[0], node.args[1], add.args[1], scaled.args[1], sinks=sinks)
        seen += 1
    return None


def _static(n) -> int | None:
    return n if isinstance(n, int) else None


def _method(node: fx.Node, *names: str) -> bool:
    return node.op == "call_method" and node.target in names


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


UNSQUEEZE = {torch.unsqueeze, aten.unsqueeze.default}
FULL_SLICE = slice(None, None, None)


def _with_new_axis(node, shape) -> fx.Node | None:
    """The 4-D tensor `node` is with a new axis inserted at 2 (`x[:, :, None]`, `unsqueeze(x, 2)`,
    through identity slices as export records them): `shape` is its 5-D shape. None otherwise."""
    for _ in range(8):
        if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        source, v = node.args[0], value(node.args[0])
        if v is None:
            return None
        if is_op(node, {aten.slice.Tensor}) and (node.args[4:5] or [1])[0] == 1 and _same_shape(v.shape, shape):
            node = source  # an identity slice
            continue
        index = node.args[1] if len(node.args) > 1 else None
        viewing = (
            (is_op(node, {operator.getitem}) and isinstance(index, tuple)
             and all(i is None or i is Ellipsis or i == FULL_SLICE for i in index))
            or is_op(node, UNSQUEEZE) or _method(node, "unsqueeze")
        )  # fmt: skip
        if viewing and v.dim() == 4 and _same_shape((*v.shape[:2], 1, *v.shape[2:]), shape):
            return source
        return None
    return None


def repeated_kv(node) -> tuple[fx.Node, int] | None:
    """(x, n) when `node` is transformers' `repeat_kv(x, n)`, n > 1: `x[:, :, None]` expanded n times
    along the new axis and merged into the heads (dynamo's torch-level graph or export's aten
    graph alike); None for anything else. Head h of the result is head h // n of x."""
    out = value(node)
    if not isinstance(node, fx.Node) or out is None or out.dim() != 4 or not is_view(node):
        return None
    expand = node.args[0]
    while isinstance(expand, fx.Node) and (is_op(expand, {aten.clone.default}) or _method(expand, "contiguous")):
        expand = expand.args[0]
    if not (isinstance(expand, fx.Node) and (_method(expand, "expand") or is_op(expand, {aten.expand.default}))):
        return None
    wide = value(expand)
    if wide is None or wide.dim() != 5:
        return None
    batch, heads, n, length, dim = wide.shape
    source = _with_new_axis(expand.args[0], (batch, heads, 1, length, dim))
    if source is None or not isinstance(n, int) or n < 2 or not _same_shape(out.shape, (batch, heads * n, length, dim)):
        return None
    return source, n


def unrepeated(site: Site) -> tuple[fx.Node, fx.Node, int] | None:
    """(keys, values, group size) when the site reads `repeat_kv` of its keys and values alike."""
    keys, values = repeated_kv(site.key), repeated_kv(site.value)
    if keys is None or values is None or keys[1] != values[1]:
        return None
    return keys[0], values[0], keys[1]


def packed_decode(site: Site) -> tuple[fx.Node, fx.Node, int] | str | None:
    """For a decode SDPA over `repeat_kv`'s keys and values: (keys, values, group size) to pack the
    queries with, or why not; None where there is nothing to pack (one query per KV head, or
    more than one query)."""
    q = value(site.query)
    if q is None or q.dim() != 4 or _static(q.shape[-2]) != 1:
        return None
    keys, values = repeated_kv(site.key), repeated_kv(site.value)
    if keys is None and values is None:
        return None
    if keys is None or values is None or keys[1] != values[1]:
        return "keys and values are not repeated alike"
    if site.dropout or site.is_causal:
        return "dropout or is_causal in the attention"
    m = value(site.mask) if site.mask is not None else None
    if site.mask is not None and (m is None or m.dim() != 4 or _static(m.shape[1]) != 1 or _static(m.shape[2]) != 1):
        return "the mask is not one row shared by all heads"
    return keys[0], values[0], keys[1]


def on_kv_heads(site: Site, form: str, fn, kwargs: dict) -> tuple[str, object, dict]:
    """The chosen form reading the keys and values before `repeat_kv` (SDPA's `enable_gqa`; the
    banded form takes a KV head's query heads as rows of one matmul), where it read the copy."""
    takes_kv_heads = fn in (banded_attention, chunked_attention) or (site.sinks is None and fn in (None, "causal"))
    grouped = unrepeated(site) if takes_kv_heads else None  # the packed forms already read them
    if grouped is None:
        return form, fn, kwargs
    keys, values, groups = grouped
    kwargs = {**kwargs, "keys": keys, "values": values}
    if fn is chunked_attention:
        kwargs["enable_gqa"] = True
    return f"{form}, on the KV heads ({groups} query heads each)", fn or "gqa", kwargs


def choose_form(site: Site, window: tuple) -> tuple[str, object, dict, str | None]:
    """(form description, callable or None to keep the op, its keyword arguments, why not cheaper)."""
    kept = "eager attention with sinks" if site.sinks is not None else "masked SDPA"
    packed = packed_decode(site)
    if isinstance(packed, tuple):
        keys, values, groups = packed
        if site.sinks is not None:
            form = f"GQA-packed attention with sinks over the held keys (decode, {groups} query heads per KV head)"
            return form, grouped_decode_attention, {"keys": keys, "values": values, "scale": site.scale}, None
        form = f"GQA-packed SDPA over the held keys (decode, {groups} query heads per KV head)"
        return form, "packed", {"keys": keys, "values": values, "groups": groups}, None
    if isinstance(packed, str):
        return f"{kept} over repeated keys (decode)", None, {}, packed
    if site.mask is None:
        return ("is_causal SDPA" if site.is_causal else "SDPA without a mask"), None, {}, None
    info = site.mask.meta.get("custom", {}).get(MASK_META)
    if info is None:
        return kept, None, {}, "mask not built by hetgraph's model hook"
    kind, size = info["kind"], info["size"]
    if (kind, size) != tuple(window):
        return kept, None, {}, f"mask built for window {(kind, size)}, layer has {tuple(window)}"
    q, k, m = value(site.query), value(site.key), value(site.mask)
    if q is None or k is None or m is None:
        return kept, None, {}, "shapes unknown"
    if m.dtype != torch.bool and site.sinks is None:
        return kept, None, {}, "additive mask without sinks (eager attention): a fully masked row would differ"
    if site.dropout:
        return kept, None, {}, "dropout in the attention"
    length, keys = _static(q.shape[-2]), _static(k.shape[-2])
    if length == 1:
        return f"{kept} over the held keys (decode)", None, {}, None
    if kind == "full":
        why = "padding: is_causal cannot hide padded keys" if info["padded"] else "cache holds tokens"
        return kept, None, {}, why
    if not info["aligned"]:
        return kept, None, {}, "keys not in position order ending at the queries (cache layout)"
    own_keys = statically_known_true(q.shape[-2] == k.shape[-2])  # no held keys
    if kind == "chunked" and site.sinks is None and not info["padded"] and info["fresh"] and own_keys:
        if length is not None and length <= size:
            return "is_causal SDPA (prompt within one chunk)", "causal", {}, None
        return f"per-chunk is_causal SDPA (chunk {size})", chunked_attention, {"chunk": size, "scale": site.scale}, None
    block = block_for(size)
    band = band_size(size, block)
    if keys is not None and keys <= band:
        return kept, None, {}, f"{keys} keys: no more than one band of {band}"
    form = f"banded attention (extent {size}, block {block}, {band} keys per query)"
    if site.sinks is not None:
        form += " with sinks"
    return form, banded_attention, {"extent": size, "block": block, "scale": site.scale}, None


def _rewrite(gm: fx.GraphModule, site: Site, fn, kwargs: dict) -> None:
    node = site.out
    kwargs = dict(kwargs)
    keys, values = kwargs.pop("keys", site.key), kwargs.pop("values", site.value)
    if fn == "packed":
        _pack_queries(gm, site, keys, values, **kwargs)
        return
    if fn in ("causal", "gqa"):  # the same SDPA: its mask replaced by is_causal, or on the KV heads
        gqa = {"enable_gqa": True} if keys is not site.key else {}
        if fn == "gqa":
            _set_inputs(node, site.query, keys, values)
            node.kwargs = {**node.kwargs, **gqa}
            return
        others = {k: v for k, v in node.kwargs.items() if k not in SDPA_KWARGS}  # e.g. enable_gqa
        scale = {} if site.scale is None else {"scale": site.scale}
        node.args = (site.query, keys, values)
        node.kwargs = {**others, "is_causal": True, **scale, **gqa}
        return
    args = (site.query, keys, values) + (() if fn is chunked_attention else (site.mask,))
    if site.sinks is not None:
        kwargs = {**kwargs, "sinks": site.sinks}
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(fn, args, kwargs)
    new.meta.update(node.meta)
    new.meta.update(wrapped_meta(attention_forms))  # cacheable by AOTAutograd
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _set_inputs(node: fx.Node, query, key, value_) -> None:
    """An SDPA node's query, key and value replaced, wherever it takes them (positions or keywords)."""
    args, kwargs = list(node.args), dict(node.kwargs)
    for name, new in (("query", query), ("key", key), ("value", value_)):
        i = SDPA_PARAMS.index(name)
        if i < len(args):
            args[i] = new
        else:
            kwargs[name] = new
    node.args, node.kwargs = tuple(args), kwargs


def _pack_queries(gm: fx.GraphModule, site: Site, keys: fx.Node, values: fx.Node, groups: int) -> None:
    """SDPA(q, repeat_kv(k), repeat_kv(v), mask) with one query as SDPA(q', k, v, mask): q [B, H, 1, D]
    viewed as [B, H / groups, groups, D] (query head h is query h % groups of KV head h // groups,
    as in `repeat_kv`), the output viewed back. The mask is one row, so it broadcasts the same."""
    node, graph = site.out, gm.graph
    key = "example_value" if "example_value" in node.meta else "val"
    q, out = value(site.query), value(node)
    shape = [q.shape[1] // groups, groups]
    # The values' own fake modes (dynamo's, or a later propagation's: they may differ), if fake.
    with getattr(q, "fake_mode", None) or contextlib.nullcontext():
        q_flat = aten.squeeze.dim(q, 2)
        q_packed = aten.unflatten.int(q_flat, 1, shape)
    with getattr(out, "fake_mode", None) or contextlib.nullcontext():
        out_packed = aten.unflatten.int(aten.squeeze.dim(out, 2), 1, shape)
        out_flat = aten.flatten.using_ints(out_packed, 1, 2)

    def call(target, args, v):
        new = graph.call_function(target, args)
        new.meta.update(node.meta)
        new.meta[key] = v
        return new

    with graph.inserting_before(node):
        packed = call(aten.unflatten.int, (call(aten.squeeze.dim, (site.query, 2), q_flat), 1, shape), q_packed)
    _set_inputs(node, packed, keys, values)
    with graph.inserting_after(node):
        flat = call(aten.flatten.using_ints, (node, 1, 2), out_flat)
    with graph.inserting_after(flat):
        back = call(aten.unsqueeze.default, (flat, 2), out)
    node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not flat)
    node.meta[key] = out_packed


def _sites(gm: fx.GraphModule):
    for node in list(gm.graph.nodes):
        if layer_of(node) is None:
            continue
        if is_op(node, SDPA):
            yield sdpa_site(node)
        elif is_op(node, ADD) and _is_hooked_mask(node.args[1]):
            site = sinks_site(node)
            if site is not None:
                yield site


def _is_hooked_mask(node) -> bool:
    return isinstance(node, fx.Node) and MASK_META in node.meta.get("custom", {})


@applies_to(DYNAMO, EXPORT)
def specialize_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    report, refused = {}, {}
    changed = False
    for site in list(_sites(gm)):
        layer = layer_of(site.out)
        if layer >= len(ctx.spec):
            continue
        form, fn, kwargs, why = choose_form(site, ctx.spec[layer].window)
        form, fn, kwargs = on_kv_heads(site, form, fn, kwargs)
        report[layer] = form
        if why is not None:
            refused[layer] = why
        if fn is not None:
            _rewrite(gm, site, fn, kwargs)
            changed = True
    if changed:
        finish(gm)
    return PassResult(gm, changed=changed, report=report, refused=refused)
