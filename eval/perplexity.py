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


@torch.no_grad()
def decode_nll(model, windows: torch.Tensor, prefix: int, progress: bool = True) -> torch.Tensor:
    """Mean NLL ``[n]`` (float64) of the tokens after the first `prefix` of each window, predicted the way
    generation does: the prefix is prefilled once, then each later token is fed alone through the KV cache
    (teacher forcing), so a transform of the decode path is what gets scored. ``windows [n, seq_len > prefix]``,
    all windows decoded together."""
    if windows.ndim != 2 or not 0 < prefix < windows.shape[1]:
        raise ValueError(f"windows must be [n, seq_len > prefix={prefix}] token ids, got {tuple(windows.shape)}")
    windows = windows.to(next(model.parameters()).device)
    out = model(input_ids=windows[:, :prefix], use_cache=True)
    logits, cache = [out.logits[:, -1]], out.past_key_values
    for position in tqdm(range(prefix, windows.shape[1] - 1), desc="decode perplexity", unit="token",
                         disable=not progress, leave=False):
        out = model(input_ids=windows[:, position: position + 1], past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        cache = out.past_key_values
    losses = torch.nn.functional.cross_entropy(torch.stack(logits, 2).float(), windows[:, prefix:], reduction="none")
    return losses.double().mean(dim=1).cpu()
