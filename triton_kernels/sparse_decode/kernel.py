"""Sparse decode attention in Triton over a contiguous or paged KV cache.

One program per (sequence, KV head) serves the query heads of that GQA group together (one K/V read for all
of them) and runs an online softmax over the pages selected for the KV head; the loop bound is the selection
count, so unselected pages are never read.
"""

import math

import torch
import triton
import triton.language as tl

from llmopt.triton_kernels.launch import check_devices, check_dtypes, check_index, on_device

_PAGE_SIZES = (16, 32, 64, 128)
_FILL_NAN = False  # tests set it so that an output element the kernel never writes shows up as NaN
_LAUNCH_OPTIONS = {"num_warps": 4, "num_stages": 2}  # one config: tiles are at most 128 x 128


@triton.jit
def _sparse_decode_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, pages_ptr, counts_ptr, seqlens_ptr, table_ptr,
        stride_qb, stride_qh, stride_ob, stride_oh, stride_k_seq, stride_k_page, stride_kh, stride_kn,
        stride_v_seq, stride_v_page, stride_vh, stride_vn, stride_table,
        num_kv_heads, num_slots, head_dim, qk_scale,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
        PAGED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    b = (tl.program_id(0) // num_kv_heads).to(tl.int64)  # int64: cache strides times B can pass 2**31
    kv_h = tl.program_id(0) % num_kv_heads
    group_rows = tl.arange(0, BLOCK_G)  # tl.dot needs 16 rows: a group of fewer heads is padded
    heads = kv_h * GROUP + group_rows
    dims = tl.arange(0, BLOCK_D)
    tokens = tl.arange(0, PAGE_SIZE)
    q_mask = (group_rows < GROUP)[:, None] & (dims < head_dim)[None, :]
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=q_mask, other=0.0)
    seqlen = tl.load(seqlens_ptr + b)
    selection = b * num_kv_heads + kv_h
    count = tl.minimum(tl.load(counts_ptr + selection), num_slots)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for j in range(count):
        page = tl.load(pages_ptr + selection * num_slots + j)
        token_mask = page * PAGE_SIZE + tokens < seqlen
        if PAGED:
            # the block table is unset past the sequence's last page: never read it there
            physical = tl.load(table_ptr + b * stride_table + page, mask=page * PAGE_SIZE < seqlen, other=0)
            k_page = k_ptr + physical.to(tl.int64) * stride_k_page
            v_page = v_ptr + physical.to(tl.int64) * stride_v_page
        else:
            k_page = k_ptr + b * stride_k_seq + page.to(tl.int64) * stride_k_page
            v_page = v_ptr + b * stride_v_seq + page.to(tl.int64) * stride_v_page
        k_t = tl.load(k_page + kv_h * stride_kh + tokens[None, :] * stride_kn + dims[:, None],
                      mask=(dims < head_dim)[:, None] & token_mask[None, :], other=0.0)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(token_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: exp2(-inf - 0) = 0, no NaN
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        v = tl.load(v_page + kv_h * stride_vh + tokens[:, None] * stride_vn + dims[None, :],
                    mask=token_mask[:, None] & (dims < head_dim)[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a head that saw no key keeps acc = 0
    tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + dims[None, :], o.to(o_ptr.dtype.element_ty),
             mask=q_mask)



def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_size: int,
                 block_table: torch.Tensor | None) -> None:
    layout = "[B, Hkv, Lmax, D]" if block_table is None else "[num_pages, Hkv, page_size, D]"
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q must be [B, H, D] and k_cache, v_cache one {layout} shape; got q "
                         f"{list(q.shape)}, k_cache {list(k_cache.shape)}, v_cache {list(v_cache.shape)}")
    check_dtypes("q, k_cache, v_cache", q, k_cache, v_cache)
    (batch, heads, head_dim), (kv_heads, kv_dim) = q.shape, (k_cache.shape[1], k_cache.shape[3])
    if kv_dim != head_dim or (block_table is None and k_cache.shape[0] != batch):
        raise ValueError(f"a {layout} cache must match q's head dim (and batch when contiguous): "
                         f"q {list(q.shape)}, k_cache {list(k_cache.shape)}")
    if block_table is not None and k_cache.shape[2] != page_size:
        raise ValueError(f"a paged cache holds page_size ({page_size}) tokens a page, got {k_cache.shape[2]}")
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of KV heads ({kv_heads})")
    if not 16 <= head_dim <= 128:
        raise ValueError(f"head dim must be in [16, 128], got {head_dim}")
    if page_size not in _PAGE_SIZES:
        raise ValueError(f"page_size must be one of {_PAGE_SIZES}, got {page_size}")


def _check_selection(q: torch.Tensor, k_cache: torch.Tensor, page_indices: torch.Tensor,
                     page_counts: torch.Tensor, cache_seqlens: torch.Tensor,
                     block_table: torch.Tensor | None) -> None:
    batch, kv_heads = q.shape[0], k_cache.shape[1]
    check_index("page_indices", page_indices, (batch, kv_heads, page_indices.shape[-1]))
    check_index("page_counts", page_counts, (batch, kv_heads))
    check_index("cache_seqlens", cache_seqlens, (batch,))
    if block_table is not None:
        check_index("block_table", block_table, (batch, block_table.shape[-1]))


def _cache_strides(cache: torch.Tensor, page_size: int, paged: bool) -> tuple[int, int, int, int]:
    """(sequence, page, head, token) strides; a contiguous cache's page is ``page_size`` tokens in a row."""
    if paged:
        return 0, cache.stride(0), cache.stride(1), cache.stride(2)
    return cache.stride(0), page_size * cache.stride(2), cache.stride(1), cache.stride(2)


def sparse_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            page_indices: torch.Tensor, page_counts: torch.Tensor, *, page_size: int,
                            cache_seqlens: torch.Tensor, block_table: torch.Tensor | None = None,
                            scale: float | None = None) -> torch.Tensor:
    """Attention of one new query per sequence over only the selected pages of its KV cache.

    q ``[B, H, D]`` (the new token's K/V already in the cache), H a multiple of Hkv, D in [16, 128].
    Contiguous cache: k_cache, v_cache ``[B, Hkv, Lmax, D]``, block_table None, a page is ``page_size``
    consecutive tokens. Paged cache: ``[num_pages, Hkv, page_size, D]`` and block_table ``[B, max_pages]``
    int32 mapping a sequence's logical page to a physical one. page_size 16, 32, 64 or 128.
    cache_seqlens ``[B]`` int32: valid tokens per sequence (at most Lmax, or max_pages * page_size).
    page_indices ``[B, Hkv, P]`` int32: logical pages selected per KV head (each below ceil(Lmax / page_size),
    or max_pages), the first page_counts ``[B, Hkv]`` int32 of them valid. A query that sees no key gets 0.
    fp16, bf16 or fp32; accumulates in fp32; returns o ``[B, H, D]`` in q's dtype.
    """
    _check_cache(q, k_cache, v_cache, page_size, block_table)
    _check_selection(q, k_cache, page_indices, page_counts, cache_seqlens, block_table)
    check_devices(_sparse_decode_kernel, q, k_cache, v_cache, page_indices, page_counts, cache_seqlens,
                   *([] if block_table is None else [block_table]))
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if _FILL_NAN:
        o.fill_(math.nan)
    (batch, heads, head_dim), kv_heads = q.shape, k_cache.shape[1]
    paged = block_table is not None
    table = block_table.contiguous() if paged else None
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    group = heads // kv_heads
    block_g, block_d = max(16, triton.next_power_of_2(group)), triton.next_power_of_2(head_dim)
    with on_device(q.device):
        _sparse_decode_kernel[(batch * kv_heads,)](
            q, k_cache, v_cache, o, page_indices.contiguous(), page_counts.contiguous(),
            cache_seqlens.contiguous(), table, q.stride(0), q.stride(1), o.stride(0), o.stride(1),
            *_cache_strides(k_cache, page_size, paged), *_cache_strides(v_cache, page_size, paged),
            table.shape[1] if paged else 0, kv_heads, page_indices.shape[-1], head_dim,
            scale * math.log2(math.e), GROUP=group, BLOCK_G=block_g, BLOCK_D=block_d, PAGE_SIZE=page_size,
            PAGED=paged, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **_LAUNCH_OPTIONS)
    return o
