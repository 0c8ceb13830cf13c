"""Block-sparse causal attention in torch that really skips the unselected blocks (the CPU path).

Per (query block, KV head) pair, the work splits in two, merged by their log-sum-exps:
- the diagonal band (the one or two key blocks holding the query block's own positions), at the same offset for
  every query block, so one strided view of K/V and one causal mask serve all pairs; always attended;
- the selected blocks before it, all fully visible: gathered into a padded sequence (pairs sorted by their
  number of blocks, cut into memory-bounded chunks), with a padding mask broadcast over the queries.
Both run through the CPU flash-attention kernel; the query heads of a GQA group share one K/V, never copied.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GATHER_BUDGET = 1 << 21  # gathered K and V elements per chunk (8 MiB in fp32: small chunks stay in cache)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                    scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(o ``[n, G, L, D]``, logsumexp ``[n, G, L]``) of q ``[n, G, L, D]`` over k, v ``[n, 1, S, D]``, with an
    additive `bias` ``[n or 1, 1, G·L or 1, S]``. The G heads share K/V, so they run as one head of G·L rows
    (longer query tiles); the public SDPA does not return the logsumexp."""
    n, g, length, d = q.shape
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.reshape(n, 1, g * length, d), k, v, attn_mask=bias, scale=scale)
    return o.view(n, g, length, d), lse.view(n, g, length)


def chunk_bounds(widths: list[int], cost_per_block: int, budget: int) -> list[tuple[int, int, int]]:
    """Consecutive ranges ``(start, stop, width)`` of ascending `widths`, each padded to its widest entry: a
    range ends before it would exceed `budget` elements, or waste over a fifth of a large one on padding."""
    chunks, start, used = [], 0, 0
    for j, w in enumerate(widths):
        padded = w * (j + 1 - start) * cost_per_block
        if j > start and (padded > budget or (padded > budget // 8 and padded > 1.25 * (used + w) * cost_per_block)):
            chunks.append((start, j, widths[j - 1]))
            start, used = j, 0
        used += w
    chunks.append((start, len(widths), widths[-1]))
    return chunks


def diagonal_band(queries: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lq: int, bs: int,
                  scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query block over its diagonal band: (o ``[N, G, bs, D]``, lse ``[N, G, bs]``).

    queries: ``[N, G, bs, D]``, pairs in (batch, KV head, query block) order; k, v: ``[B, Hkv, Lk, D]``.
    """
    b, hkv, lk, d = k.shape
    qb = queries.shape[0] // (b * hkv)
    offset = lk - lq
    band, first = (1 if offset % bs == 0 else 2), offset // bs  # first: key block of query 0
    length = (first + qb + band - 1) * bs

    def windows(x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, length - lk))
        strides = (hkv * length * d, length * d, bs * d, d, 1)
        return x.as_strided((b, hkv, qb, band * bs, d), strides, first * bs * d).reshape(-1, 1, band * bs, d)

    key, row = torch.arange(band * bs, device=k.device), torch.arange(bs, device=k.device)
    causal = key[None, :] <= (offset % bs + row)[:, None]  # [bs, band·bs], the same for every query block
    bias = torch.zeros((), dtype=k.dtype, device=k.device).where(causal, float("-inf")).repeat(queries.shape[1], 1)
    return flash_attention(queries, windows(k), windows(v), bias, scale)


def add_selected_blocks(out: torch.Tensor, lse: torch.Tensor, queries: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, counts: torch.Tensor, kv_indices: torch.Tensor, bs: int,
                        scale: float | None) -> torch.Tensor:
    """Merge into the band attention (out ``[N, G, bs, D]``, lse ``[N, G, bs]``) each pair's attention over its
    first `counts` ``[N]`` selected blocks (``kv_indices [N, Kb]``), all before its band and so fully visible.
    Returns the merged output ``[N, G, bs, D]``."""
    b, hkv, lk, d = k.shape
    kb = math.ceil(lk / bs)
    order = counts.argsort()
    widths = counts[order].tolist()
    skip = widths.count(0)
    if skip == len(widths):
        return out
    order = order[skip:]  # pairs with blocks to add, fewest first; the rest keep their band attention
    keys = F.pad(k, (0, 0, 0, kb * bs - lk)).view(b * hkv * kb, bs * d)
    values = F.pad(v, (0, 0, 0, kb * bs - lk)).view(b * hkv * kb, bs * d)
    pair_head = torch.arange(b * hkv, device=k.device).repeat_interleave(len(widths) // (b * hkv))
    slots = kv_indices[order, :widths[-1]].long()
    empty = torch.arange(widths[-1], device=k.device) >= counts[order, None]  # [n, W]
    rows = (slots + pair_head[order, None] * kb).masked_fill_(empty, 0)
    bias = torch.zeros((), dtype=k.dtype, device=k.device).where(~empty, float("-inf")).repeat_interleave(bs, -1)
    q_sorted, o_sorted, lse_sorted = queries[order], out[order], lse[order]
    for start, stop, w in chunk_bounds(widths[skip:], bs * d * 2, GATHER_BUDGET):
        n = stop - start
        block_k = F.embedding(rows[start:stop, :w], keys).view(n, 1, w * bs, d)
        block_v = F.embedding(rows[start:stop, :w], values).view(n, 1, w * bs, d)
        o, l = flash_attention(q_sorted[start:stop], block_k, block_v, bias[start:stop, None, None, :w * bs],
                               scale)
        weight = (l - lse_sorted[start:stop]).sigmoid_()[..., None]  # share of the new blocks in the total
        o_sorted[start:stop].lerp_(o, weight.to(o.dtype))
    return out.index_copy_(0, order, o_sorted)


def sparse_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                           kv_indices: torch.Tensor, *, block_size: int, scale: float | None = None) -> torch.Tensor:
    """Causal attention of each query over its selected key blocks only (and always its diagonal band).

    q: ``[B, H, Lq, D]``; k, v: ``[B, Hkv, Lk, D]`` (H a multiple of Hkv; query i at position Lk - Lq + i);
    kv_num_blocks ``[B, Hkv, Qb]``, kv_indices ``[B, Hkv, Qb, Kb]`` int (FlexAttention's format, in any order;
    blocks past a query block's diagonal are ignored). fp16 computes in fp32 (CPU fp16 matmuls are slow), fp32
    and bf16 in their own dtype. Returns o ``[B, H, Lq, D]`` in q's dtype.
    """
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g, bs = h // hkv, block_size
    qb = math.ceil(lq / bs)
    input_dtype = q.dtype
    dtype = torch.float32 if q.dtype == torch.float16 else q.dtype
    # contiguous: the band's strided windows and the block rows assume it (transformers' keys are transposed views)
    q, k, v = q.to(dtype), k.to(dtype).contiguous(), v.to(dtype).contiguous()
    queries = F.pad(q, (0, 0, 0, qb * bs - lq)).view(b, hkv, g, qb, bs, d).transpose(2, 3).reshape(-1, g, bs, d)
    out, lse = diagonal_band(queries, k, v, lq, bs, scale)
    band_start = (lk - lq) // bs + torch.arange(qb, device=q.device)  # [Qb] first key block of each band
    valid = torch.arange(kv_indices.shape[-1], device=q.device) < kv_num_blocks[..., None]
    before_band = valid & (kv_indices < band_start[:, None])
    first = kv_indices.gather(-1, (~before_band).to(torch.uint8).argsort(dim=-1, stable=True))  # those first
    out = add_selected_blocks(out, lse, queries, k, v, before_band.sum(-1).flatten(), first.flatten(0, 2), bs, scale)
    out = out.view(b, hkv, qb, g, bs, d).transpose(2, 3).reshape(b, h, qb * bs, d)
    return out[:, :, :lq].to(input_dtype)
