"""How each method merges a group of g KV heads into one: an encoder and a decoder for keys and for values.

Keys, per RoPE frequency j (complex pairs, so the fold commutes with the rotation):
    new key      z'_j = Σ_i conj(p_ij) z_ij          (encoder p)
    old key      z_ij ≈ u_ij z'_j                    (decoder u)
    query head a of old KV head i:  z_qa,j ← conj(u_ij) z_qa,j, so Re(z_q conj(z_i)) ≈ Re(z_q' conj(z'))
Keys, dims RoPE passes through (partial rotary; every dim in a layer without RoPE), real:
    new key      k' = E k_G                          (encoder E, p × g·p)
    old key      k_i ≈ D_i k'                        (decoder D, g·p × p), query head of old KV head i: q ← D_iᵀ q
Values, per group (real, no RoPE):
    new value    v' = E v_G                          (encoder E, d × g·d)
    old value    v_i ≈ D_i v'                        (decoder D, g·d × d), folded into o_proj columns.
Every method, calibrated or baseline, is an (encoder, decoder) pair; `fold.py` writes any of them into weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmopt.arch import ArchAdapter, Projection
from llmopt.kv.statistics import LayerStatistics


@dataclass
class GroupFold:
    """Per layer, for m' groups of g heads, head dim d = r rotated + p passed-through dims."""

    key_encoder: torch.Tensor    # [m', r/2, g] complex128
    key_decoder: torch.Tensor    # [m', r/2, g] complex128
    value_encoder: torch.Tensor  # [m', d, g·d] float64
    value_decoder: torch.Tensor  # [m', g·d, d] float64
    pass_encoder: torch.Tensor   # [m', p, g·p] float64
    pass_decoder: torch.Tensor   # [m', g·p, p] float64
    key_rms: torch.Tensor | None = None  # [m]: RMS of each KV head before a shared q/k norm, if merged after it


def pooling_fold(groups: int, g: int, head_dim: int, *, keep_one: bool, rotary_dims: int | None = None) -> GroupFold:
    """Data-free baselines: the mean of the group (GQA paper's init) or its first head, queries unchanged."""
    weights = torch.full((g,), 1.0 / g, dtype=torch.float64)
    if keep_one:
        weights = torch.nn.functional.one_hot(torch.tensor(0), g).to(torch.float64)
    rotary = head_dim if rotary_dims is None else rotary_dims
    half = rotary // 2
    key_encoder = weights.to(torch.complex128).expand(groups, half, g).clone()
    key_decoder = torch.ones(groups, half, g, dtype=torch.complex128)
    return GroupFold(key_encoder, key_decoder, *_pooled(weights, groups, head_dim),
                     *_pooled(weights, groups, head_dim - rotary))


def _pooled(weights: torch.Tensor, groups: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder ``[m', w, g·w]``, decoder ``[m', g·w, w]``) that pool a group's real heads of width w by `weights`."""
    eye = torch.eye(width, dtype=torch.float64)
    encoder = torch.cat([w * eye for w in weights], dim=1).expand(groups, -1, -1).clone()
    decoder = eye.repeat(len(weights), 1).expand(groups, -1, -1).clone()
    return encoder, decoder


def solve_keys(key_moment: torch.Tensor, weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-1 complex PCA per frequency of ``key_moment [m', d/2, g, g]``, in the metric diag(weights)².

    `weights [m', d/2, g]` are the query energies' square roots (query-weighted) or None (plain PCA).
    Returns (encoder p, decoder u), scaled so that E|z'|² equals the group's mean key energy.
    """
    w = torch.ones(key_moment.shape[:-1], dtype=torch.float64) if weights is None else weights
    w = w.clamp_min(1e-12 * w.amax().clamp_min(1e-300)).to(torch.complex128)
    weighted = w[..., :, None] * key_moment * w[..., None, :]
    _, vectors = torch.linalg.eigh(weighted)
    encoder = w * vectors[..., -1]
    energy = torch.einsum("...a,...ab,...b->...", encoder.conj(), key_moment, encoder).real.clamp_min(1e-300)
    target = torch.diagonal(key_moment, dim1=-2, dim2=-1).real.mean(-1)
    scale = (target / energy).sqrt()
    encoder = encoder * scale[..., None]
    decoder = torch.einsum("...ab,...b->...a", key_moment, encoder) / (energy * scale**2)[..., None]
    return encoder, decoder


def solve_values(value_moment: torch.Tensor, metric: torch.Tensor | None,
                 head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-d PCA of ``value_moment [m', g·d, g·d]`` in the metric ``metric [m', g·d, g·d]`` (None: Euclidean).

    Returns (encoder E [m', d, g·d], least-squares decoder D [m', g·d, d]).
    """
    if metric is None:
        root = torch.eye(value_moment.shape[-1], dtype=torch.float64).expand_as(value_moment)
    else:
        values, vectors = torch.linalg.eigh(metric)
        values = values.clamp_min(1e-6 * values.amax(-1, keepdim=True))
        root = vectors @ torch.diag_embed(values.sqrt()) @ vectors.transpose(-1, -2)
    _, vectors = torch.linalg.eigh(root @ value_moment @ root)
    encoder = vectors[..., -head_dim:].transpose(-1, -2) @ root
    gram = encoder @ value_moment @ encoder.transpose(-1, -2)
    ridge = 1e-9 * torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1)[..., None, None]
    eye = torch.eye(head_dim, dtype=torch.float64)
    decoder = torch.linalg.solve(gram + ridge * eye, encoder @ value_moment).transpose(-1, -2)
    return encoder, decoder


def calibrated_fold(stats: LayerStatistics, o_proj_weight: torch.Tensor | None, num_heads: int, num_kv_heads: int,
                    head_dim: int, *, query_weighted: bool, output_weighted: bool) -> GroupFold:
    """Ours: keys by (query-weighted) complex PCA per frequency and (query-weighted) PCA of the dims RoPE passes
    through, values by (output-weighted) PCA."""
    groups, g = stats.key.shape[0], stats.key.shape[-1]
    per_kv = num_heads // num_kv_heads
    weights = None
    if query_weighted:
        energy = stats.query.view(num_kv_heads, per_kv, -1).sum(1)  # [m, r/2]
        weights = energy.sqrt().view(groups, g, -1).transpose(1, 2)  # [m', r/2, g]
    if stats.rotary_dims:
        key_encoder, key_decoder = solve_keys(stats.key, weights)
    else:
        key_encoder = key_decoder = stats.key.new_zeros(groups, 0, g)
    passed = head_dim - stats.rotary_dims
    pass_encoder = pass_decoder = stats.pass_key.new_zeros(groups, 0, 0)
    if passed:
        query_metric = block_diagonal(stats.pass_query.view(groups, g, passed, passed)) if query_weighted else None
        pass_encoder, pass_decoder = solve_values(stats.pass_key, query_metric, passed)
    metric = None
    if output_weighted:
        w_o = o_proj_weight.to(torch.float64).view(-1, num_kv_heads, per_kv, head_dim)
        metric = block_diagonal(torch.einsum("xmad,xmae->mde", w_o, w_o).view(groups, g, head_dim, head_dim))
    value_encoder, value_decoder = solve_values(stats.value, metric, head_dim)
    key_rms = stats.key_rms.sqrt() if stats.key_rms.any() else None
    return GroupFold(key_encoder, key_decoder, value_encoder, value_decoder, pass_encoder, pass_decoder, key_rms)


def block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """``[m', g, w, w]`` → ``[m', g·w, g·w]``: each group's heads' blocks on the diagonal."""
    return torch.stack([torch.block_diag(*blocks[r]) for r in range(blocks.shape[0])])


def weight_statistics(k_weight: Projection, v_weight: Projection, groups: int, head_dim: int, rotary_dims: int,
                      adapter: ArchAdapter) -> LayerStatistics:
    """Statistics a whitened input would give (E[x xᵀ] = I, plus the bias): the data-free "SVD-w" baseline."""
    def augmented(projection: Projection) -> torch.Tensor:
        weight = projection.weight.detach().to(torch.float64)
        bias = projection.bias.detach().to(torch.float64)[:, None] if projection.bias is not None else weight[:, :0]
        return torch.cat([weight, bias], dim=1)  # [m·d, in(+1)]: rows are heads' output dims

    keys = augmented(k_weight).T
    k = adapter.to_complex(keys, head_dim, rotary_dims).unflatten(1, (groups, -1))  # [in, m', g, r/2]
    passed = keys.unflatten(1, (-1, head_dim))[..., rotary_dims:].flatten(1).unflatten(1, (groups, -1))
    v = augmented(v_weight).T.unflatten(1, (groups, -1))  # [in, m', g·d]
    key = torch.einsum("nraj,nrbj->rjab", k, k.conj())
    value = torch.einsum("nra,nrb->rab", v, v)
    pass_key = torch.einsum("nra,nrb->rab", passed, passed)
    return LayerStatistics(key=key, query=torch.empty(0), value=value, pass_key=pass_key,
                           pass_query=torch.empty(0), key_rms=torch.zeros(1), tokens=1)


def reconstruction_error(fold: GroupFold, stats: LayerStatistics) -> tuple[float, float]:
    """Relative RMS error of the keys and of the values that `fold` reconstructs, under moments `stats`."""
    eye = torch.eye(fold.key_encoder.shape[-1], dtype=torch.complex128)
    residual = eye - fold.key_decoder[..., :, None] * fold.key_encoder.conj()[..., None, :]
    key = torch.einsum("...ab,...bc,...dc->...ad", residual, stats.key, residual.conj())
    passed = torch.eye(fold.pass_decoder.shape[1], dtype=torch.float64) - fold.pass_decoder @ fold.pass_encoder
    pass_key = passed @ stats.pass_key @ passed.transpose(-1, -2)
    key_error = ((torch.diagonal(key, dim1=-2, dim2=-1).real.sum() + torch.diagonal(pass_key, dim1=-2, dim2=-1).sum())
                 / (torch.diagonal(stats.key, dim1=-2, dim2=-1).real.sum()
                    + torch.diagonal(stats.pass_key, dim1=-2, dim2=-1).sum()))
    residual = torch.eye(fold.value_decoder.shape[1], dtype=torch.float64) - fold.value_decoder @ fold.value_encoder
    value = residual @ stats.value @ residual.transpose(-1, -2)
    value_error = torch.diagonal(value, dim1=-2, dim2=-1).sum() / torch.diagonal(stats.value, dim1=-2, dim2=-1).sum()
    return float(key_error.clamp_min(0).sqrt()), float(value_error.clamp_min(0).sqrt())
