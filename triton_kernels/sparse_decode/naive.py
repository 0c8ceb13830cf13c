"""Sparse decode attention in plain torch: the cache laid out per sequence, then a dense mask of the selected
pages."""

import math

import torch


def _contiguous_cache(cache: torch.Tensor, block_table: torch.Tensor,
                      num_valid_pages: torch.Tensor) -> torch.Tensor:
    """A paged cache ``[num_pages, Hkv, page_size, D]`` as ``[B, Hkv, max_pages * page_size, D]`` per
    sequence; block-table entries past a sequence's ``num_valid_pages`` may hold anything: read as page 0."""
    logical = torch.arange(block_table.shape[1], device=block_table.device)
    pages = torch.where(logical < num_valid_pages[:, None], block_table, 0).long()
    return cache[pages].permute(0, 2, 1, 3, 4).flatten(2, 3)


def _page_mask(page_indices: torch.Tensor, page_counts: torch.Tensor, num_pages: int) -> torch.Tensor:
    """Selected logical pages as booleans ``[B, Hkv, num_pages]`` (the first ``page_counts`` count)."""
    valid = torch.arange(page_indices.shape[-1], device=page_indices.device) < page_counts[..., None]
    indices = torch.where(valid, page_indices, 0).long()
    hits = torch.zeros(*page_indices.shape[:2], num_pages, dtype=torch.int32, device=page_indices.device)
    return hits.scatter_add_(-1, indices, valid.int()) > 0


def naive_sparse_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  page_indices: torch.Tensor, page_counts: torch.Tensor, *, page_size: int,
                                  cache_seqlens: torch.Tensor, block_table: torch.Tensor | None = None,
                                  scale: float | None = None) -> torch.Tensor:
    """Attention of one new query per sequence over the selected pages of its KV cache, computed densely.

    q ``[B, H, D]``; contiguous cache: k_cache, v_cache ``[B, Hkv, Lmax, D]``; paged cache: ``[num_pages,
    Hkv, page_size, D]`` with block_table ``[B, max_pages]`` mapping logical to physical pages.
    cache_seqlens ``[B]``: valid tokens per sequence; page_indices ``[B, Hkv, P]``: logical pages selected per
    KV head, the first page_counts ``[B, Hkv]`` of them valid. A query that sees no key gets 0.
    Computes in float32; returns o ``[B, H, D]`` in q's dtype.
    """
    if block_table is not None:
        num_valid_pages = (cache_seqlens + page_size - 1) // page_size
        k_cache, v_cache = (_contiguous_cache(c, block_table, num_valid_pages) for c in (k_cache, v_cache))
    heads, (kv_heads, length) = q.shape[1], k_cache.shape[1:3]
    group = heads // kv_heads
    selected = _page_mask(page_indices, page_counts, math.ceil(length / page_size))
    selected = selected.repeat_interleave(page_size, -1)[..., :length]
    valid = torch.arange(length, device=q.device) < cache_seqlens[:, None, None]
    mask = (selected & valid).repeat_interleave(group, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    keys, values = (c.float().repeat_interleave(group, 1) for c in (k_cache, v_cache))
    scores = torch.einsum("bhd,bhld->bhl", q.float(), keys) * scale
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    probs = torch.where(mask.any(-1, keepdim=True), probs, 0.0)  # a fully masked row's softmax is NaN
    return torch.einsum("bhl,bhld->bhd", probs, values).to(q.dtype)
