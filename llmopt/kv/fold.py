"""Write a `GroupFold` into an attention module's weights: fewer KV heads, same head dim, plain GQA."""

from __future__ import annotations

import torch
import torch.nn as nn

from llmopt.arch import ArchAdapter
from llmopt.kv.solvers import GroupFold


def _complex_rows(adapter: ArchAdapter, linear_param: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Weight ``[heads·d, in]`` (or bias ``[heads·d]``) → ``[heads, d/2, in]`` complex128 rows."""
    columns = linear_param.detach().reshape(linear_param.shape[0], -1).T  # [in, heads·d]
    return adapter.to_complex(columns, head_dim).permute(1, 2, 0)


def _real_rows(adapter: ArchAdapter, z: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of `_complex_rows`, shaped and typed like `like` (weight or bias) with the new head count."""
    rows = adapter.from_complex(z.permute(2, 0, 1)).T  # [heads·d, in]
    return rows.reshape(-1, *like.shape[1:]).to(like.dtype)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


@torch.no_grad()
def fold_attention(attention: nn.Module, adapter: ArchAdapter, fold: GroupFold, num_heads: int,
                   num_kv_heads: int, head_dim: int) -> None:
    """Replace k/v projections by the merged heads and absorb the decoders into q_proj and o_proj, in place."""
    q, k, v, o = (getattr(attention, n) for n in (adapter.q_proj, adapter.k_proj, adapter.v_proj, adapter.o_proj))
    groups, g = fold.key_encoder.shape[0], fold.key_encoder.shape[-1]
    per_kv = num_heads // num_kv_heads
    device = k.weight.device

    def merge_keys(param: torch.Tensor) -> torch.Tensor:
        z = _complex_rows(adapter, param, head_dim).view(groups, g, head_dim // 2, -1)
        return torch.einsum("rji,rijx->rjx", fold.key_encoder.conj().to(device), z)

    def scale_queries(param: torch.Tensor) -> torch.Tensor:
        scale = fold.key_decoder.transpose(1, 2).reshape(num_kv_heads, -1).repeat_interleave(per_kv, 0)
        return scale.conj().to(device)[..., None] * _complex_rows(adapter, param, head_dim)

    def merge_values(param: torch.Tensor) -> torch.Tensor:
        rows = param.detach().to(torch.float64).reshape(groups, g * head_dim, -1)
        return torch.einsum("rdc,rcx->rdx", fold.value_encoder.to(device), rows).reshape(-1, *param.shape[1:])

    new_k = [_real_rows(adapter, merge_keys(p), p) if p is not None else None for p in (k.weight, k.bias)]
    new_v = [merge_values(p).to(p.dtype) if p is not None else None for p in (v.weight, v.bias)]
    for param in (q.weight, q.bias):
        if param is not None:
            param.copy_(_real_rows(adapter, scale_queries(param), param))
    decoder = fold.value_decoder.to(device).view(groups, g, head_dim, head_dim).reshape(num_kv_heads, head_dim,
                                                                                         head_dim)
    w_o = o.weight.to(torch.float64).view(-1, num_heads, head_dim)
    o.weight.copy_(torch.einsum("xad,ade->xae", w_o, decoder.repeat_interleave(per_kv, 0)).flatten(1))
    setattr(attention, adapter.k_proj, _linear(*new_k))
    setattr(attention, adapter.v_proj, _linear(*new_v))
    attention.num_key_value_groups = num_heads // groups
