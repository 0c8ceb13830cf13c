"""Second moments of the cached activations, accumulated streaming in float64 (no stored activations).

Per layer, for groups of g KV heads being merged into one (m' groups), each head's d dims split into the first r
that RoPE rotates (r/2 planes) and the p = d − r it passes through unrotated (partial rotary, or r = 0 in a layer
without RoPE):
- ``key``:        ``[m', r/2, g, g]`` complex128, E[z zᴴ] of the complex keys z_j (one per RoPE plane, pre-RoPE);
- ``query``:      ``[h, r/2]`` float64, E|z_j|² of each query head's complex pairs (pre-RoPE);
- ``value``:      ``[m', g·d, g·d]`` float64, E[v vᵀ] of the group's concatenated values (bias included);
- ``pass_key``:   ``[m', g·p, g·p]`` float64, E[k kᵀ] of the group's concatenated pass-through key dims;
- ``pass_query``: ``[m, p, p]`` float64, Σ E[q qᵀ] of the pass-through dims of the query heads of each KV head;
- ``key_rms``:    ``[m]`` float64, E[rms(k)²] of each KV head before its norm (families with a shared q/k RMSNorm,
  whose keys and queries are taken after the norm, as attention sees them; zeros elsewhere).
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
    pass_key: torch.Tensor
    pass_query: torch.Tensor
    key_rms: torch.Tensor
    tokens: int = 0

    @classmethod
    def zeros(cls, shape: AttentionShape, groups: int, rotary_dims: int) -> LayerStatistics:
        g, half, d = shape.num_kv_heads // groups, rotary_dims // 2, shape.head_dim
        p = d - rotary_dims
        return cls(
            key=torch.zeros(groups, half, g, g, dtype=torch.complex128),
            query=torch.zeros(shape.num_heads, half, dtype=torch.float64),
            value=torch.zeros(groups, g * d, g * d, dtype=torch.float64),
            pass_key=torch.zeros(groups, g * p, g * p, dtype=torch.float64),
            pass_query=torch.zeros(shape.num_kv_heads, p, p, dtype=torch.float64),
            key_rms=torch.zeros(shape.num_kv_heads, dtype=torch.float64),
        )

    @property
    def rotary_dims(self) -> int:
        return 2 * self.key.shape[1]

    def normalized(self) -> LayerStatistics:
        n = max(self.tokens, 1)
        return LayerStatistics(self.key / n, self.query / n, self.value / n, self.pass_key / n, self.pass_query / n,
                               self.key_rms / n, self.tokens)


class StatisticsCollector:
    """Forward hooks on one attention's q/k/v projections (or its fused one) that accumulate its
    `LayerStatistics`; `rotary_dims`: the leading dims of each head that RoPE rotates in this layer."""

    def __init__(self, attention: torch.nn.Module, adapter: ArchAdapter, shape: AttentionShape,
                 groups: int, rotary_dims: int) -> None:
        self.shape, self.groups, self.adapter, self.rotary = shape, groups, adapter, rotary_dims
        self.stats = LayerStatistics.zeros(shape, groups, rotary_dims)
        accumulators = (self._query, self._key, self._value)
        modules = adapter.projection_modules(attention)
        if adapter.key_norm == "shared-rms":  # q and k as attention sees them: after the norm over each head
            d = shape.head_dim
            norms = [getattr(attention, adapter.q_norm), getattr(attention, adapter.k_norm)]

            def normed(norm, accumulate, out, key):
                out = out.detach().flatten(0, -2)
                if key:
                    self._key_rms(out)
                accumulate(self.stats, norm(out.unflatten(-1, (-1, d))).flatten(-2))

            self.handles = [module.register_forward_hook(
                lambda _m, _i, out, n=norm, f=accumulate, key=key: normed(n, f, out, key))
                for module, norm, accumulate, key in zip(modules, norms, accumulators, (False, True))]
            self.handles.append(modules[2].register_forward_hook(
                lambda _m, _i, out: self._value(self.stats, out.detach().flatten(0, -2))))
        elif len(modules) == 1:
            self.handles = [modules[0].register_forward_hook(lambda _m, _i, out: self._fused(out))]
        else:
            self.handles = [module.register_forward_hook(
                lambda _m, _i, out, f=accumulate: f(self.stats, out.detach().flatten(0, -2)))
                for module, accumulate in zip(modules, accumulators)]

    def _fused(self, out: torch.Tensor) -> None:
        shape = self.shape
        parts = self.adapter.split_qkv([out.detach().flatten(0, -2)], shape.num_heads, shape.num_kv_heads,
                                       shape.head_dim)
        for part, accumulate in zip(parts, (self._query, self._key, self._value)):
            accumulate(self.stats, part)

    def _key_rms(self, k: torch.Tensor) -> None:
        k = k.to(torch.float64).unflatten(-1, (-1, self.shape.head_dim))
        self.stats.key_rms += k.pow(2).mean(-1).sum(0).to(self.stats.key_rms.device)

    def _passed(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, heads·d]`` → ``[n, heads, p]`` float64: the dims RoPE leaves alone."""
        return x.to(torch.float64).unflatten(-1, (-1, self.shape.head_dim))[..., self.rotary:]

    def _query(self, stats: LayerStatistics, q: torch.Tensor) -> None:
        if self.rotary:
            z = self.adapter.to_complex(q, self.shape.head_dim, self.rotary)
            stats.query += (z.abs() ** 2).sum(0).to(stats.query.device)
        if self.rotary < self.shape.head_dim:
            passed = self._passed(q)
            moment = torch.einsum("nap,naq->apq", passed, passed)
            per_kv = self.shape.num_heads // self.shape.num_kv_heads
            stats.pass_query += moment.unflatten(0, (-1, per_kv)).sum(1).to(stats.pass_query.device)
        stats.tokens += q.shape[0]

    def _key(self, stats: LayerStatistics, k: torch.Tensor) -> None:
        if self.rotary:
            z = self.adapter.to_complex(k, self.shape.head_dim, self.rotary).unflatten(1, (self.groups, -1))
            stats.key += torch.einsum("nraj,nrbj->rjab", z, z.conj()).to(stats.key.device)  # z: [n, m', g, r/2]
        if self.rotary < self.shape.head_dim:
            passed = self._passed(k).flatten(1).unflatten(1, (self.groups, -1)).transpose(0, 1)  # [m', n, g·p]
            stats.pass_key += (passed.transpose(1, 2) @ passed).to(stats.pass_key.device)

    def _value(self, stats: LayerStatistics, v: torch.Tensor) -> None:
        v = v.float().unflatten(1, (self.groups, -1)).transpose(0, 1)  # [m', n, g·d]
        # per batch in float32 (fast GEMM), accumulated across batches in float64
        stats.value += (v.transpose(1, 2) @ v).to(stats.value.device, torch.float64)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
