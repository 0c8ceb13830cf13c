"""Router training (the LLM frozen, unless `finetune` says otherwise), and the thresholds that hold each block
to its target sparsity.

Two stages (see `RouterTrainingConfig`): the guide, a regression of the router's scores onto the update-size rule
on the dense model (forward passes only), then distillation against the dense model (`llmopt.distill`; the
teacher is the same model with routing switched off) through straight-through gates, which trains the skip
adapters and, at its own learning rate, the router (and optionally the blocks' own weights, against a frozen
copy of them). In distillation each block's threshold is re-set on every batch to skip exactly its target share,
so the router can only choose *which* tokens skip, never how many.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from llmopt.distill import cosine_decay, distill
from llmopt.routing.config import RouterTrainingConfig
from llmopt.routing.observe import each_block
from llmopt.routing.router import TokenRouter


@torch.no_grad()
def fit_feature_statistics(model: nn.Module, router: TokenRouter, windows: torch.Tensor) -> None:
    """Per-block mean and std of the router's raw features on the dense model, so one router serves all blocks."""
    sums: dict[int, list[torch.Tensor]] = {}

    def before(index, hidden, normed, positions):
        sums.setdefault(index, []).append(router.features(index, hidden, normed, positions).flatten(0, 1).double())

    each_block(model, router, windows, before, lambda *_: None)
    for index, chunks in sums.items():
        features = torch.cat(chunks)
        router.feature_mean[index] = features.mean(0).float()
        router.feature_std[index] = features.std(0).clamp_min(1e-6).float()


def relative_update(hidden: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``[b, s]``: ‖update‖ / ‖x‖ per token, float32."""
    return update.float().norm(dim=-1) / hidden.float().norm(dim=-1).clamp_min(1e-6)


def guide_router(model: nn.Module, router: TokenRouter, windows: torch.Tensor,
                 config: RouterTrainingConfig) -> dict:
    """The guide: `config.guide_steps` Adam steps in which every routed block's scores regress the standardized
    log relative update of its tokens (position 0, always kept, left out) that the skip adapters, if fitted, leave
    unexplained: the tokens a block changes least, or whose change its adapter stands in for best, skip it.
    Returns ``{"steps", "tokens", "seconds", "curve"}``."""
    optimizer = torch.optim.Adam(router.parameters(), lr=config.guide_learning_rate)
    batches = windows[torch.randperm(len(windows), generator=torch.Generator().manual_seed(router.seed))]
    routed = [index for index in range(len(router.threshold)) if 0 < router.block_sparsity[index] < 1]
    losses: list[float] = []

    def before(index, hidden, normed, positions):
        with torch.enable_grad():
            return index, hidden, normed, router.score(index, hidden, normed, positions)

    def after(entry, output):
        index, hidden, normed, score = entry
        target = relative_update(hidden, output - hidden - router.skip_update(index, normed))[:, 1:].log()
        target = (target - target.mean()) / target.std().clamp_min(1e-6)
        with torch.enable_grad():
            loss = (score[:, 1:] - target).square().mean() / len(routed)
            loss.backward()
        losses[-1] += loss.item()

    started = time.perf_counter()
    bar = tqdm(range(config.guide_steps), desc="router guide", unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cosine_decay(config.guide_learning_rate, step / config.guide_steps)
        pick = torch.arange(step * config.batch_size, (step + 1) * config.batch_size) % len(batches)
        losses.append(0.0)
        optimizer.zero_grad(set_to_none=True)
        each_block(model, router, batches[pick], before, after, batch_size=config.batch_size)
        optimizer.step()
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    router.zero_grad(set_to_none=True)
    return {"steps": len(losses), "tokens": len(losses) * config.batch_size * windows.shape[1],
            "seconds": round(time.perf_counter() - started, 1), "curve": [round(value, 5) for value in losses]}


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, router: TokenRouter, windows: torch.Tensor) -> None:
    """Set each block's threshold so that it skips its target share of the tokens of `windows` (one batch),
    measured on the routed model: each block sees what the routed blocks before it produce."""
    was_training = model.training
    model.eval()
    try:
        with router.calibrating_thresholds():
            model.model(input_ids=windows.to(router.threshold.device), use_cache=False)
    finally:
        model.train(was_training)


@torch.no_grad()
def routed_keeps(model: nn.Module, router: TokenRouter, windows: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each routed block's ``keep [n, seq_len]`` on ``windows [n, seq_len]``, from one routed run in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with router.recording() as records:
            for batch in windows.split(4):
                model.model(input_ids=batch.to(router.threshold.device), use_cache=False)
    finally:
        model.train(was_training)
    return {index: torch.cat([record.keep.cpu() for record in records if record.index == index])
            for index in {record.index for record in records}}


def achieved_sparsity(router: TokenRouter, keeps: dict[int, torch.Tensor]) -> list[float]:
    """Share of tokens each block skipped: routed blocks from their `keeps`, dropped 1, dense 0."""
    skipped = [1.0 if router.dropped(index) else 0.0 for index in range(len(router.threshold))]
    for index, keep in keeps.items():
        skipped[index] = 1 - keep.double().mean().item()
    return skipped


def train_router(model: nn.Module, router: TokenRouter, windows: torch.Tensor,
                 config: RouterTrainingConfig) -> dict:
    """Distil the routed model toward the dense one on ``windows [n, seq_len]``, training the skip adapters (if
    any), the router's own parameters (learning rate × `router_learning_rate / learning_rate`) and the blocks'
    weights `config.finetune` names (against a frozen copy of the blocks)."""
    adapters = [router.adapter_down, router.adapter_up, router.adapter_bias] if router.adapts else []
    scoring = [p for p in router.parameters() if all(p is not a for a in adapters)]
    groups = [{"params": adapters}] if adapters else []
    if scoring and config.router_learning_rate:
        groups.append({"params": scoring, "scale": config.router_learning_rate / config.learning_rate})
    teacher, tuned = router.disabled, block_parameters(model, config.finetune)
    if tuned:
        groups.append({"params": tuned, "scale": config.finetune_learning_rate / config.learning_rate})
        frozen = copy.deepcopy(model.model.layers, {id(router): router})  # the blocks as they are now
        teacher = partial(blocks_swapped, model, frozen, router)
    if not groups:
        return {}
    exact_rate = router.calibrating_thresholds() if router.method == "learned" else contextlib.nullcontext()
    with exact_rate:
        result = distill(model, groups, teacher, windows, config, desc="router distillation")
    if tuned:
        result["finetuned_parameters"] = sum(p.numel() for p in tuned)
    return result


def block_parameters(model: nn.Module, parts: list[str]) -> list[nn.Parameter]:
    """The weights of every decoder block's attention, MLP and/or norms (`parts`)."""
    modules = {"attention": lambda layer: [layer.self_attn], "mlp": lambda layer: [layer.mlp],
               "norms": lambda layer: [layer.input_layernorm, layer.post_attention_layernorm]}
    return [p for layer in model.model.layers for part in parts for module in modules[part](layer)
            for p in module.parameters()]


@contextlib.contextmanager
def blocks_swapped(model: nn.Module, blocks: nn.ModuleList, router: TokenRouter) -> Iterator[None]:
    """The dense model with `blocks` in place of its decoder blocks, for the duration (the teacher while the
    blocks train)."""
    trained, model.model.layers = model.model.layers, blocks
    try:
        with router.disabled():
            yield
    finally:
        model.model.layers = trained
