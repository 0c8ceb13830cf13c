"""How many tokens each block skips, under one global budget of skipped FLOPs.

"search": the sensitivity of each block is measured (KL of the final logits to the dense model when only that
block skips a share of its tokens, those it changes least), then skips are handed out greedily, always to the
block whose KL grows least, until the budget is met. "uniform": the same share in every routable block.
ShortGPT: the blocks with the lowest Block Influence 1 − cos(h_in, h_out) are dropped whole.
"""

from __future__ import annotations

import torch
from torch import nn

from llmopt.arch import adapter_for
from llmopt.budget import Ladder, greedy_path
from llmopt.config import ConfigError
from llmopt.distill import kl_divergence
from llmopt.hooks import first_layer_inputs, layer_output, next_layer_inputs

LEVELS = (0.3, 0.6, 0.9)
STEP = 0.025


def routable(num_layers: int, dense_blocks: list[int]) -> list[int]:
    return [index for index in range(num_layers) if index not in dense_blocks]


def uniform_allocation(budget: float, num_layers: int, dense_blocks: list[int], skipped_share: float,
                       maximum: float) -> list[float]:
    """The same token sparsity in every routable block, so that the skipped FLOPs reach `budget` (a share)."""
    blocks = routable(num_layers, dense_blocks)
    share = budget * num_layers / (skipped_share * len(blocks))
    if share > maximum:
        raise ConfigError(f"routing.sparsity = {budget} needs {share:.0%} of the tokens skipped in each of the "
                          f"{len(blocks)} routable blocks, above max_block_sparsity = {maximum}")
    return [share if index in blocks else 0.0 for index in range(num_layers)]


def greedy_allocation(sensitivity: torch.Tensor, budget: float, dense_blocks: list[int], skipped_share: float,
                      maximum: float, levels: tuple[float, ...] = LEVELS) -> list[float]:
    """Per-block token sparsity from ``sensitivity [n, len(levels)]`` (KL at each level, 0 at no skipping, linear
    between), raised in steps of `STEP` where the KL grows least (`llmopt.budget.greedy_path`) until the skipped
    FLOPs reach `budget`."""
    num_layers = sensitivity.shape[0]
    levels = torch.tensor((0.0, *levels), dtype=torch.float64)
    curve = torch.cat([torch.zeros(num_layers, 1, dtype=torch.float64), sensitivity.double()], 1)

    def kl(index: int, share: float) -> float:
        upper = min(int(torch.searchsorted(levels, torch.tensor(share, dtype=torch.float64))), len(levels) - 1)
        lower = max(upper - 1, 0)
        if upper == lower:
            return curve[index, upper].item()
        weight = (share - levels[lower].item()) / (levels[upper] - levels[lower]).item()
        return ((1 - weight) * curve[index, lower] + weight * curve[index, upper]).item()

    blocks = routable(num_layers, dense_blocks)
    top = int((maximum + 1e-9) / STEP)
    ladders = [Ladder(tuple(rung * STEP for rung in range(top + 1 if index in blocks else 1)),
                      tuple(kl(index, rung * STEP) for rung in range(top + 1 if index in blocks else 1)))
               for index in range(num_layers)]
    shares = [0.0] * num_layers
    path = greedy_path(ladders)
    while sum(shares) * skipped_share < budget * num_layers:
        rungs = next(path, None)
        if rungs is None:
            raise ConfigError(f"routing.sparsity = {budget} cannot be reached with max_block_sparsity = {maximum} "
                              f"in {len(blocks)} routable blocks")
        shares = [round(rung * STEP, 6) for rung in rungs]
    return shares


def oracle_skip(hidden: torch.Tensor, output: torch.Tensor, share: float) -> torch.Tensor:
    """The block's output where each sequence's `share` of tokens with the smallest relative update keep their
    input instead (position 0 always runs)."""
    update = (output - hidden).float().norm(dim=-1) / hidden.float().norm(dim=-1).clamp_min(1e-6)
    update[:, 0] = float("inf")
    count = int(share * hidden.shape[1])
    if count == 0:
        return output
    cut = update.kthvalue(count, dim=1, keepdim=True).values
    return torch.where((update <= cut)[..., None], hidden, output)


@torch.no_grad()
def block_sensitivity(model: nn.Module, windows: torch.Tensor, dense_blocks: list[int]) -> torch.Tensor:
    """``[n, len(LEVELS)]``: KL(dense ‖ model with only block l skipping each level's share of tokens) on
    ``windows [n_windows, seq_len]``, float64; dense blocks get +inf."""
    adapter = adapter_for(model)
    layers = list(adapter.decoder_layers(model))
    device = next(model.parameters()).device
    dense_logits = model(input_ids=windows.to(device), use_cache=False).logits
    inputs = first_layer_inputs(model, adapter, windows, len(windows))
    sensitivity = torch.full((len(layers), len(LEVELS)), float("inf"), dtype=torch.float64)
    for index, layer in enumerate(layers):
        (hidden, kwargs), = inputs
        output = layer_output(layer(hidden, **kwargs))
        if index not in dense_blocks:
            for column, share in enumerate(LEVELS):
                state = oracle_skip(hidden, output, share)
                for later in layers[index + 1:]:
                    state = layer_output(later(state, **kwargs))
                logits = model.lm_head(model.model.norm(state))
                sensitivity[index, column] = kl_divergence(logits, dense_logits).item()
        inputs = [(output, kwargs)]
    return sensitivity


@torch.no_grad()
def block_influence(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """``[n]`` Block Influence 1 − cos(h_in, h_out) per block, averaged over the tokens of `windows` (float64)."""
    adapter = adapter_for(model)
    inputs = first_layer_inputs(model, adapter, windows, len(windows))
    influence = []
    for layer in adapter.decoder_layers(model):
        outputs = next_layer_inputs(layer, inputs)
        cosine = torch.cat([nn.functional.cosine_similarity(before.double(), after.double(), dim=-1).flatten()
                            for (before, _), (after, _) in zip(inputs, outputs)])
        influence.append(1 - cosine.mean().item())
        inputs = outputs
    return torch.tensor(influence, dtype=torch.float64)


def shortgpt_blocks(influence: torch.Tensor, budget: float, dense_blocks: list[int]) -> list[int]:
    """The `round(budget · n)` non-dense blocks with the lowest Block Influence: a dropped block skips all its
    FLOPs, so this matches a `budget` share of skipped FLOPs."""
    count = round(budget * len(influence))
    candidates = sorted(routable(len(influence), dense_blocks), key=lambda index: influence[index].item())
    if count > len(candidates):
        raise ConfigError(f"routing.sparsity = {budget} drops {count} blocks; only {len(candidates)} may be dropped")
    return sorted(candidates[:count])
