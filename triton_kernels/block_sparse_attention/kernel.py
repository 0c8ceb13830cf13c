"""Block-sparse causal attention for prefill in Triton.

One program per (query block, batch x head) runs an online softmax over the key blocks selected for its KV
head; the loop bound is the selection count, so unselected blocks cost nothing.
"""

import math

import torch
import triton
import triton.language as tl

from llmopt.triton_kernels.launch import check_devices, check_dtypes, check_index, on_device

_BLOCK_SIZES = (16, 32, 64, 128)
_FILL_NAN = False  # tests set it so that an output element the kernel never writes shows up as NaN


@triton.jit
def _block_sparse_attention_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, num_blocks_ptr, indices_ptr, kv_lens_ptr,
        stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
        num_heads, num_kv_heads, q_len, kv_len, head_dim, num_q_blocks, num_kv_blocks, qk_scale,
        GROUP: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KV_LENS: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    q_block = tl.program_id(0)
    b = (tl.program_id(1) // num_heads).to(tl.int64)  # int64: batch strides times B can pass 2**31
    h = tl.program_id(1) % num_heads
    kv_h = h // GROUP
    rows = q_block * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, BLOCK)
    dims = tl.arange(0, BLOCK_D)
    row_mask = rows < q_len
    dim_mask = dims < head_dim
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
    valid_len = kv_len
    if HAS_KV_LENS:
        valid_len = tl.minimum(tl.load(kv_lens_ptr + b), kv_len)
    q_pos = kv_len - q_len + rows
    selection = (b * num_kv_heads + kv_h) * num_q_blocks + q_block
    count = tl.minimum(tl.load(num_blocks_ptr + selection), num_kv_blocks)
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    for j in range(count):
        keys = tl.load(indices_ptr + selection * num_kv_blocks + j) * BLOCK + cols
        key_mask = keys < valid_len
        k_t = tl.load(k_base + keys[None, :] * stride_kn + dims[:, None],
                      mask=dim_mask[:, None] & key_mask[None, :], other=0.0)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(key_mask[None, :] & (keys[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: exp2(-inf - 0) = 0, no NaN
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        v = tl.load(v_base + keys[:, None] * stride_vn + dims[None, :],
                    mask=key_mask[:, None] & dim_mask[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row that saw no key keeps acc = 0
    tl.store(o_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + dims[None, :],
             o.to(o_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])



def _check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q must be [B, H, Lq, D] and k, v one [B, Hkv, Lk, D] shape; got q "
                         f"{list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    check_dtypes("q, k, v", q, k, v)
    (batch, heads, q_len, head_dim), (kv_batch, kv_heads, kv_len, kv_dim) = q.shape, k.shape
    if (kv_batch, kv_dim) != (batch, head_dim):
        raise ValueError(f"k, v must match q's batch and head dim: q {list(q.shape)}, k {list(k.shape)}")
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of KV heads ({kv_heads})")
    if q_len > kv_len:
        raise ValueError(f"queries are the last Lq of the Lk keys: Lq ({q_len}) cannot exceed Lk ({kv_len})")
    if not 16 <= head_dim <= 128:
        raise ValueError(f"head dim must be in [16, 128], got {head_dim}")


def _launch_options(block: int, block_d: int, itemsize: int) -> dict[str, int]:
    """One config: warps by tile size, pipeline stages only while K and V tiles fit sm_90's shared memory
    (fp32 128 x 128 tiles take 192 KiB with one stage, of the 227 KiB there)."""
    stage_bytes = 2 * block * block_d * itemsize
    num_stages = 3 if stage_bytes <= 32768 else 2 if stage_bytes <= 65536 else 1
    return {"num_warps": 8 if block == 128 else 4, "num_stages": num_stages}


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                           kv_indices: torch.Tensor, *, block_size: int, scale: float | None = None,
                           kv_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each query over the key blocks selected for its query block (FlexAttention's
    index format, one selection per KV head shared by its query heads).

    q ``[B, H, Lq, D]``; k, v ``[B, Hkv, Lk, D]``, H a multiple of Hkv, D in [16, 128]; queries are the last
    Lq of the Lk positions (query i sits at Lk - Lq + i). Query blocks are ``block_size`` rows of q, key
    blocks ``block_size`` keys from key 0 (block_size 16, 32, 64 or 128). kv_num_blocks ``[B, Hkv,
    ceil(Lq/block_size)]`` int32: how many key blocks each query block reads; kv_indices ``[B, Hkv,
    ceil(Lq/block_size), ceil(Lk/block_size)]`` int32: which ones (the first kv_num_blocks entries, any order,
    each in [0, ceil(Lk/block_size))). kv_lens ``[B]`` int32 masks keys at or past it. A query that sees no
    key gets 0. fp16, bf16 or fp32; accumulates in fp32; returns o ``[B, H, Lq, D]`` in q's dtype.
    """
    _check_tensors(q, k, v)
    if block_size not in _BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {_BLOCK_SIZES}, got {block_size}")
    (batch, heads, q_len, head_dim), (kv_heads, kv_len) = q.shape, k.shape[1:3]
    num_q_blocks, num_kv_blocks = triton.cdiv(q_len, block_size), triton.cdiv(kv_len, block_size)
    check_index("kv_num_blocks", kv_num_blocks, (batch, kv_heads, num_q_blocks))
    check_index("kv_indices", kv_indices, (batch, kv_heads, num_q_blocks, num_kv_blocks))
    if kv_lens is not None:
        check_index("kv_lens", kv_lens, (batch,))
    check_devices(_block_sparse_attention_kernel, q, k, v, kv_num_blocks, kv_indices,
                  *([] if kv_lens is None else [kv_lens]))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if _FILL_NAN:
        o.fill_(math.nan)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    block_d = triton.next_power_of_2(head_dim)
    with on_device(q.device):
        _block_sparse_attention_kernel[(num_q_blocks, batch * heads)](
            q, k, v, o, kv_num_blocks.contiguous(), kv_indices.contiguous(), kv_lens,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            heads, kv_heads, q_len, kv_len, head_dim, num_q_blocks, num_kv_blocks, scale * math.log2(math.e),
            GROUP=heads // kv_heads, BLOCK=block_size, BLOCK_D=block_d, HAS_KV_LENS=kv_lens is not None,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            **_launch_options(block_size, block_d, q.element_size()))
    return o
