"""Healing: distil the compressed model toward the original's next-token distribution (`llmopt.distill`).

The teacher is the same model with its original attention modules swapped back in (only the attention was
changed, so nothing else is copied). Only the attention projections train; the result stays a plain checkpoint
with nothing to fold back.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from llmopt.arch import ArchAdapter
from llmopt.distill import distill
from llmopt.hooks import swapped_submodules
from llmopt.kv.config import HealingConfig


def attention_parameters(attentions: list[nn.Module], adapter: ArchAdapter, which: str) -> list[nn.Parameter]:
    """The parameters that heal: the k/v projections (``which="keys-values"``) or all four attention projections."""
    names = (adapter.k_proj, adapter.v_proj) if which == "keys-values" else (
        adapter.q_proj, adapter.k_proj, adapter.v_proj, adapter.o_proj)
    return [p for attention in attentions for n in names for p in getattr(attention, n).parameters()]


def heal_attention(model: nn.Module, config: HealingConfig, windows: torch.Tensor, adapter: ArchAdapter,
                   original_attentions: list[nn.Module],
                   checkpoint: Callable[[str, float], None] | None = None) -> dict:
    """Train the attention projections on batches of ``windows [n, seq_len]`` for `config.steps` steps (or
    `config.minutes`); returns the KL curve, steps and tokens seen. `checkpoint(mark, minutes)`: see `distill`."""
    layers = list(adapter.decoder_layers(model))
    return distill(model, attention_parameters(adapter.attention_modules(model), adapter, config.parameters),
                   lambda: swapped_submodules(layers, adapter.attention, original_attentions),
                   windows, config, desc="healing", checkpoint=checkpoint)
