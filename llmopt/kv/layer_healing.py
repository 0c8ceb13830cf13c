"""Layer-wise healing: right after a layer is folded, train its attention projections so that the layer maps the
compressed model's inputs to what the original layer produced on the original model's inputs.

Each step is one layer's forward and backward on cached hidden states (no teacher logits, no full backward), and
the target carries the original model's trajectory, so a layer also learns to undo the error that the layers
before it left. It needs only the layer in memory, which is why it also heals models larger than memory.
"""

from __future__ import annotations

import torch
from torch import nn

from llmopt.arch import ArchAdapter
from llmopt.distill import cosine_decay, only_trainable
from llmopt.hooks import LayerInput, layer_output
from llmopt.kv.config import LayerHealingConfig
from llmopt.kv.heal import attention_parameters
from llmopt.precision import resolve_precision, training_autocast


def relative_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖output − target‖² / ‖target‖² over the hidden states of every position but the first (whose massive
    activations, the attention sink, would otherwise dominate)."""
    output, target = output[:, 1:].float(), target[:, 1:].float()
    return (output - target).pow(2).sum(-1).mean() / target.pow(2).sum(-1).mean()


def heal_layer(layer: nn.Module, adapter: ArchAdapter, inputs: list[LayerInput], targets: list[torch.Tensor],
               config: LayerHealingConfig) -> tuple[float, float]:
    """Train `layer`'s q/k/v/o projections for `config.epochs` passes over ``inputs`` toward ``targets`` (Adam,
    cosine decay to 10%); returns the relative error of the first and of the last pass."""
    params = attention_parameters([layer.get_submodule(adapter.attention)], adapter, "attention")
    optimizer = torch.optim.Adam(params, lr=config.learning_rate, betas=(0.9, 0.95))
    device = params[0].device
    autocast = training_autocast(resolve_precision(config.precision, device), device)
    steps, passes = config.epochs * len(inputs), []
    with torch.enable_grad(), only_trainable(layer, params):
        for step in range(steps):
            (hidden, kwargs), target = inputs[step % len(inputs)], targets[step % len(inputs)]
            for group in optimizer.param_groups:
                group["lr"] = cosine_decay(config.learning_rate, step / steps)
            with autocast:
                loss = relative_error(layer_output(layer(hidden, **kwargs)), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            passes.append(loss.item())
    per_pass = len(inputs)
    return sum(passes[:per_pass]) / per_pass, sum(passes[-per_pass:]) / per_pass
