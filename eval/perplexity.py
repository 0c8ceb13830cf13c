"""Perplexity of a causal LM on token windows (token-weighted over every predicted position)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each window, ``[n]`` (float64), from ``windows [n, seq_len]``.

    Each window is scored alone (no state carried across windows); position 0 has no prediction.
    """
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n, seq_len >= 2] token ids, got shape {tuple(windows.shape)}")
    device = next(model.parameters()).device
    nll = []
    for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch", disable=not progress,
                      leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        nll.append(losses.double().mean(dim=1).cpu())
    return torch.cat(nll)


def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> float:
    """exp(mean next-token NLL) over all predicted tokens of ``windows [n, seq_len]``."""
    return math.exp(window_nll(model, windows, batch_size, progress).mean().item())


def perplexity_stderr(nll: torch.Tensor) -> float | None:
    """Delta-method stderr of exp(mean NLL) from per-window NLLs ``[n]``: ppl · std(nll) / sqrt(n)."""
    if nll.numel() < 2:
        return None
    return math.exp(nll.mean().item()) * nll.std().item() / math.sqrt(nll.numel())
