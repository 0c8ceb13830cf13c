"""Query-aware adaptive block selection (FlexPrefill), shared per GQA group: per KV head, block top-mass or
vertical-slash, whichever the estimate supports.

Block top-mass keeps, per query block, the key blocks holding most of the block's estimated attention (a few
exact query rows per block). Where that estimate misreads the last query block (its Jensen-Shannon distance to the
block's exact attention exceeds `pattern_threshold`), the head's attention is not block-shaped; it then keeps the
key columns and the diagonals (query - key offsets) that hold most of the last query block's exact attention,
translated into the key blocks they cross in every query block (MInference's vertical-slash).

Index format (FlexAttention's), per KV head: ``kv_num_blocks [B, Hkv, Qb]`` and ``kv_indices [B, Hkv, Qb, Kb]``
(int32; the first ``kv_num_blocks`` entries are the selected key blocks, ascending). Blocks are square, of
``block_size``; attention is causal and the queries are the last ``Lq`` of the ``Lk`` positions (query ``i`` sits
at position ``Lk - Lq + i``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmopt.precision import native_bfloat16
from llmopt.sparse.config import SparseAttentionConfig

ESTIMATE_BUDGET = 1 << 20  # score elements per chunk of query blocks while estimating (4 MiB: stays in cache)
MIN_CHUNK = 4  # query blocks per chunk at least: fewer rows leave the matmul too small to run fast


@dataclass
class BlockSelection:
    """Selected key blocks per (batch, KV head, query block); `density`: selected / causally possible blocks."""

    kv_num_blocks: torch.Tensor  # [B, Hkv, Qb] int32
    kv_indices: torch.Tensor  # [B, Hkv, Qb, Kb] int32
    density: float
    selected_blocks: int
    causal_blocks: int
    vertical_slash: torch.Tensor  # [B, Hkv] bool: which selections took the vertical-slash pattern


def query_positions(lq: int, lk: int, block_size: int, device: torch.device) -> torch.Tensor:
    """``[Qb, block_size]`` positions of the (block-padded) queries: query i sits at ``lk - lq + i``."""
    qb = math.ceil(lq / block_size)
    return lk - lq + torch.arange(qb * block_size, device=device).view(qb, block_size)


def block_masks(lq: int, lk: int, config: SparseAttentionConfig,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(causal, forced), both ``[Qb, Kb]`` bool: key blocks a query block may see at all, and the ones always kept
    (the first `sink_blocks` and the diagonal band: every block a query of the block sits in, plus the
    `local_blocks` - 1 before it)."""
    bs = config.block_size
    positions = query_positions(lq, lk, bs, device).clamp(max=lk - 1)
    first, last = positions[:, 0] // bs, positions[:, -1] // bs  # [Qb]
    key_block = torch.arange(math.ceil(lk / bs), device=device)
    causal = key_block[None, :] <= last[:, None]
    local = key_block[None, :] >= (first - (config.local_blocks - 1))[:, None]
    sink = key_block[None, :] < config.sink_blocks
    return causal, causal & (local | sink)


def estimate_block_attention(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float | None = None,
                             rows: int = 4) -> torch.Tensor:
    """Estimated attention of each query block over key blocks, ``[B, Hkv, G, Qb, Kb]`` (rows sum to 1).

    `rows` queries per block, evenly spaced and ending with its last one, attend exactly (causal softmax over
    every key); their weights, summed per key block, are averaged. Costs ``rows / block_size`` of dense
    attention's score matmul; query blocks go in chunks to bound memory. q: ``[B, H, Lq, D]``; k: ``[B, Hkv,
    Lk, D]``.
    """
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    bs = block_size
    stride = bs // min(rows, bs)
    kb, qb = math.ceil(lk / bs), math.ceil(lq / bs)
    scale = d ** -0.5 if scale is None else scale
    # bf16 scores where the device has bf16 units (half of fp32's time on such CPUs, far finer than the sampling
    # error); keys laid out [D, Kb·bs] so that every chunk's matmul reads them in place
    dtype = torch.bfloat16 if native_bfloat16(q.device) else torch.float32
    keys = F.pad(k, (0, 0, 0, kb * bs - lk)).to(dtype).transpose(-1, -2).contiguous()
    # the last block's rows past Lq are the last query, so every sampled row is a real query
    sampled = torch.arange(stride - 1, qb * bs, stride, device=q.device).clamp(max=lq - 1)
    sampled = (q.index_select(2, sampled).float() * scale).to(dtype).view(b, hkv, h // hkv, -1, d)
    positions = query_positions(lq, lk, bs, q.device)[:, stride - 1::stride].clamp(max=lk - 1)  # [Qb, rows]
    per_block = positions.shape[1]
    chunk = max(MIN_CHUNK, ESTIMATE_BUDGET // (h * per_block * kb * bs))
    estimates = []
    for start in range(0, qb, chunk):
        stop = min(start + chunk, qb)
        seen = (int(positions[stop - 1, -1]) // bs + 1) * bs  # key blocks this chunk can see: skip the rest
        scores = sampled[:, :, :, start * per_block:stop * per_block].flatten(2, 3) @ keys[..., :seen]
        scores = scores.float().view(b, hkv, h // hkv, stop - start, per_block, seen)
        tail = int(positions[start, 0]) + 1  # only the keys past the chunk's first query can be hidden
        hidden = torch.arange(tail, seen, device=q.device) > positions[start:stop, :, None]
        scores[..., tail:].masked_fill_(hidden, float("-inf"))
        estimate = scores.softmax(-1).view(*scores.shape[:-1], seen // bs, bs).sum(-1).mean(-2)
        estimates.append(F.pad(estimate, (0, kb - seen // bs)))
    return torch.cat(estimates, dim=3)


def top_mass(probabilities: torch.Tensor, forced: torch.Tensor, mass: float) -> torch.Tensor:
    """``[..., Kb]`` bool: per row, the forced blocks and then the most probable blocks until their estimated
    mass (forced blocks included) reaches `mass`."""
    priority = probabilities.masked_fill(forced, 2.0)  # forced blocks sort first (probabilities are <= 1)
    order = priority.argsort(-1, descending=True)
    ranked = probabilities.gather(-1, order)
    needed = (ranked.cumsum(-1) - ranked) < mass  # the mass gathered before this block falls short
    return torch.zeros_like(needed).scatter_(-1, order, needed) | forced


def to_indices(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, Hkv, Qb, Kb]`` bool → (kv_num_blocks ``[B, Hkv, Qb]``, kv_indices ``[B, Hkv, Qb, Kb]``) int32."""
    order = (~keep).to(torch.uint8).argsort(dim=-1, stable=True)  # selected blocks first, ascending
    return keep.sum(-1, dtype=torch.int32), order.to(torch.int32)


def last_block_attention(q: torch.Tensor, k: torch.Tensor, block_size: int,
                         scale: float | None = None) -> torch.Tensor:
    """Exact causal attention of the last query block's queries, ``[B, Hkv, G, R, Lk]`` (R of them, rows sum
    to 1). q: ``[B, H, Lq, D]``; k: ``[B, Hkv, Lk, D]``."""
    b, h, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    rows = lq - (math.ceil(lq / block_size) - 1) * block_size
    scale = d ** -0.5 if scale is None else scale
    last = q[:, :, lq - rows:].float().reshape(b, hkv, h // hkv * rows, d) * scale
    scores = (last @ k.float().transpose(-1, -2)).view(b, hkv, h // hkv, rows, lk)
    hidden = torch.ones(rows, rows, dtype=torch.bool, device=q.device).triu(1)  # among the last R keys only
    scores[..., lk - rows:].masked_fill_(hidden, float("-inf"))
    return scores.softmax(-1)


def js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon distance (natural log: 0 to sqrt(ln 2)) between distributions along the last axis."""
    m = (p + q) / 2
    divergence = (torch.xlogy(p, p) - torch.xlogy(p, m) + torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1) / 2
    return divergence.clamp(min=0).sqrt()


def crossed_blocks(columns: torch.Tensor, offsets: torch.Tensor, lq: int, block_size: int) -> torch.Tensor:
    """``[B, Hkv, Qb, Kb]`` bool: per query block, the key blocks that hold a selected key column or that a
    selected query - key offset (diagonal) crosses, causal or not. columns, offsets: ``[B, Hkv, Lk]`` bool."""
    lk, bs = columns.shape[-1], block_size
    kb = math.ceil(lk / bs)
    column_blocks = F.pad(columns, (0, kb * bs - lk)).view(*columns.shape[:2], kb, bs).any(-1)
    # offset o crosses, in each query block, the key blocks (o - e) // bs and (o - e + bs - 1) // bs before the one
    # holding the block's first query, e being that query's place in its key block (a negative: that block)
    crossed = torch.zeros(*columns.shape[:2], kb + 1, device=columns.device)
    for shift in (0, bs - 1):
        distance = ((torch.arange(lk, device=columns.device) - (lk - lq) % bs + shift) // bs).clamp(0, kb)
        crossed.scatter_add_(-1, distance.expand_as(offsets), offsets.float())
    query_block = (lk - lq) // bs + torch.arange(math.ceil(lq / bs), device=columns.device)
    distance = (query_block[:, None] - torch.arange(kb, device=columns.device)).clamp(0, kb)  # [Qb, Kb]
    return column_blocks[:, :, None, :] | (crossed > 0)[:, :, distance]


def vertical_slash(attention: torch.Tensor, lq: int, mass: float, block_size: int) -> torch.Tensor:
    """``[B, Hkv, Qb, Kb]`` bool: the key blocks crossed by the fewest key columns (verticals) and the fewest
    query - key offsets (slashes) holding `mass` each of the last query block's `attention` ``[B, Hkv, G, R,
    Lk]``."""
    rows, lk = attention.shape[3], attention.shape[4]
    columns = attention.sum((2, 3))  # [B, Hkv, Lk]
    keys = torch.arange(lk - rows, lk, device=attention.device)[:, None] - torch.arange(lk, device=attention.device)
    diagonals = attention.gather(-1, keys.clamp(min=0).expand_as(attention)).masked_fill_(keys < 0, 0).sum((2, 3))
    nothing = torch.zeros_like(columns, dtype=torch.bool)
    return crossed_blocks(top_mass(columns / columns.sum(-1, keepdim=True), nothing, mass),
                          top_mass(diagonals / diagonals.sum(-1, keepdim=True), nothing, mass), lq, block_size)


def select_blocks(q: torch.Tensor, k: torch.Tensor, config: SparseAttentionConfig,
                  scale: float | None = None) -> BlockSelection:
    """Per KV head and query block, the fewest key blocks holding `config.mass` of the attention, averaged over
    the query heads of the group, plus the sink and the diagonal band; block top-mass or vertical-slash per KV
    head, as the estimate of the last query block matches its exact attention or not (`pattern_threshold`).

    q: ``[B, H, Lq, D]``; k: ``[B, Hkv, Lk, D]`` (post-RoPE). mass 1.0 keeps every causal block.
    """
    b, hkv, lq, lk = q.shape[0], k.shape[1], q.shape[2], k.shape[2]
    causal, forced = block_masks(lq, lk, config, q.device)
    misread = torch.zeros(b, hkv, dtype=torch.bool, device=q.device)
    if config.mass >= 1.0:
        keep = causal.expand(b, hkv, *causal.shape)
    else:
        probabilities = estimate_block_attention(q, k, config.block_size, scale).mean(2)  # [B, Hkv, Qb, Kb]
        keep = top_mass(probabilities, forced, config.mass) & causal
        attention = last_block_attention(q, k, config.block_size, scale)
        kb = causal.shape[1]
        exact = F.pad(attention.mean((2, 3)), (0, kb * config.block_size - lk)).view(b, hkv, kb, -1).sum(-1)
        misread = js_distance(probabilities[:, :, -1], exact) > config.pattern_threshold  # [B, Hkv]
        if misread.any():
            pattern = vertical_slash(attention, lq, config.mass, config.block_size) & causal | forced
            keep = torch.where(misread[..., None, None], pattern, keep)
    kv_num_blocks, kv_indices = to_indices(keep)
    selected, possible = int(kv_num_blocks.sum()), int(causal.sum()) * b * hkv
    return BlockSelection(kv_num_blocks, kv_indices, selected / possible, selected, possible, misread)
