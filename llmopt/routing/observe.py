"""Watch every routed block of a routed model run dense: what enters it and what it makes of it."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from llmopt.hooks import hooks, layer_output
from llmopt.routing.router import TokenRouter

# before(index, hidden [b, s, H], normed [b, s, H], position_ids [b, s]) -> anything; after(that, block output)
Before = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], object]
After = Callable[[object, torch.Tensor], None]


def each_block(model: nn.Module, router: TokenRouter, windows: torch.Tensor, before: Before, after: After,
               batch_size: int = 4) -> None:
    """Run the model dense (router off) on ``windows [n, seq_len]``; around each block that routes or is dropped,
    call `before` with its input (while the router still holds the previous block's input, so its features are
    those the routed model sees) and `after` with what `before` returned and the block's output."""
    pending: dict[int, object] = {}
    layers = [layer for layer in model.model.layers
              if router.block_sparsity[layer.layer_index] > 0]

    def enter(layer, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        positions = kwargs.get("position_ids")
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None] if positions is None else positions
        pending[layer.layer_index] = before(layer.layer_index, hidden, layer.input_layernorm(hidden),
                                            positions.expand(hidden.shape[0], -1))

    def leave(layer, args, kwargs, output):
        after(pending.pop(layer.layer_index), layer_output(output))

    device = router.threshold.device
    handles = [handle for layer in layers for handle in (
        layer.register_forward_pre_hook(enter, with_kwargs=True),
        layer.register_forward_hook(leave, with_kwargs=True))]
    with hooks(*handles), router.disabled(), torch.no_grad():
        for batch in windows.split(batch_size):
            model.model(input_ids=batch.to(device), use_cache=False)
