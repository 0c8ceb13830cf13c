"""Healing: distil the compressed model toward the original's next-token distribution.

The teacher is the same model with its original attention modules swapped back in (only the attention was
changed, so nothing else is copied); its logits are computed per step, on fresh windows, so the student never
sees the same window often enough to memorise it. Only the attention projections train; the result stays a
plain checkpoint with nothing to fold back.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from llmopt.arch import ArchAdapter
from llmopt.config import HealingConfig


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) over the vocabulary, averaged over positions."""
    teacher = teacher_logits.float().log_softmax(-1)
    student = student_logits.float().log_softmax(-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


@contextlib.contextmanager
def swapped_attention(model: nn.Module, adapter: ArchAdapter, attentions: list[nn.Module]):
    """Temporarily put `attentions` (e.g. the originals) back into the model's layers."""
    layers = adapter.decoder_layers(model)
    current = [layer.get_submodule(adapter.attention) for layer in layers]
    try:
        for layer, attention in zip(layers, attentions):
            setattr(layer, adapter.attention, attention)
        yield model
    finally:
        for layer, attention in zip(layers, current):
            setattr(layer, adapter.attention, attention)


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


def heal_attention(model: nn.Module, config: HealingConfig, windows: torch.Tensor, adapter: ArchAdapter,
                   original_attentions: list[nn.Module]) -> dict:
    """Train the attention projections for `config.steps` steps (or `config.minutes`) on random batches of
    ``windows [n, seq_len]``; returns the loss curve."""
    params = trainable_parameters(model, adapter, config.parameters)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0, betas=(0.9, 0.95))
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bfloat16")
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))
    budget = None if config.minutes is None else config.minutes * 60
    curve, started, was_training = [], time.perf_counter(), model.training
    try:
        bar = tqdm(range(config.steps), desc="healing", unit="step")
        for step in bar:
            elapsed = time.perf_counter() - started
            if budget is not None and elapsed > budget:
                break
            progress = max(step / config.steps, elapsed / budget if budget else 0.0)
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, progress, step)
            pick = order[torch.arange(step * config.batch_size, (step + 1) * config.batch_size) % len(windows)]
            batch = windows[pick].to(device)
            model.eval()
            with torch.no_grad(), autocast, swapped_attention(model, adapter, original_attentions):
                teacher = model(input_ids=batch, use_cache=False).logits
            model.train()
            with autocast:
                student = model(input_ids=batch, use_cache=False).logits
            loss = distillation_loss(student, teacher)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            curve.append(round(loss.item(), 5))
            bar.set_postfix(kl=f"{loss.item():.4f}")
    finally:
        for p in params:
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)
    return {"steps": len(curve), "seconds": round(time.perf_counter() - started, 1), "kl_curve": curve}
