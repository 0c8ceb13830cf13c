"""vLLM's C++ CPU attention kernel, called on any paged cache in its layout (`paged_kv`): the main one, or one
gathered from it."""

from __future__ import annotations

import torch
from vllm import _custom_ops as ops
from vllm import envs


def kernel_metadata(q: torch.Tensor, key_cache: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                    isa: str) -> torch.Tensor:
    """The kernel's schedule for queries q ``[T, H, D]`` of requests cut by `query_start_loc` ``[N + 1]`` (int32),
    causal over their `seq_lens` ``[N]`` (int32) keys in `key_cache` ``[blocks, Hkv, block, D]``; one per step
    in vLLM, shared by the layers."""
    return ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(seq_lens), num_heads=q.shape[1], num_kv_heads=key_cache.shape[1], head_dim=q.shape[2],
        seq_lens=seq_lens, dtype=q.dtype, query_start_loc=query_start_loc, causal=True, sliding_window_size=-1,
        isa=isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV)


def kernel_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, out: torch.Tensor,
                     query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor, scale: float,
                     metadata: torch.Tensor) -> torch.Tensor:
    """Causal attention of q ``[T, H, D]`` into `out` (same shape): request i's queries are the last of its
    `seq_lens[i]` positions, its keys and values in the blocks of row i of `block_table` ``[N, W]`` (int32);
    `metadata` from `kernel_metadata`. Returns `out`."""
    ops.cpu_attention_with_kv_cache(
        query=q, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=query_start_loc,
        seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1, block_table=block_table,
        softcap=0.0, scheduler_metadata=metadata, s_aux=None)
    return out
