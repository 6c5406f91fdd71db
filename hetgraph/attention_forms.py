"""Exact attention forms that cost only what a layer can see: banded windows and per-chunk attention.

Both take what a masked SDPA takes and compute the same result, under one layout contract the
caller proves (`passes/specialize_attention.py` does, from the mask's annotation):

* **aligned keys**: keys are in position order, and the last T of the K keys are the T queries' own
  (query i sits at key index i + K - T). hetgraph's masks are built so, without a cache, with
  transformers' dynamic caches, and with `make_cache` layers in prefill.

`banded_attention` gathers, per block of `block` queries, the `P + block` keys that end at the
block's last query (P the extent rounded up to a block), and the same band of the mask (boolean,
or additive as eager attention's); the mask still decides every score, so any padding or window rule is kept exactly. Keys outside the
band are ones the mask hides anyway (no query sees a key more than `extent - 1` positions back).
Cost: T * (P + block) scores instead of T * K. A row the mask hides completely gives 0, as SDPA's.

`chunked_attention` handles chunk C with no padding and no held keys (keys = the queries'
own, positions from 0): queries and keys viewed as chunks, one `is_causal` SDPA, no mask.

`grouped_decode_attention` is a decode step (one query) over keys shared by groups of query
heads, without `repeat_kv`'s copy of them; the pass uses it for GptOss's eager attention with
sinks (SDPA decode steps keep SDPA, their queries viewed the same way).

Plain aten ops only (pad, index_select, matmul, softmax; the mask's band is an unfold, which
needs no gradient): Inductor compiles and fuses them, torch.export records them, autograd
differentiates them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def band_size(extent: int, block: int) -> int:
    """Keys each query block reads: the block itself and `extent - 1` earlier, rounded up to blocks."""
    return -(-(extent - 1) // block) * block + block


def banded_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    *,
    extent: int,
    block: int,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """SDPA(query, key, value, attn_mask=mask) for aligned keys when no query sees more than `extent`.

    query [B, H, T, D]; key, value [B, Hk, K, D] (H a multiple of Hk); mask broadcastable as
    [B or 1, 1, T, K], boolean (True: attend) or additive (eager attention's 0 / dtype min).
    `sinks` [H]: one extra logit per head in the softmax, no value (GptOss).
    """
    batch, heads, length, dim = query.shape
    kv_heads, kv_length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    band = band_size(extent, block)
    front = band - block  # keys before a block's first query, in the band
    blocks = _count(length, block)
    padded = blocks * block
    # Key index of query i becomes i + front: pad (or crop keys nobody sees) in front, pad the tail.
    shift = front - (kv_length - length)
    tail = padded - length
    keys = _windows(F.pad(key, (0, 0, shift, tail)), band, block, blocks)  # [B, Hk, nb, band, D]
    values = _windows(F.pad(value, (0, 0, shift, tail)), band, block, blocks)
    # A KV head's G query heads share its keys: they are rows of one matmul per block (no repeat_kv).
    queries = F.pad(query, (0, 0, 0, tail)).reshape(batch, kv_heads, groups, blocks, block, dim)
    queries = queries.permute(0, 1, 3, 2, 4, 5).reshape(batch, kv_heads, blocks, groups * block, dim)

    boolean = mask.dtype == torch.bool
    mask = mask.expand(mask.shape[0], 1, length, kv_length)
    hidden = False if boolean else float("-inf")  # what a padded key gets
    mask = F.pad(mask, (shift, tail, 0, tail), value=hidden)  # [Bm, 1, padded, front + padded]
    mask = mask.reshape(mask.shape[0], 1, blocks, block, front + padded).unfold(-1, band, block)
    mask = mask.diagonal(dim1=2, dim2=4).permute(0, 1, 4, 2, 3)  # [Bm, 1, nb, block, band]
    mask = mask.unsqueeze(3)  # [Bm, 1, nb, 1, block, band]: one mask for every head

    scale = dim**-0.5 if scale is None else scale
    scores = torch.matmul(queries, keys.transpose(-1, -2)) * scale  # [B, Hk, nb, G * block, band]
    scores = scores.view(batch, kv_heads, blocks, groups, block, band)
    scores = scores.masked_fill(~mask, float("-inf")) if boolean else scores + mask
    if sinks is not None:
        sink = sinks.to(scores.dtype).reshape(1, kv_heads, 1, groups, 1, 1)
        scores = torch.cat([scores, sink.expand(*scores.shape[:-1], 1)], dim=-1)
        probs = torch.softmax(scores, dim=-1)[..., :band]
    else:
        probs = torch.softmax(scores, dim=-1)
    if boolean:
        probs = probs.masked_fill(~mask, 0.0)  # a row with no visible key: 0, not NaN
    out = torch.matmul(probs.reshape(batch, kv_heads, blocks, groups * block, band), values)
    out = out.view(batch, kv_heads, blocks, groups, block, dim).permute(0, 1, 3, 2, 4, 5)
    return out.reshape(batch, heads, padded, dim)[:, :, :length]


def grouped_decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per head, a KV head's G query heads as the G rows of one matmul: what SDPA (with
    `sinks`, GptOss's eager attention) computes over `repeat_kv`'s copy of the keys and values,
    reading each key once per KV head instead of once per query head.

    query [B, H, 1, D]; key, value [B, Hk, K, D] (H a multiple of Hk); mask broadcastable as
    [B or 1, 1, 1, K], boolean (True: attend) or additive; `sinks` [H] as in `banded_attention`.
    """
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    scale = dim**-0.5 if scale is None else scale
    scores = torch.matmul(query.reshape(batch, kv_heads, groups, dim), key.transpose(-1, -2)) * scale  # [B, Hk, G, K]
    boolean = mask is not None and mask.dtype == torch.bool
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if boolean else scores + mask
    if sinks is not None:
        sink = sinks.to(scores.dtype).reshape(1, kv_heads, groups, 1)
        scores = torch.cat([scores, sink.expand(*scores.shape[:-1], 1)], dim=-1)
        probs = torch.softmax(scores, dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    if boolean:
        probs = probs.masked_fill(~mask, 0.0)  # a row with no visible key: 0, not NaN
    return torch.matmul(probs, value).reshape(batch, heads, 1, value.shape[-1])


def chunked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    chunk: int,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Causal attention within chunks of `chunk` positions counted from 0, keys = the queries' own.

    query [B, H, T, D]; key, value [B, Hk, T, D]. The tail is padded to whole chunks; a padded key
    comes after every real query of its chunk, so `is_causal` hides it.
    """
    batch, heads, length, dim = query.shape
    chunks = _count(length, chunk)
    tail = chunks * chunk - length

    def by_chunk(x: torch.Tensor) -> torch.Tensor:
        h = x.shape[1]
        x = F.pad(x, (0, 0, 0, tail)).view(batch, h, chunks, chunk, x.shape[-1]).transpose(1, 2)
        return _contiguous(x).view(batch * chunks, h, chunk, x.shape[-1])

    out = F.scaled_dot_product_attention(
        by_chunk(query), by_chunk(key), by_chunk(value), is_causal=True, scale=scale, enable_gqa=enable_gqa
    )
    out = _contiguous(out).view(batch, chunks, heads, chunk, value.shape[-1]).transpose(1, 2)
    return _contiguous(out).view(batch, heads, chunks * chunk, value.shape[-1])[:, :, :length]


def _windows(x: torch.Tensor, band: int, block: int, blocks) -> torch.Tensor:
    """[B, H, L, D] -> [B, H, blocks, band, D]: rows n * block .. n * block + band - 1 of x.

    A gather, not `Tensor.unfold`: Inductor (torch 2.13) compiled the backward of an overlapping
    `unfold` wrong (key gradients off by O(1) where eager autograd was exact)."""
    index = torch.arange(band, device=x.device) + block * torch.arange(blocks, device=x.device)[:, None]
    return x.index_select(2, index.reshape(-1)).view(x.shape[0], x.shape[1], blocks, band, x.shape[-1])


def _count(length, block: int):
    """Blocks that cover `length`. A symbolic length (an exported program) gets one block more, so the
    count is never 1: a size-1 dimension makes torch.export specialize the program on it."""
    blocks = (length + block - 1) // block
    return blocks if isinstance(length, int) else blocks + 1


def _contiguous(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy, always: `reshape` and `contiguous` decide view-or-copy from the strides of
    the example shapes, which an exported program would then guard on (e.g. a prompt within one chunk)."""
    return x.clone(memory_format=torch.contiguous_format)
