"""One request's keys and values, read back from vLLM's paged KV cache on CPU.

vLLM's CPU cache of a layer is ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``, but each (block, head)
holds K transposed, ``[head_size, block_size]``, followed by V, ``[block_size, head_size]`` (the layout the C++
``vec``/``vec16`` kernels write; `LAYOUT_ISAS`).
"""

from __future__ import annotations

import torch

LAYOUT_ISAS = ("vec", "vec16")  # kernels whose cache layout is the one read here (checked by a test)


def gather_kv(kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, v), each ``[1, Hkv, seq_len, D]``: the first `seq_len` positions of the request whose cache blocks are
    `block_ids` (its row of vLLM's block table), in position order."""
    num_blocks, hkv, block_size, two_d = kv_cache.shape
    d = two_d // 2
    used = block_ids[:-(-seq_len // block_size)].long()
    blocks = kv_cache.view(num_blocks, hkv, 2, block_size * d)[used]  # [n, Hkv, 2, bs·D]
    k = blocks[:, :, 0].view(-1, hkv, d, block_size).permute(1, 0, 3, 2).reshape(hkv, -1, d)
    v = blocks[:, :, 1].view(-1, hkv, block_size, d).transpose(0, 1).reshape(hkv, -1, d)
    return k[None, :, :seq_len], v[None, :, :seq_len]


def page_keys(kv_cache: torch.Tensor, page_size: int) -> torch.Tensor:
    """``[num_blocks, Hkv, D, pages_per_block, page_size]``: a view of the cache's keys by page of `page_size`
    positions (a divisor of the block size)."""
    num_blocks, hkv, block_size, two_d = kv_cache.shape
    d = two_d // 2
    keys = kv_cache.view(num_blocks, hkv, 2, block_size * d)[:, :, 0]
    return keys.unflatten(-1, (d, block_size // page_size, page_size))


def gather_pages(kv_cache: torch.Tensor, blocks: torch.Tensor, pages: torch.Tensor, heads: torch.Tensor,
                 page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(key cache, value cache), each ``[N, 1, page_size, D]`` in vLLM's layout (keys transposed in memory), of
    page `pages` (of `page_size` positions, a divisor of the block size) of KV head `heads` of cache block `blocks`,
    all broadcast to shape S (N = S's size, in order), ready for vLLM's kernel with blocks of `page_size`. One row
    gather each: rows of ``page_size`` keys (K is stored transposed) and of a whole page of values."""
    hkv, block_size, two_d = kv_cache.shape[1:]
    d, per_block = two_d // 2, block_size // page_size
    blocks, pages, heads = torch.broadcast_tensors(blocks.long(), pages.long(), heads.long())
    cell = (blocks * hkv + heads) * 2  # the (block, head) K then V, each block_size · D elements
    key_rows = ((cell * d)[..., None] + torch.arange(d)) * per_block + pages[..., None]  # [*S, D]
    k = kv_cache.view(-1, page_size).index_select(0, key_rows.flatten())
    v = kv_cache.view(-1, page_size * d).index_select(0, ((cell + 1) * per_block + pages).flatten())
    return k.view(-1, 1, page_size, d), v.view(-1, 1, page_size, d)
