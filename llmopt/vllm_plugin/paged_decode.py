"""Quest-style sparse decode on vLLM's paged CPU cache: the pages transformers' sparse decode would choose
(`llmopt.sparse.decode`: per KV head, the first and the newest full page, the best-bounded others, the partial one), and
only those are read.

Each page's key box (`key_boxes`) is kept beside the cache, computed once when a request first needs the page full;
a page vLLM writes into again (its block was freed and handed to another request) loses them: every step's
written slots invalidate their pages before anything is read. Pages reused from the prefix cache keep theirs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmopt.sparse.decode import choose_pages, key_boxes, page_bounds
from llmopt.vllm_plugin.paged_kv import page_keys, read_pages


class PagedKeyBounds:
    """Per-page key boxes ``[Hkv, num_pages, 2·D]`` (`key_boxes`; head first, so a request's pages gather into
    one contiguous run per head) of one layer's paged cache, page = block · per_block + offset, filled on demand."""

    def __init__(self, kv_cache: torch.Tensor, page_size: int) -> None:
        num_blocks, hkv, block_size, two_d = kv_cache.shape
        self.page_size, self.per_block = page_size, block_size // page_size
        self.boxes = torch.empty(hkv, num_blocks * self.per_block, two_d)
        self.valid = torch.zeros(self.boxes.shape[1], dtype=torch.bool)
        self.cache = (kv_cache.data_ptr(), kv_cache.shape)

    def covers(self, kv_cache: torch.Tensor) -> bool:
        return self.cache == (kv_cache.data_ptr(), kv_cache.shape)

    def invalidate(self, slots: torch.Tensor) -> None:
        """Forget the pages that `slots` (a step's slot mapping; negative: padding) were written into."""
        self.valid[slots[slots >= 0].long() // self.page_size] = False

    def lookup(self, kv_cache: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
        """The key boxes ``[R, Hkv, P, 2·D]`` of the full pages `pages [R, P]` (global numbers)."""
        wanted = pages.flatten().long()
        missing = wanted[~self.valid[wanted]].unique()
        if len(missing):
            keys = page_keys(kv_cache, self.page_size)[missing // self.per_block, :, :, missing % self.per_block]
            self.boxes[:, missing] = key_boxes(keys, -1).transpose(0, 1)  # keys [n, Hkv, D, page]
            self.valid[missing] = True
        return self.boxes.index_select(1, wanted).view(len(self.boxes), *pages.shape, -1).transpose(0, 1)


def paged_sparse_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                        bounds: PagedKeyBounds, pages: int, scale: float) -> torch.Tensor:
    """One decode query per request, q ``[R, H, D]``, over the pages chosen from its context of `seq_lens [R]`
    tokens (the current one included; each holds more than ``pages + 2`` pages) → o ``[R, H, D]``."""
    rows, h, d = q.shape
    hkv, size = kv_cache.shape[1], bounds.page_size
    full = seq_lens.long() // size
    local = torch.arange(int(full.max()))
    local = torch.where(local[None] < full[:, None], local, 0)  # [R, P]: each request's full pages (then page 0)
    table = block_table.long()
    numbers = table.gather(1, local // bounds.per_block) * bounds.per_block + local % bounds.per_block
    chosen = choose_pages(page_bounds(q, bounds.lookup(kv_cache, numbers)), pages, full)
    selected = torch.cat([chosen, full[:, None, None].expand(-1, hkv, 1)], -1)  # and the partial page [R, Hkv, K]
    column = selected // bounds.per_block  # the page's block in the request's table
    blocks = table.gather(1, column.clamp(max=table.shape[1] - 1).flatten(1)).view_as(selected)
    k, v = read_pages(kv_cache, blocks, selected % bounds.per_block, torch.arange(hkv)[:, None], size)
    keys = k.transpose(-1, -2).reshape(rows, hkv, -1, d)  # [R, Hkv, K·page, D]
    valid = (selected[..., None] * size + torch.arange(size)).flatten(2) < seq_lens[:, None, None]  # [R, Hkv, K·page]
    dtype = torch.float32 if q.dtype == torch.float16 else q.dtype
    o = F.scaled_dot_product_attention(q.view(rows, hkv, h // hkv, d).to(dtype), keys.to(dtype),
                                       v.flatten(2, 3).to(dtype), attn_mask=valid[:, :, None], scale=scale)
    return o.reshape(rows, h, d).to(q.dtype)
