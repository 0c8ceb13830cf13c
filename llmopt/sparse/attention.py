"""Block-sparse attention as a transformers attention backend, switched on per model instance.

What is sparse: the prefill of an unpadded prompt of at least `min_seq_len` tokens (query length > 1, no
attention mask): blocks are selected (`select_blocks`), then attended by the torch path on CPU or the Triton
kernel on CUDA; with `decode_pages` > 0, the decode steps of unpadded sequences once the cache holds
`min_seq_len` tokens and the pages read are at most `decode_max_density` of it (`llmopt.sparse.decode`). What
stays dense (transformers' SDPA): shorter prompts and caches, padded batches and any call with a non-trivial mask
(chunked prefill against a cache), non-causal calls, dropout in training, and modules of models this transform
was not applied to. ``model.llmopt_sparse_stats`` counts the calls per backend and the blocks and pages kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from llmopt.sparse.config import SparseAttentionConfig
from llmopt.sparse.decode import select_pages, sparse_decode_torch, summarize
from llmopt.sparse.selection import BlockSelection, select_blocks
from llmopt.sparse.torch_attention import sparse_attention_torch

IMPLEMENTATION = "llmopt_sparse"
STATS_ATTRIBUTE = "llmopt_sparse_stats"
STATE_ATTRIBUTE = "llmopt_sparse_state"  # on each attention module: its model's config and stats
PAGES_ATTRIBUTE = "llmopt_sparse_pages"  # on each attention module: the key summaries of its cache's pages


@dataclass
class SparseStats:
    """Attention calls per backend ("dense", "torch", "triton", "torch-decode", "triton-decode"), the blocks
    (prefill, also per layer) and pages (decode) the sparse calls kept, and how many KV heads' selections took
    the vertical-slash pattern."""

    calls: dict[str, int] = field(default_factory=dict)
    selected_blocks: int = 0
    causal_blocks: int = 0
    layer_blocks: dict[int, tuple[int, int]] = field(default_factory=dict)  # layer → (selected, causal) blocks
    vertical_slash_heads: int = 0
    selected_heads: int = 0
    selected_pages: int = 0
    cached_pages: int = 0

    @property
    def density(self) -> float | None:
        """Selected / causally possible blocks over the sparse prefill calls (None before any)."""
        return self.selected_blocks / self.causal_blocks if self.causal_blocks else None

    @property
    def layer_densities(self) -> dict[int, float]:
        """Selected / causally possible blocks of each layer's sparse prefill calls."""
        return {layer: selected / causal for layer, (selected, causal) in sorted(self.layer_blocks.items())}

    @property
    def decode_density(self) -> float | None:
        """Selected / cached pages over the sparse decode calls (None before any)."""
        return self.selected_pages / self.cached_pages if self.cached_pages else None

    def count(self, backend: str) -> None:
        self.calls[backend] = self.calls.get(backend, 0) + 1

    def reset(self) -> None:
        self.calls.clear()
        self.layer_blocks.clear()
        self.selected_blocks = self.causal_blocks = self.selected_pages = self.cached_pages = 0
        self.vertical_slash_heads = self.selected_heads = 0

    def add(self, layer: int, selection: BlockSelection) -> None:
        """Count one sparse prefill call's selection."""
        self.selected_blocks += selection.selected_blocks
        self.causal_blocks += selection.causal_blocks
        selected, causal = self.layer_blocks.get(layer, (0, 0))
        self.layer_blocks[layer] = (selected + selection.selected_blocks, causal + selection.causal_blocks)
        self.vertical_slash_heads += int(selection.vertical_slash.sum())
        self.selected_heads += selection.vertical_slash.numel()


@dataclass
class SparseState:
    """What each attention module of a sparse model carries: the model's config and its shared stats."""

    config: SparseAttentionConfig
    stats: SparseStats


def block_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
                 kv_indices: torch.Tensor, block_size: int, scale: float | None) -> tuple[torch.Tensor, str]:
    """(o ``[B, H, Lq, D]``, backend): the Triton kernel on CUDA, the torch path elsewhere."""
    if q.is_cuda:
        from llmopt.triton_kernels.block_sparse_attention import block_sparse_attention

        return block_sparse_attention(q, k, v, kv_num_blocks, kv_indices, block_size=block_size,
                                      scale=scale), "triton"
    return sparse_attention_torch(q, k, v, kv_num_blocks, kv_indices, block_size=block_size, scale=scale), "torch"


def page_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, page_indices: torch.Tensor,
                page_counts: torch.Tensor, page_size: int, scale: float | None) -> tuple[torch.Tensor, str]:
    """(o ``[B, H, D]``, backend) of one query per sequence over the selected pages of a contiguous cache
    ``[B, Hkv, L, D]``: the Triton kernel on CUDA, the torch path elsewhere."""
    if q.is_cuda:
        from llmopt.triton_kernels.sparse_decode import sparse_decode_attention

        lengths = torch.full((q.shape[0],), k.shape[2], dtype=torch.int32, device=q.device)
        return sparse_decode_attention(q, k, v, page_indices, page_counts, page_size=page_size,
                                       cache_seqlens=lengths, scale=scale), "triton-decode"
    return sparse_decode_torch(q, k, v, page_indices, page_size, scale), "torch-decode"


def sparse_decode(module: nn.Module, state: SparseState, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """Output ``[B, 1, H, D]`` of a decode step over the selected pages."""
    page, length = state.config.decode_page_size, key.shape[2]
    summary = summarize(key, page, getattr(module, PAGES_ATTRIBUTE, None))
    setattr(module, PAGES_ATTRIBUTE, summary)
    cached = -(-length // page)
    q = query[:, :, 0]
    indices, counts = select_pages(q, summary, length, page, state.config.decode_pages)
    output, backend = page_sparse(q, key, value, indices, counts, page, scaling)
    state.stats.count(backend)
    state.stats.selected_pages += indices.numel()
    state.stats.cached_pages += indices.shape[0] * indices.shape[1] * cached
    return output[:, None]


def sparse_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-backend signature: query ``[B, H, Lq, D]``, key/value ``[B, Hkv, Lk, D]``
    (post-RoPE, KV heads not repeated) → (output ``[B, Lq, H, D]``, None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state: SparseState | None = getattr(module, STATE_ATTRIBUTE, None)
    lq = query.shape[2]
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True)) is not False
    if state is not None and lq > 1:
        setattr(module, PAGES_ATTRIBUTE, None)  # a new prompt or chunk: the page summaries start again
    if (state is not None and lq == 1 and causal and attention_mask is None
            and state.config.decodes_sparse(key.shape[2])):
        return sparse_decode(module, state, query, key, value, scaling), None
    if (state is None or not causal or attention_mask is not None or lq == 1 or lq < state.config.min_seq_len
            or (dropout > 0.0 and module.training) or kwargs.get("position_bias") is not None):
        if state is not None:
            state.stats.count("dense")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    # no mask with Lk > Lq > 1 is the prefill of an empty static cache: the keys past Lq are not written yet
    key, value = key[:, :, :lq], value[:, :, :lq]
    selection = select_blocks(query, key, state.config, scaling)
    output, backend = block_sparse(query, key, value, selection.kv_num_blocks, selection.kv_indices,
                                   state.config.block_size, scaling)
    state.stats.count(backend)
    state.stats.add(getattr(module, "layer_idx", -1), selection)
    return output.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``"llmopt_sparse"`` a transformers attention implementation (idempotent), masks built as for SDPA so
    that padding still reaches the backend (which then runs dense)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    AttentionInterface.register(IMPLEMENTATION, sparse_attention_forward)


def install(model: nn.Module, attention_modules: list[nn.Module], config: SparseAttentionConfig) -> SparseStats:
    """Switch `model` (only it) to sparse attention with `config`; returns its stats, also at
    ``model.llmopt_sparse_stats``."""
    register()
    state = SparseState(config, SparseStats())
    for module in attention_modules:
        setattr(module, STATE_ATTRIBUTE, state)
    model.set_attn_implementation(IMPLEMENTATION)
    setattr(model, STATS_ATTRIBUTE, state.stats)
    return state.stats
