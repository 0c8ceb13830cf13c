"""Write a `GroupFold` into an attention module's weights: fewer KV heads, same head dim, plain GQA.

Each head's rows split into the r dims RoPE rotates (merged as complex planes) and the p dims it passes through
(merged as real vectors); fused q/k/v projections are split by the adapter and written back in their own layout.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from llmopt.arch import ArchAdapter, Projection
from llmopt.kv.solvers import GroupFold


def _complex_rows(adapter: ArchAdapter, linear_param: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Weight ``[heads·d, in]`` (or bias ``[heads·d]``) → ``[heads, d/2, in]`` complex128 rows."""
    columns = linear_param.detach().reshape(linear_param.shape[0], -1).T  # [in, heads·d]
    return adapter.to_complex(columns, head_dim).permute(1, 2, 0)


def _real_rows(adapter: ArchAdapter, z: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of `_complex_rows`, shaped and typed like `like` (weight or bias) with the new head count."""
    rows = adapter.from_complex(z.permute(2, 0, 1)).T  # [heads·d, in]
    return rows.reshape(-1, *like.shape[1:]).to(like.dtype)


def _head_slice(param: torch.Tensor, head_dim: int, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of every head of a ``[heads·d, ...]`` weight or bias, as ``[heads·(stop−start), ...]``."""
    if (start, stop) == (0, head_dim):
        return param
    return param.reshape(-1, head_dim, *param.shape[1:])[:, start:stop].reshape(-1, *param.shape[1:])


def _join_heads(rotated: torch.Tensor | None, passed: torch.Tensor | None, rotary_dims: int,
                head_dim: int) -> torch.Tensor:
    """Inverse of the two `_head_slice` calls: each head's rotated rows, then its passed-through rows."""
    if rotary_dims == head_dim:
        return rotated
    if rotary_dims == 0:
        return passed
    shape = rotated.shape[1:]
    return torch.cat([rotated.reshape(-1, rotary_dims, *shape),
                      passed.reshape(-1, head_dim - rotary_dims, *shape)], dim=1).reshape(-1, *shape)


def _scaled(projection: Projection, per_row: torch.Tensor, dtype: torch.dtype = torch.float64) -> Projection:
    """`projection` with each output row (weight row and bias entry) multiplied by `per_row`, as `dtype`."""
    weight = (projection.weight.to(torch.float64) * per_row[:, None]).to(dtype)
    bias = None if projection.bias is None else (projection.bias.to(torch.float64) * per_row).to(dtype)
    return Projection(weight, bias)


@torch.no_grad()
def fold_attention(attention: nn.Module, adapter: ArchAdapter, fold: GroupFold, num_heads: int,
                   num_kv_heads: int, head_dim: int) -> None:
    """Replace k/v projections by the merged heads and absorb the decoders into q_proj and o_proj, in place."""
    q, k, v = adapter.projections(attention, num_heads, num_kv_heads, head_dim)
    o = getattr(attention, adapter.o_proj)
    groups, g = fold.key_encoder.shape[0], fold.key_encoder.shape[-1]
    rotary = 2 * fold.key_encoder.shape[1]
    passed = head_dim - rotary
    per_kv = num_heads // num_kv_heads
    device = k.weight.device

    def merge_real(encoder: torch.Tensor, param: torch.Tensor, width: int) -> torch.Tensor:
        rows = param.detach().to(torch.float64).reshape(groups, g * width, -1)
        merged = torch.einsum("rdc,rcx->rdx", encoder.to(device), rows).reshape(-1, *param.shape[1:])
        return merged.to(param.dtype)

    def merge_keys(param: torch.Tensor) -> torch.Tensor:
        rotated = passing = None
        if rotary:
            part = _head_slice(param, head_dim, 0, rotary)
            z = _complex_rows(adapter, part, rotary).view(groups, g, rotary // 2, -1)
            rotated = _real_rows(adapter, torch.einsum("rji,rijx->rjx", fold.key_encoder.conj().to(device), z), part)
        if passed:
            passing = merge_real(fold.pass_encoder, _head_slice(param, head_dim, rotary, head_dim), passed)
        return _join_heads(rotated, passing, rotary, head_dim)

    def scale_queries(param: torch.Tensor) -> torch.Tensor:
        rotated = passing = None
        if rotary:
            part = _head_slice(param, head_dim, 0, rotary)
            scale = fold.key_decoder.transpose(1, 2).reshape(num_kv_heads, -1).repeat_interleave(per_kv, 0)
            rotated = _real_rows(adapter, scale.conj().to(device)[..., None] * _complex_rows(adapter, part, rotary),
                                 part)
        if passed:
            decoder = fold.pass_decoder.to(device).reshape(num_kv_heads, passed, passed)  # D_i of each old head
            rows = _head_slice(param, head_dim, rotary, head_dim).detach().to(torch.float64)
            decoded = torch.einsum("aqp,aqx->apx", decoder.repeat_interleave(per_kv, 0),
                                   rows.reshape(num_heads, passed, -1))
            passing = decoded.reshape(-1, *param.shape[1:]).to(param.dtype)
        return _join_heads(rotated, passing, rotary, head_dim)

    def merged(projection: Projection, merge) -> Projection:
        return Projection(*(None if p is None else merge(p) for p in (projection.weight, projection.bias)))

    dtype = k.weight.dtype
    if fold.key_rms is not None:  # merged where the shared norm maps keys to, W k / rms(k) (W: its weight)
        k_weight, q_weight = adapter.norm_weight(attention, "k"), adapter.norm_weight(attention, "q")
        k = _scaled(k, (k_weight / fold.key_rms.to(device)[:, None]).flatten())
        q = _scaled(q, q_weight.repeat(num_heads))
    new_q = merged(q, scale_queries)
    new_k = merged(k, merge_keys)
    if fold.key_rms is not None:
        new_q = _scaled(new_q, (1 / q_weight).repeat(num_heads), dtype)
        new_k = _scaled(new_k, (1 / k_weight).repeat(groups), dtype)
    new_v = merged(v, lambda p: merge_real(fold.value_encoder, p, head_dim))
    decoder = fold.value_decoder.to(device).view(groups, g, head_dim, head_dim).reshape(num_kv_heads, head_dim,
                                                                                         head_dim)
    w_o = o.weight.to(torch.float64).view(-1, num_heads, head_dim)
    o.weight.copy_(torch.einsum("xad,ade->xae", w_o, decoder.repeat_interleave(per_kv, 0)).flatten(1))
    adapter.replace_projections(attention, new_q, new_k, new_v)
    attention.num_key_value_groups = num_heads // groups
    if hasattr(attention, "num_key_value_heads"):
        attention.num_key_value_heads = groups
