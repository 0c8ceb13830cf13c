"""Skip adapters fitted by least squares: per block, the rank-r linear map of a skipped token's normalized state that
best predicts what the block would have added to it, on the dense model's states of the tokens the router ranks
lowest (its target share of each batch: the dense model's states shift the router's thresholds, not its order).

Reduced-rank ridge regression from streamed float64 moments: W = (Cxx + λI)⁻¹ Cxy, then W Vr Vrᵀ where Vr are
the top-r eigenvectors of the fitted updates' covariance Wᵀ Cxx W.
"""

from __future__ import annotations

import torch
from torch import nn

from llmopt.routing.observe import each_block
from llmopt.routing.router import TokenRouter

RIDGE = 1e-2  # relative to the mean variance of the normalized state


class Moments:
    """Streamed first and second moments of inputs x and targets y (float64)."""

    def __init__(self, width: int) -> None:
        self.count = 0
        self.x = torch.zeros(width, dtype=torch.float64)
        self.y = torch.zeros(width, dtype=torch.float64)
        self.xx = torch.zeros(width, width, dtype=torch.float64)
        self.xy = torch.zeros(width, width, dtype=torch.float64)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double().cpu(), y.double().cpu()
        self.count += len(x)
        self.x += x.sum(0)
        self.y += y.sum(0)
        self.xx += x.T @ x
        self.xy += x.T @ y

    def solve(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(down [H, r], up [r, H], bias [H]) of the rank-r ridge fit y ≈ x·down·up + bias."""
        mean_x, mean_y = self.x / self.count, self.y / self.count
        cxx = self.xx / self.count - torch.outer(mean_x, mean_x)
        cxy = self.xy / self.count - torch.outer(mean_x, mean_y)
        ridge = RIDGE * cxx.diagonal().mean().clamp_min(1e-12)
        full = torch.linalg.solve(cxx + ridge * torch.eye(len(cxx), dtype=cxx.dtype), cxy)
        _, vectors = torch.linalg.eigh(full.T @ cxx @ full)
        basis = vectors[:, -rank:]
        down, up = full @ basis, basis.T
        return down, up, mean_y - mean_x @ down @ up


@torch.no_grad()
def fit_adapters(model: nn.Module, router: TokenRouter, windows: torch.Tensor) -> list[int]:
    """Fit every routed or dropped block's adapter on ``windows`` (batches of 4) on the tokens its router would
    skip at its target rate; returns the number of tokens each block's fit saw."""
    moments: dict[int, Moments] = {}
    width = router.adapter_bias.shape[1]

    def before(index, hidden, normed, positions):
        if router.block_sparsity[index] >= 1:
            return index, hidden, normed, torch.zeros_like(positions, dtype=torch.bool)
        score = router.score(index, hidden, normed, positions)
        return index, hidden, normed, (score > router.batch_threshold(index, score)) | (positions == 0)

    def after(entry, output):
        index, hidden, normed, keep = entry
        skip = ~keep
        moments.setdefault(index, Moments(width)).add(normed[skip], (output - hidden)[skip])

    each_block(model, router, windows, before, after)
    for index, fit in moments.items():
        if fit.count == 0:
            continue
        down, up, bias = fit.solve(router.adapter_down.shape[2])
        router.adapter_down[index] = down.float()
        router.adapter_up[index] = up.float()
        router.adapter_bias[index] = bias.float()
    return [moments[index].count if index in moments else 0 for index in range(len(router.threshold))]
