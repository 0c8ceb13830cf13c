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
    """The parameters that heal: the k/v projections (``which="keys-values"``, only where they are separate) or all
    the attention projections."""
    if which == "keys-values" and adapter.qkv_layout != "separate":
        raise ValueError(f"healing.parameters: keys-values trains k and v apart, but {adapter.family} fuses q, k and "
                         "v into one projection; use parameters: attention")

    def modules(attention: nn.Module) -> list[nn.Module]:
        if which == "keys-values":
            return [getattr(attention, adapter.k_proj), getattr(attention, adapter.v_proj)]
        return [*adapter.projection_modules(attention), getattr(attention, adapter.o_proj)]

    return [p for attention in attentions for module in modules(attention) for p in module.parameters()]


def heal_attention(model: nn.Module, config: HealingConfig, windows: torch.Tensor, adapter: ArchAdapter,
                   original_attentions: list[nn.Module],
                   checkpoint: Callable[[str, float], None] | None = None) -> dict:
    """Train the attention projections on batches of ``windows [n, seq_len]`` for `config.steps` steps (or
    `config.minutes`); returns the KL curve, steps and tokens seen. `checkpoint(mark, minutes)`: see `distill`."""
    layers = list(adapter.decoder_layers(model))
    return distill(model, attention_parameters(adapter.attention_modules(model), adapter, config.parameters),
                   lambda: swapped_submodules(layers, adapter.attention, original_attentions),
                   windows, config, desc="healing", checkpoint=checkpoint)
