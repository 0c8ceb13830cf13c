"""What routing skips, counted in FLOPs: a skipped token saves its query, attention, o_proj and MLP at the block
but still computes its K/V and its skip adapter, if any; a dropped block (ShortGPT) saves all but the adapter."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmopt.arch import attention_shape


@dataclass(frozen=True)
class BlockFlops:
    """Multiply-adds × 2 of one token at one decoder block: K/V projections (always computed), the projections a
    skipped token saves (q, o, MLP), the attention core per key attended (QKᵀ and PV), and the skip adapter a
    skipped token runs instead."""

    kv: float
    skippable: float
    per_key: float
    adapter: float = 0.0

    def full(self, context: torch.Tensor) -> torch.Tensor:
        """FLOPs of tokens that attend to ``context`` keys each."""
        return self.kv + self.skippable + self.per_key * context.double()

    def saved(self, context: torch.Tensor) -> torch.Tensor:
        """FLOPs a token attending to ``context`` keys saves by skipping the block."""
        return self.skippable + self.per_key * context.double() - self.adapter

    def skipped_share(self, seq_len: int) -> float:
        """Share of a block's FLOPs a skipped token saves, averaged over the positions of a window."""
        context = torch.arange(1, seq_len + 1)
        return (self.saved(context).sum() / self.full(context).sum()).item()


def block_flops(config, adapter_rank: int = 0) -> BlockFlops:
    shape = attention_shape(config)
    width, heads = shape.hidden_size, shape.num_heads * shape.head_dim
    return BlockFlops(kv=2.0 * 2 * width * shape.num_kv_heads * shape.head_dim,
                      skippable=2.0 * 2 * width * heads + 2.0 * 3 * width * config.intermediate_size,
                      per_key=2.0 * 2 * heads, adapter=2.0 * 2 * width * adapter_rank)


def skipped(flops: BlockFlops, num_layers: int, seq_len: int, windows: int, keeps: dict[int, torch.Tensor],
            dropped: list[int]) -> dict[str, float]:
    """``token_sparsity`` (share of token×block pairs skipped) and ``flops_skipped`` (share of block FLOPs) for
    `windows` windows of `seq_len` tokens, from each routed block's ``keep [windows, seq_len]`` and the dropped
    blocks; the others ran every token."""
    context = torch.arange(1, seq_len + 1, dtype=torch.float64)
    full = flops.full(context).sum().item() * windows * num_layers
    saved = (flops.full(context).sum().item() - flops.adapter * seq_len) * windows * len(dropped)
    tokens = float(windows * seq_len * len(dropped))
    for keep in keeps.values():
        skip = (~keep).double()
        saved += (skip * flops.saved(context)).sum().item()
        tokens += skip.sum().item()
    return {"token_sparsity": tokens / (windows * seq_len * num_layers), "flops_skipped": saved / full}
