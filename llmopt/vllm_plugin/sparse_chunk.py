"""Block-sparse attention of one prefill chunk over its request's whole context, blocks aligned to positions.

A chunk's queries are the last ``Lq`` of ``Lk`` positions. llmopt's selector cuts query blocks from the first
query on; a chunk that starts inside a block (chunk sizes are the scheduler's, decode tokens share its budget)
would shift every query block against the one-pass prefill's. So the chunk is padded at the front to the block
boundary with copies of its first query: each query block then covers the positions it covers in a one-pass
prefill, and gets the same selection, except the first block when it straddles the chunk boundary (its earlier
queries are gone; the copies stand in for them in the estimate).
"""

from __future__ import annotations

import torch

from llmopt.sparse.config import SparseAttentionConfig
from llmopt.sparse.selection import select_blocks
from llmopt.sparse.torch_attention import sparse_attention_torch
from llmopt.vllm_plugin.paged_kv import gather_kv


def sparse_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: SparseAttentionConfig,
                           scale: float) -> torch.Tensor:
    """q ``[1, H, Lq, D]``, k/v ``[1, Hkv, Lk, D]`` (Lk >= Lq; query i at position Lk - Lq + i) → o ``[1, H, Lq, D]``."""
    lq, lk = q.shape[2], k.shape[2]
    pad = (lk - lq) % config.block_size
    padded = torch.cat([q[:, :, :1].expand(-1, -1, pad, -1), q], dim=2) if pad else q
    selection = select_blocks(padded, k, config, scale)
    o = sparse_attention_torch(padded, k, v, selection.kv_num_blocks, selection.kv_indices,
                               block_size=config.block_size, scale=scale)
    return o[:, :, pad:]


def paged_sparse_prefill(query: torch.Tensor, kv_cache: torch.Tensor, blocks: torch.Tensor, seq_len: int,
                         config: SparseAttentionConfig, scale: float) -> torch.Tensor:
    """query ``[Lq, H, D]``, the last Lq of the `seq_len` positions of the request whose cache blocks are `blocks`
    (its row of vLLM's block table) → output ``[Lq, H, D]``."""
    k, v = gather_kv(kv_cache, blocks, seq_len)
    return sparse_chunk_attention(query.transpose(0, 1)[None], k, v, config, scale)[0].transpose(0, 1)
