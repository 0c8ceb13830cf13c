"""The config of block-sparse attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from llmopt.config import require


@dataclass
class SparseAttentionConfig:
    """Block-sparse prefill attention: per KV head and query block, keep the key blocks holding `mass` of the
    estimated attention, plus `sink_blocks` first blocks and `local_blocks` diagonal blocks; a KV head whose
    estimate of the last query block is further than `pattern_threshold` (Jensen-Shannon distance, 0 to 0.83)
    from its exact attention keeps instead the key columns and diagonals holding `mass` (vertical-slash: 0 makes
    every head vertical-slash, 1 none); prompts shorter than `min_seq_len` tokens run dense. Decode with
    `decode_pages` > 0 (Quest-style) attends, per KV head, the first page, `decode_pages` more pages of
    `decode_page_size` keys (the newest full one and those whose key bounds score highest) and the partial page,
    once the cache holds `min_seq_len` tokens and those pages are at most `decode_max_density` of its pages
    (below that, gathering the pages costs more than reading them all); 0 keeps decode dense. Smaller pages bound
    the keys more tightly: at the same keys read, pages of 16 choose better than pages of 64.

    In vLLM a request runs sparse only from the context length where llmopt's path beats vLLM's own CPU kernel,
    prefill and decode apart: `vllm_prefill_from` / `vllm_decode_from` tokens when set, else the crossover
    `llmopt bench --sections crossover` calibrated on the machine (`llmopt.vllm_plugin.crossover`)."""

    name: ClassVar[str] = "sparse"
    stage: ClassVar[int] = 30
    transform: ClassVar[str] = "llmopt.sparse.transform:SparseAttention"

    block_size: int = 64
    mass: float = 0.95
    sink_blocks: int = 1
    local_blocks: int = 1
    pattern_threshold: float = 0.15
    min_seq_len: int = 1024
    decode_pages: int = 0
    decode_page_size: int = 16
    decode_max_density: float = 0.25
    vllm_prefill_from: int | None = None
    vllm_decode_from: int | None = None

    def __post_init__(self) -> None:
        require(self.block_size in (16, 32, 64, 128), "sparse.block_size must be 16, 32, 64 or 128")
        require(0.0 < self.mass <= 1.0, f"sparse.mass must be in (0, 1], got {self.mass}")
        require(self.sink_blocks >= 1, "sparse.sink_blocks must be at least 1 (the attention sink is always kept)")
        require(self.local_blocks >= 1, "sparse.local_blocks must be at least 1 (the diagonal is always kept)")
        require(0.0 <= self.pattern_threshold <= 1.0,
                f"sparse.pattern_threshold must be in [0, 1], got {self.pattern_threshold}")
        require(self.min_seq_len >= 2, f"sparse.min_seq_len must be at least 2, got {self.min_seq_len}")
        require(self.decode_pages >= 0, f"sparse.decode_pages must be 0 (dense decode) or more, got "
                                        f"{self.decode_pages}")
        require(self.decode_page_size in (16, 32, 64, 128), "sparse.decode_page_size must be 16, 32, 64 or 128")
        require(0.0 < self.decode_max_density <= 1.0,
                f"sparse.decode_max_density must be in (0, 1], got {self.decode_max_density}")
        for name in ("vllm_prefill_from", "vllm_decode_from"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"sparse.{name} must be a number of context tokens (at least 1), "
                                                 f"or left out for the crossover calibrated on the machine; got {value}")

    def decode_pages_read(self, length: int) -> tuple[int, int]:
        """(pages a sparse decode step reads, pages in the cache) for a cache of `length` tokens (the new one
        included): the first and the partial page besides the `decode_pages` chosen."""
        return self.decode_pages + 2, -(-length // self.decode_page_size)

    def decodes_sparse(self, length: int) -> bool:
        """Whether a decode step over a cache of `length` tokens (the new one included) reads only some pages."""
        read, pages = self.decode_pages_read(length)
        return (self.decode_pages > 0 and length >= self.min_seq_len and read < pages
                and read <= self.decode_max_density * pages)
