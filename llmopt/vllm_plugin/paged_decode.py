"""Quest-style sparse decode on vLLM's paged CPU cache: the pages transformers' sparse decode would choose
(`llmopt.sparse.decode`: per KV head, the first and the newest full page, the best-bounded others, the partial one), and
only those are read.

Each page's key min and max are kept beside the cache, computed once when a request first needs the page full;
a page vLLM writes into again (its block was freed and handed to another request) loses them: every step's
written slots invalidate their pages before anything is read. Pages reused from the prefix cache keep theirs.
"""

from __future__ import annotations

import math

import torch

from llmopt.sparse.decode import page_bounds
from llmopt.vllm_plugin.paged_kv import page_keys, read_blocks


class PagedKeyBounds:
    """Per-page key min and max ``[num_pages, Hkv, D]`` of one layer's paged cache, page = block · per_block +
    offset, filled on demand."""

    def __init__(self, kv_cache: torch.Tensor, page_size: int) -> None:
        num_blocks, hkv, block_size, two_d = kv_cache.shape
        self.page_size, self.per_block = page_size, block_size // page_size
        self.low = kv_cache.new_empty(num_blocks * self.per_block, hkv, two_d // 2)
        self.high = torch.empty_like(self.low)
        self.valid = torch.zeros(len(self.low), dtype=torch.bool)
        self.cache = (kv_cache.data_ptr(), kv_cache.shape)

    def covers(self, kv_cache: torch.Tensor) -> bool:
        return self.cache == (kv_cache.data_ptr(), kv_cache.shape)

    def invalidate(self, slots: torch.Tensor) -> None:
        """Forget the pages that `slots` (a step's slot mapping; negative: padding) were written into."""
        self.valid[slots[slots >= 0].long() // self.page_size] = False

    def lookup(self, kv_cache: torch.Tensor, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(low, high) ``[R, Hkv, P, D]`` of the full pages `pages [R, P]` (global numbers)."""
        wanted = pages.flatten().long()
        missing = wanted[~self.valid[wanted]].unique()
        if len(missing):
            keys = page_keys(kv_cache, self.page_size)[missing // self.per_block, :, :, missing % self.per_block]
            self.low[missing], self.high[missing] = keys.amin(-1), keys.amax(-1)  # keys [n, Hkv, D, page]
            self.valid[missing] = True
        return self.low[pages].transpose(1, 2), self.high[pages].transpose(1, 2)


def paged_sparse_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                        bounds: PagedKeyBounds, pages: int, scale: float) -> torch.Tensor:
    """One decode query per request, q ``[R, H, D]``, over the pages chosen from its context of `seq_lens [R]`
    tokens (the current one included; each holds more than ``pages + 2`` pages) → o ``[R, H, D]``.

    Each chosen page is read as its whole cache block (one contiguous copy) with the block's other positions
    masked: twice the bytes of the page at 64-key pages in 128-token blocks, in a fraction of the time."""
    rows, h, d = q.shape
    hkv, block_size, size = kv_cache.shape[1], kv_cache.shape[2], bounds.page_size
    full = seq_lens.long() // size
    local = torch.arange(int(full.max()))
    is_full = local[None] < full[:, None]  # [R, P]
    local = torch.where(is_full, local, 0)
    table = block_table.long()
    numbers = table.gather(1, local // bounds.per_block) * bounds.per_block + local % bounds.per_block
    low, high = bounds.lookup(kv_cache, numbers)
    bound = page_bounds(q, low, high).masked_fill(~is_full[:, None], -math.inf)
    bound[..., 0] = math.inf  # the sink
    bound.scatter_(-1, (full - 1)[:, None, None].expand(-1, hkv, 1), math.inf)  # the newest full page
    chosen = bound.topk(pages + 1, dim=-1).indices
    selected = torch.cat([chosen, full[:, None, None].expand(-1, hkv, 1)], -1)  # and the partial page [R, Hkv, K]
    column = selected // bounds.per_block  # the page's block in the request's table
    blocks = table.gather(1, column.clamp(max=table.shape[1] - 1).flatten(1)).view_as(selected)
    k, v = read_blocks(kv_cache, blocks, torch.arange(hkv)[:, None])
    offset = torch.arange(block_size)
    positions = column[..., None] * block_size + offset  # [R, Hkv, K, block]
    keep = (offset // size == selected[..., None] % bounds.per_block) & (positions < seq_lens[:, None, None, None])
    dtype = torch.float32 if q.dtype == torch.float16 else q.dtype
    qg = q.view(rows, hkv, 1, h // hkv, d).to(dtype)
    scores = torch.matmul(qg, k.to(dtype)).float() * scale  # [R, Hkv, K, G, block]
    scores = scores.masked_fill(~keep[:, :, :, None], -math.inf)
    weights = scores.transpose(2, 3).flatten(3).softmax(-1).unflatten(3, scores.shape[2::2]).transpose(2, 3)
    o = torch.matmul(weights.to(dtype), v.to(dtype)).sum(2)  # [R, Hkv, G, D]
    return o.reshape(rows, h, d).to(q.dtype)
