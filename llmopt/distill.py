"""Distillation against the original model: the training loop every transform that learns shares.

The teacher is the same model put back into its original state for one forward pass (a context manager the
transform provides: original attention modules swapped in, routers switched off...), so nothing is copied; it
does not change while the student trains. Its logits are computed on the windows each step draws, never stored
(a vocabulary's worth of floats per token); where the windows repeat (more steps than one pass over them), each
window's last hidden state is kept after its first pass, so a repeat costs the teacher only its output layer.
Only the parameters the transform names train; everything else stays frozen.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar, ContextManager

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from llmopt.config import require, require_choice
from llmopt.precision import PRECISIONS, Precision, resolve_precision, training_autocast


@dataclass
class DistillationConfig:
    """`steps` optimizer steps of `batch_size` windows of `seq_len` tokens, drawn in turn from `tokens` tokens of
    calibration text: the same steps give the same model on any machine of a kind, however busy. `minutes`, if
    given, also stops it early (then the result depends on how fast the machine was: the steps it bought are
    recorded). ``precision``: "bfloat16" runs forward and backward under bf16 autocast (weights stay float32);
    "auto" (the default) picks it where the device has bf16 arithmetic and float32 elsewhere (`llmopt.precision`).
    ``report_steps``: steps after which the caller measures the model (a quality-against-budget curve from one
    run); ``report_minutes``: the same at elapsed training minutes (the time spent measuring is not counted).
    ``cache_teacher``: keep the teacher's last hidden state of every window it has seen (windows × seq_len × hidden
    size floats) when the steps will see a window more than once; the same logits, fewer teacher passes."""

    steps: int = 200
    minutes: float | None = None
    tokens: int = 262144
    learning_rate: float = 3e-4
    seq_len: int = 256
    batch_size: int = 4
    warmup_steps: int = 10
    precision: Precision = "auto"
    report_steps: list[int] = field(default_factory=list)
    report_minutes: list[float] = field(default_factory=list)
    cache_teacher: bool = True

    section: ClassVar[str] = "distillation"  # the name errors use; subclasses set their own

    def __post_init__(self) -> None:
        where = type(self).section
        require(self.steps > 0, f"{where}.steps must be positive, got {self.steps}")
        require(self.minutes is None or self.minutes > 0, f"{where}.minutes must be positive, got {self.minutes}")
        require(self.learning_rate > 0, f"{where}.learning_rate must be positive, got {self.learning_rate}")
        require(self.seq_len >= 16, f"{where}.seq_len must be at least 16, got {self.seq_len}")
        require(self.batch_size > 0, f"{where}.batch_size must be positive, got {self.batch_size}")
        require(self.tokens >= self.seq_len * self.batch_size,
                f"{where}.tokens ({self.tokens}) must hold at least one batch ({self.batch_size} × {self.seq_len})")
        require(self.warmup_steps >= 0, f"{where}.warmup_steps must be non-negative, got {self.warmup_steps}")
        require_choice(where, "precision", self.precision, PRECISIONS)
        require(all(m > 0 for m in self.report_minutes) and self.report_minutes == sorted(self.report_minutes),
                f"{where}.report_minutes must be positive and ascending, got {self.report_minutes}")
        require(all(0 < step < self.steps for step in self.report_steps)
                and self.report_steps == sorted(self.report_steps),
                f"{where}.report_steps must be ascending and between 0 and steps ({self.steps}), got "
                f"{self.report_steps}")


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) over the vocabulary, averaged over positions."""
    teacher = teacher_logits.float().log_softmax(-1)
    student = student_logits.float().log_softmax(-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def cosine_decay(peak: float, progress: float) -> float:
    """`peak` decayed along a cosine to 10% of it as `progress` goes from 0 to 1."""
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def learning_rate(config: DistillationConfig, progress: float, step: int) -> float:
    """Linear warm-up, then cosine decay to 10% over the budget (`progress` in [0, 1])."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    return cosine_decay(config.learning_rate, progress)


@contextlib.contextmanager
def only_trainable(model: nn.Module, params: list[nn.Parameter]):
    """`params` require grad and nothing else does, for the duration; the previous flags come back after."""
    before = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in before:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p in params:
            p.requires_grad_(False)
        for p, flag in before:
            p.requires_grad_(flag)


def distill(model: nn.Module, params: list[nn.Parameter] | list[dict], teacher: Callable[[], ContextManager],
            windows: torch.Tensor, config: DistillationConfig,
            loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
            desc: str = "distillation", checkpoint: Callable[[str, float], None] | None = None) -> dict:
    """Train `params` so that `model` matches itself under `teacher()` on batches of ``windows [n, seq_len]``.

    `params`: parameters, or groups of them (``{"params": [...], "scale": s}``: learning rate × s, default 1).

    `loss(model, student_logits, teacher_logits)` defaults to the KL divergence; a transform adds its own terms
    (e.g. a sparsity penalty) by reading its modules' state. `checkpoint(mark, minutes)` is called, the model in
    eval mode and the clock stopped, after each of `config.report_steps` (mark ``"50 steps"``) and as training time
    passes each of `config.report_minutes` (mark ``"5 min"``), with the training minutes so far. Returns
    ``{"steps", "tokens", "precision", "seconds", "curve", "minute_steps", "stopped_by_minutes"}`` (the step count
    at each reported minute; whether `config.minutes` ended it before `config.steps`).
    """
    loss = loss or (lambda _model, student, target: kl_divergence(student, target))
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=0.0, betas=(0.9, 0.95))
    trained = [p for group in groups for p in group["params"]]
    device = next(model.parameters()).device
    precision = resolve_precision(config.precision, device)
    autocast = training_autocast(precision, device)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))
    budget = None if config.minutes is None else config.minutes * 60
    curve: list[float] = []
    marks, step_marks, minute_steps = list(config.report_minutes), list(config.report_steps), {}
    repeats = config.cache_teacher and config.steps * config.batch_size > len(windows)
    teacher_states: dict[int, torch.Tensor] | None = {} if repeats else None
    started, paused, was_training = time.perf_counter(), 0.0, model.training
    try:
        with only_trainable(model, trained):
            bar = tqdm(range(config.steps), desc=desc, unit="step")
            for step in bar:
                elapsed = time.perf_counter() - started - paused
                if step_marks and step == step_marks[0]:
                    paused += _measure(model, checkpoint, f"{step_marks.pop(0)} steps", elapsed / 60)
                while marks and elapsed >= marks[0] * 60:
                    paused += _measure(model, checkpoint, f"{marks[0]:g} min", marks[0])
                    minute_steps[marks.pop(0)] = step
                if budget is not None and elapsed > budget:
                    break
                progress = max(step / config.steps, elapsed / budget if budget else 0.0)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(config, progress, step) * group.get("scale", 1.0)
                pick = order[torch.arange(step * config.batch_size, (step + 1) * config.batch_size) % len(windows)]
                batch = windows[pick].to(device)
                model.eval()
                with torch.no_grad(), autocast:
                    target = teacher_logits(model, teacher, windows, pick.tolist(), teacher_states)
                model.train()
                with autocast:
                    value = loss(model, model(input_ids=batch, use_cache=False).logits, target)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                torch.nn.utils.clip_grad_norm_(trained, 1.0)
                optimizer.step()
                curve.append(round(value.item(), 5))
                bar.set_postfix(loss=f"{value.item():.4f}")
    finally:
        model.train(was_training)
    return {"steps": len(curve), "tokens": len(curve) * config.batch_size * windows.shape[1], "precision": precision,
            "seconds": round(time.perf_counter() - started - paused, 1), "curve": curve, "minute_steps": minute_steps,
            "stopped_by_minutes": len(curve) < config.steps}


def teacher_logits(model: nn.Module, teacher: Callable[[], ContextManager], windows: torch.Tensor,
                   pick: list[int], states: dict[int, torch.Tensor] | None) -> torch.Tensor:
    """The teacher's logits on ``windows[pick]``. With `states` (window index → the teacher's last hidden state,
    filled here), only windows not seen before run through the teacher's decoder; the rest cost the output
    layer."""
    device = next(model.parameters()).device
    if states is None:
        with teacher():
            return model(input_ids=windows[pick].to(device), use_cache=False).logits
    new = [index for index in dict.fromkeys(pick) if index not in states]
    if new:
        with teacher():
            hidden = model.get_decoder()(input_ids=windows[new].to(device), use_cache=False).last_hidden_state
        states.update(zip(new, hidden))
    return model.get_output_embeddings()(torch.stack([states[index] for index in pick]))


def _measure(model: nn.Module, checkpoint: Callable[[str, float], None] | None, mark: str, minutes: float) -> float:
    """Run `checkpoint(mark, minutes)` on the model in eval mode; the seconds it took."""
    started = time.perf_counter()
    if checkpoint is not None:
        model.eval()
        checkpoint(mark, minutes)
        model.train()
    return time.perf_counter() - started
