"""Query-aware adaptive block selection (FlexPrefill-style block top-mass, shared per GQA group).

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

from llmopt.sparse.config import SparseAttentionConfig

ESTIMATE_BUDGET = 1 << 20  # score elements per chunk of query blocks while estimating (4 MiB: stays in cache)


@dataclass
class BlockSelection:
    """Selected key blocks per (batch, KV head, query block); `density`: selected / causally possible blocks."""

    kv_num_blocks: torch.Tensor  # [B, Hkv, Qb] int32
    kv_indices: torch.Tensor  # [B, Hkv, Qb, Kb] int32
    density: float
    selected_blocks: int
    causal_blocks: int


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
    keys = F.pad(k, (0, 0, 0, kb * bs - lk)).float().transpose(-1, -2)  # [B, Hkv, D, Kb·bs]
    # the last block is padded with copies of the last query, so every sampled row is a real query
    sampled = F.pad(q, (0, 0, 0, qb * bs - lq), mode="replicate").view(b, hkv, -1, qb, bs, d)
    sampled = sampled[:, :, :, :, stride - 1::stride].float() * scale  # [B, Hkv, G, Qb, rows, D]
    positions = query_positions(lq, lk, bs, q.device)[:, stride - 1::stride].clamp(max=lk - 1)  # [Qb, rows]
    chunk = max(1, ESTIMATE_BUDGET // (h * sampled.shape[4] * kb * bs))
    estimates = []
    for start in range(0, qb, chunk):
        stop = min(start + chunk, qb)
        seen = (int(positions[stop - 1, -1]) // bs + 1) * bs  # key blocks this chunk can see: skip the rest
        scores = sampled[:, :, :, start:stop].flatten(2, 4) @ keys[..., :seen]  # [B, Hkv, G·c·rows, seen]
        scores = scores.view(b, hkv, h // hkv, stop - start, -1, seen)
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


def select_blocks(q: torch.Tensor, k: torch.Tensor, config: SparseAttentionConfig,
                  scale: float | None = None) -> BlockSelection:
    """Per KV head and query block, the fewest key blocks holding `config.mass` of the estimated attention,
    averaged over the query heads of the group, plus the sink and the diagonal band.

    q: ``[B, H, Lq, D]``; k: ``[B, Hkv, Lk, D]`` (post-RoPE). mass 1.0 keeps every causal block.
    """
    b, hkv, lq, lk = q.shape[0], k.shape[1], q.shape[2], k.shape[2]
    causal, forced = block_masks(lq, lk, config, q.device)
    if config.mass >= 1.0:
        keep = causal.expand(b, hkv, *causal.shape)
    else:
        probabilities = estimate_block_attention(q, k, config.block_size, scale)
        keep = top_mass(probabilities.mean(2), forced, config.mass) & causal
    kv_num_blocks, kv_indices = to_indices(keep)
    selected, possible = int(kv_num_blocks.sum()), int(causal.sum()) * b * hkv
    return BlockSelection(kv_num_blocks, kv_indices, selected / possible, selected, possible)
