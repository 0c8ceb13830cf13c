"""Attention for the kept tokens of a routed block only, over vLLM's paged CPU KV cache.

vLLM's CPU kernel assumes a request's queries are the last positions of its context. The kept tokens of a step are
not (skipped tokens sit between them), so they are regrouped: each run of consecutive kept tokens of one request
becomes a request of its own, whose context ends at its last token. The kernel then runs causal attention for
exactly the kept queries; every K/V of the step, skipped tokens' included, is in the cache before it runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from vllm import _custom_ops as ops
from vllm import envs
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.attention.attention import unified_kv_cache_update
from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata


def step_metadata(attn: Attention) -> CPUAttentionMetadata | None:
    """This step's attention metadata of `attn` (None in vLLM's dummy and profiling runs)."""
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):
        metadata = metadata[0]
    return metadata.get(attn.layer_name) if isinstance(metadata, dict) else None


def write_kv(attn: Attention, key: torch.Tensor, value: torch.Tensor) -> None:
    """Store the step's key/value ``[T, Hkv·D]`` (every token, skipped ones included) in `attn`'s cache."""
    unified_kv_cache_update(key.view(-1, attn.num_kv_heads, attn.head_size),
                            value.view(-1, attn.num_kv_heads, attn.head_size), attn.layer_name)


def kept_attention(attn: Attention, metadata: CPUAttentionMetadata, query: torch.Tensor, rows: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
    """query ``[n, H·D]`` of the kept `rows` (ascending indices into the step's flat batch), `positions` ``[T]``
    of the whole batch → attention output ``[n, H·D]``, causal over each token's request context."""
    request = torch.searchsorted(metadata.query_start_loc[1:], rows.to(metadata.query_start_loc.dtype), right=True)
    starts = torch.ones_like(rows, dtype=torch.bool)
    starts[1:] = (rows[1:] != rows[:-1] + 1) | (request[1:] != request[:-1])
    run_lengths = torch.bincount(starts.cumsum(0) - 1)
    last = run_lengths.cumsum(0) - 1
    seq_lens = (positions[rows[last]] + 1).to(metadata.seq_lens.dtype)
    query_start_loc = F.pad(run_lengths.cumsum(0), (1, 0)).to(metadata.query_start_loc.dtype)
    impl = attn.impl
    runs = CPUAttentionMetadata(
        num_actual_tokens=len(rows), max_query_len=int(run_lengths.max()), query_start_loc=query_start_loc,
        max_seq_len=int(seq_lens.max()), seq_lens=seq_lens, block_table=metadata.block_table[request[last]],
        slot_mapping=metadata.slot_mapping[:0], causal=True,
        scheduler_metadata=ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(last), num_heads=impl.num_heads, num_kv_heads=impl.num_kv_heads, head_dim=impl.head_size,
            seq_lens=seq_lens, dtype=query.dtype, query_start_loc=query_start_loc, causal=True,
            sliding_window_size=-1, isa=attn.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            kv_cache_dtype=impl.kv_cache_dtype))
    output = query.new_empty(len(rows), impl.num_heads, impl.head_size)
    impl.forward(attn, query.view(len(rows), impl.num_heads, impl.head_size), None, None, attn.kv_cache, runs,
                 output)
    return output.view(len(rows), -1)
