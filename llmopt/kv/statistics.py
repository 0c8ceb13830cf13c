"""Second moments of the cached activations, accumulated streaming in float64 (no stored activations).

Per layer, for groups of g KV heads being merged into one (m' groups):
- ``key``:   ``[m', d/2, g, g]`` complex128, E[z zᴴ] of the complex keys z_j (one per RoPE plane, pre-RoPE);
- ``query``: ``[h, d/2]`` float64, E|z_j|² of each query head's complex pairs (pre-RoPE);
- ``value``: ``[m', g·d, g·d]`` float64, E[v vᵀ] of the group's concatenated values (bias included).
Memory per layer is fixed by the head counts, whatever the amount of calibration text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from llmopt.arch import ArchAdapter, AttentionShape


@dataclass
class LayerStatistics:
    key: torch.Tensor
    query: torch.Tensor
    value: torch.Tensor
    tokens: int = 0

    @classmethod
    def zeros(cls, shape: AttentionShape, groups: int) -> LayerStatistics:
        g, half, d = shape.num_kv_heads // groups, shape.head_dim // 2, shape.head_dim
        return cls(
            key=torch.zeros(groups, half, g, g, dtype=torch.complex128),
            query=torch.zeros(shape.num_heads, half, dtype=torch.float64),
            value=torch.zeros(groups, g * d, g * d, dtype=torch.float64),
        )

    def normalized(self) -> LayerStatistics:
        n = max(self.tokens, 1)
        return LayerStatistics(self.key / n, self.query / n, self.value / n, self.tokens)


class StatisticsCollector:
    """Forward hooks on one attention's q/k/v projections that accumulate its `LayerStatistics`."""

    def __init__(self, attention: torch.nn.Module, adapter: ArchAdapter, shape: AttentionShape,
                 groups: int) -> None:
        self.shape, self.groups, self.adapter = shape, groups, adapter
        self.stats = LayerStatistics.zeros(shape, groups)
        self.handles = [
            getattr(attention, name).register_forward_hook(
                lambda _m, _i, out, f=accumulate: f(self.stats, out.detach().flatten(0, -2)))
            for name, accumulate in ((adapter.q_proj, self._query), (adapter.k_proj, self._key),
                                     (adapter.v_proj, self._value))
        ]

    def _query(self, stats: LayerStatistics, q: torch.Tensor) -> None:
        z = self.adapter.to_complex(q, self.shape.head_dim)
        stats.query += (z.abs() ** 2).sum(0).to(stats.query.device)
        stats.tokens += q.shape[0]

    def _key(self, stats: LayerStatistics, k: torch.Tensor) -> None:
        z = self.adapter.to_complex(k, self.shape.head_dim).unflatten(1, (self.groups, -1))  # [n, m', g, d/2]
        stats.key += torch.einsum("nraj,nrbj->rjab", z, z.conj()).to(stats.key.device)

    def _value(self, stats: LayerStatistics, v: torch.Tensor) -> None:
        v = v.float().unflatten(1, (self.groups, -1)).transpose(0, 1)  # [m', n, g·d]
        # per batch in float32 (fast GEMM), accumulated across batches in float64
        stats.value += (v.transpose(1, 2) @ v).to(stats.value.device, torch.float64)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
