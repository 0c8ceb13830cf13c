"""Quest-style sparse decode on vLLM's paged CPU cache: the pages transformers' sparse decode would choose
(`llmopt.sparse.decode`: per KV head, the first and the newest full page, the best-bounded others, the partial one), and
only those are read.

Each page's key box (`key_boxes`) is kept beside the cache, computed once when a request first needs the page full;
a page vLLM writes into again (its block was freed and handed to another request) loses them: every step's
written slots invalidate their pages before anything is read. Pages reused from the prefix cache keep theirs.
"""

from __future__ import annotations

import torch

from llmopt.sparse.decode import choose_pages, key_boxes, page_bounds
from llmopt.vllm_plugin.cpu_kernel import kernel_attention, kernel_metadata
from llmopt.vllm_plugin.paged_kv import gather_pages, page_keys


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
    tokens (the current one included; each holds more than ``pages + 2`` pages) → o ``[R, H, D]``.

    The chosen pages are gathered into a paged cache of their own, blocks of one page, and attended by vLLM's C++
    kernel (fewer, larger operations than a masked SDPA over gathered keys): each (request, KV head) is a request
    of one KV head and its group's query heads, its pages in a row, the partial page last."""
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
    key_cache, value_cache = gather_pages(kv_cache, blocks, selected % bounds.per_block,
                                          torch.arange(hkv)[:, None], size)
    count, n = selected.shape[-1], rows * hkv
    # the partial page holds the keys past the full ones (none: the kernel reads no key of it)
    lens = ((count - 1) * size + seq_lens.long() - full * size).to(torch.int32).repeat_interleave(hkv)
    return one_query_attention(q.reshape(n, h // hkv, d), key_cache, value_cache, lens, scale).view(rows, h, d)


def one_query_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, seq_lens: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """vLLM's CPU kernel for one query per request, q ``[N, G, D]``, over request i's `seq_lens[i]` first keys in
    blocks ``[i·W, (i + 1)·W)`` of `key_cache` / `value_cache` ``[N·W, 1, block, D]`` (vLLM's layout, one KV
    head) → o ``[N, G, D]``."""
    n = len(q)
    blocks, _, block_size, _ = key_cache.shape
    starts = torch.arange(n + 1, dtype=torch.int32)
    isa = "vec16" if block_size % 32 else "vec"  # vLLM's choice for the block size (both in LAYOUT_ISAS)
    return kernel_attention(q, key_cache, value_cache, torch.empty_like(q), starts, seq_lens,
                            torch.arange(blocks, dtype=torch.int32).view(n, -1), scale,
                            kernel_metadata(q, key_cache, starts, seq_lens, isa))
