"""Router training with the LLM frozen, and the thresholds that hold each block to its target sparsity.

Losses (see `RouterTrainingConfig`): distillation against the dense model (`llmopt.distill`, the teacher is the
same model with routing switched off), a rate loss per block, and a decayed guide toward the update-size rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmopt.distill import distill, kl_divergence
from llmopt.routing.config import RouterTrainingConfig
from llmopt.routing.router import BlockRecord, TokenRouter


@torch.no_grad()
def fit_feature_statistics(model: nn.Module, router: TokenRouter, windows: torch.Tensor,
                           layers: list[nn.Module]) -> None:
    """Per-block mean and std of the router's raw features on the dense model, so one router serves all blocks."""
    sums: dict[int, list[torch.Tensor]] = {}

    def observe(layer, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        positions = kwargs.get("position_ids")
        positions = torch.arange(hidden.shape[1])[None] if positions is None else positions
        features = router.features(layer.layer_index, hidden, layer.input_layernorm(hidden),
                                   positions.expand(hidden.shape[0], -1).float())
        sums.setdefault(layer.layer_index, []).append(features.flatten(0, 1).double())

    handles = [layer.register_forward_pre_hook(observe, with_kwargs=True) for layer in layers]
    try:
        with router.disabled():
            for batch in windows.split(4):
                model(input_ids=batch.to(router.threshold.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    for index, chunks in sums.items():
        features = torch.cat(chunks)
        router.feature_mean[index] = features.mean(0).float()
        router.feature_std[index] = features.std(0).clamp_min(1e-6).float()


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, router: TokenRouter, windows: torch.Tensor) -> None:
    """Set each block's threshold so that it skips its target share of the tokens of `windows` (one batch),
    measured on the routed model: each block sees what the routed blocks before it produce."""
    was_training = model.training
    model.eval()
    try:
        with router.calibrating_thresholds():
            model(input_ids=windows.to(router.threshold.device), use_cache=False)
    finally:
        model.train(was_training)


@torch.no_grad()
def achieved_sparsity(model: nn.Module, router: TokenRouter, windows: torch.Tensor) -> list[float]:
    """Share of tokens each block skipped on `windows` (routed blocks; dropped 1, dense 0)."""
    skipped = [1.0 if router.dropped(index) else 0.0 for index in range(len(router.threshold))]
    with router.recording() as records:
        for batch in windows.split(4):
            model(input_ids=batch.to(router.threshold.device), use_cache=False)
    for index in {record.index for record in records}:
        keeps = torch.cat([record.keep.flatten() for record in records if record.index == index])
        skipped[index] = 1 - keeps.double().mean().item()
    return skipped


def guide_targets(record: BlockRecord, share: float) -> torch.Tensor:
    """1 for the tokens the update-size rule keeps: all but each sequence's `share` with the smallest update."""
    count = int(share * record.update.shape[1])
    if count == 0:
        return torch.ones_like(record.update)
    cut = record.update.kthvalue(count, dim=1, keepdim=True).values
    return (record.update > cut).float()


def train_router(model: nn.Module, router: TokenRouter, windows: torch.Tensor,
                 config: RouterTrainingConfig) -> dict:
    """Train the router's parameters on ``windows [n, seq_len]``; returns the curves (total, KL, rate, guide)."""
    parts: dict[str, list[float]] = {"kl": [], "rate": [], "guide": []}
    guide_steps = max(1, round(config.guide_fraction * config.steps))

    def loss(_model: nn.Module, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        records = list(router.records)
        router.records.clear()
        step = len(parts["kl"])
        guide_weight = config.guide_weight * max(0.0, 1 - step / guide_steps)
        kl = kl_divergence(student, teacher)
        rate = guide = torch.zeros((), device=student.device)
        for record in records:
            target = router.block_sparsity[record.index]
            gate = record.gate.float()
            rate = rate + ((1 - gate).mean() - target) ** 2 / len(records)
            if guide_weight:
                guide = guide + F.binary_cross_entropy(gate.clamp(1e-6, 1 - 1e-6),
                                                       guide_targets(record, target.item())) / len(records)
        for name, value in (("kl", kl), ("rate", rate), ("guide", guide)):
            parts[name].append(round(value.item(), 5))
        return kl + config.rate_weight * rate + guide_weight * guide

    with router.recording():
        result = distill(model, list(router.parameters()), router.disabled, windows, config, loss,
                         desc="router training")
    steps, tokens, seconds = result["steps"], result["tokens"], result["seconds"]
    return {"training": result, **{f"training_{name}": {"steps": steps, "tokens": tokens, "seconds": seconds,
                                                         "curve": curve[:steps]} for name, curve in parts.items()}}
