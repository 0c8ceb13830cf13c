"""Block-sparse causal attention in plain torch: the dense mask built from the block indices, then plain
softmax attention."""

import math

import torch


def _block_mask(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor) -> torch.Tensor:
    """Selected key blocks as booleans ``[B, Hkv, Qb, Kb]`` from FlexAttention's ``kv_num_blocks
    [B, Hkv, Qb]`` and ``kv_indices [B, Hkv, Qb, Kb]`` (the first ``kv_num_blocks`` of a row count)."""
    valid = torch.arange(kv_indices.shape[-1], device=kv_indices.device) < kv_num_blocks[..., None]
    indices = torch.where(valid, kv_indices, 0).long()  # entries past the count may hold anything
    hits = torch.zeros(kv_indices.shape, dtype=torch.int32, device=kv_indices.device)
    return hits.scatter_add_(-1, indices, valid.int()) > 0


def naive_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, *, block_size: int,
                                 scale: float | None = None,
                                 kv_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each query over the key blocks selected for its query block, computed densely.

    q ``[B, H, Lq, D]``; k, v ``[B, Hkv, Lk, D]`` (H a multiple of Hkv; query i sits at position Lk - Lq + i);
    kv_num_blocks ``[B, Hkv, ceil(Lq/block_size)]``, kv_indices ``[B, Hkv, ceil(Lq/block_size),
    ceil(Lk/block_size)]``; kv_lens ``[B]`` masks keys at or past it. A query that sees no key gets 0.
    Computes in float32; returns o ``[B, H, Lq, D]`` in q's dtype.
    """
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    selected = _block_mask(kv_num_blocks, kv_indices).repeat_interleave(block_size, -2)[..., :q_len, :]
    selected = selected.repeat_interleave(block_size, -1)[..., :kv_len].repeat_interleave(group, 1)
    q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
    k_pos = torch.arange(kv_len, device=q.device)
    lens = torch.full((batch,), kv_len, device=q.device) if kv_lens is None else kv_lens.to(q.device)
    visible = (k_pos <= q_pos[:, None]) & (k_pos < lens[:, None, None, None])
    mask = selected & visible
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    scores = q.float() @ k.float().repeat_interleave(group, 1).transpose(-1, -2) * scale
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    probs = torch.where(mask.any(-1, keepdim=True), probs, 0.0)  # a fully masked row's softmax is NaN
    return (probs @ v.float().repeat_interleave(group, 1)).to(q.dtype)
