"""Healing: distil the compressed model toward the original's next-token distribution.

The teacher is the model itself before the fold: its top-k log-probabilities on the healing windows are
computed once (no second model in memory, no teacher forward per step). Only the attention projections train;
the result stays a plain checkpoint, nothing to fold back.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from llmopt.arch import ArchAdapter
from llmopt.config import HealingConfig

TOP_K = 64


@dataclass
class TeacherTargets:
    """Per healing window: the teacher's top-k token ids and log-probabilities ``[n, seq_len, k]``."""

    windows: torch.Tensor
    indices: torch.Tensor
    logprobs: torch.Tensor


@torch.no_grad()
def teacher_targets(model: nn.Module, windows: torch.Tensor, batch_size: int, k: int = TOP_K) -> TeacherTargets:
    device = next(model.parameters()).device
    indices, logprobs = [], []
    for batch in tqdm(windows.split(batch_size), desc="healing targets", unit="batch"):
        logits = model(input_ids=batch.to(device), use_cache=False).logits.float()
        top = logits.log_softmax(-1).topk(k, dim=-1)
        indices.append(top.indices.to(torch.int32).cpu())
        logprobs.append(top.values.to(torch.float16).cpu())
    return TeacherTargets(windows, torch.cat(indices), torch.cat(logprobs))


def distillation_loss(logits: torch.Tensor, indices: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) restricted to the teacher's top-k tokens, averaged over positions."""
    teacher = logprobs.float()
    student = logits.float().log_softmax(-1).gather(-1, indices.long())
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def _learning_rate(config: HealingConfig, progress: float, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% over the budget (`progress` in [0, 1])."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def trainable_parameters(model: nn.Module, adapter: ArchAdapter, which: str) -> list[nn.Parameter]:
    names = (adapter.k_proj, adapter.v_proj) if which == "keys-values" else (
        adapter.q_proj, adapter.k_proj, adapter.v_proj, adapter.o_proj)
    return [p for attention in adapter.attention_modules(model) for n in names
            for p in getattr(attention, n).parameters()]


def heal_attention(model: nn.Module, config: HealingConfig, teacher: TeacherTargets,
                   adapter: ArchAdapter) -> dict:
    """Train the attention projections for `config.steps` steps (or `config.minutes`); returns the loss curve."""
    params = trainable_parameters(model, adapter, config.parameters)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0, betas=(0.9, 0.95))
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    budget = None if config.minutes is None else config.minutes * 60
    curve, started, was_training = [], time.perf_counter(), model.training
    model.train()
    try:
        bar = tqdm(range(config.steps), desc="healing", unit="step")
        for step in bar:
            elapsed = time.perf_counter() - started
            if budget is not None and elapsed > budget:
                break
            progress = max(step / config.steps, elapsed / budget if budget else 0.0)
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, progress, step)
            pick = torch.randint(len(teacher.windows), (config.batch_size,), generator=generator)
            logits = model(input_ids=teacher.windows[pick].to(device), use_cache=False).logits
            loss = distillation_loss(logits, teacher.indices[pick].to(device), teacher.logprobs[pick].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            curve.append(round(loss.item(), 5))
            bar.set_postfix(kl=f"{loss.item():.4f}")
    finally:
        for p in params:
            p.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    return {"steps": len(curve), "seconds": round(time.perf_counter() - started, 1), "kl_curve": curve}
