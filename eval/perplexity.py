"""Perplexity of a causal LM on token windows (token-weighted over every predicted position)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> float:
    """exp(mean next-token negative log-likelihood) over ``windows [n, seq_len]``; each window is scored alone."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n, seq_len >= 2] token ids, got shape {tuple(windows.shape)}")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch", disable=not progress,
                      leave=False):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += nll.item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)
