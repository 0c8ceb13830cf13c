"""Scoped hooks: capture what reaches a decoder layer, stop a forward pass early, swap modules for a while.

Every hook and swap here is undone when its scope ends, also on error: the model is never left patched.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn

from llmopt.arch import ArchAdapter

LayerInput = tuple[torch.Tensor, dict]  # (hidden states [batch, seq, hidden], the layer's keyword arguments)


class StopForward(Exception):
    """Raised by a hook to end a forward pass once what it needed has been seen."""


@contextlib.contextmanager
def hooks(*handles: torch.utils.hooks.RemovableHandle) -> Iterator[None]:
    """Remove `handles` when the scope ends."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_until_stopped(function: Callable, *args, **kwargs) -> None:
    """Call `function`, treating `StopForward` as the normal end."""
    try:
        function(*args, **kwargs)
    except StopForward:
        pass


def layer_output(output) -> torch.Tensor:
    """The hidden states a decoder layer returns (transformers < 5 returns a tuple)."""
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def first_layer_inputs(model: nn.Module, adapter: ArchAdapter, windows: torch.Tensor,
                       batch_size: int) -> list[LayerInput]:
    """The hidden states and keyword arguments (rotary embeddings, mask) that reach decoder layer 0, per batch of
    ``windows [n, seq_len]``; the rest of the model does not run."""
    captured: list[LayerInput] = []

    def stop(_module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, kwargs))
        raise StopForward

    body = model.get_submodule(adapter.layers.rsplit(".", 1)[0])
    device = next(model.parameters()).device
    with hooks(adapter.decoder_layers(model)[0].register_forward_pre_hook(stop, with_kwargs=True)):
        for batch in windows.split(batch_size):
            run_until_stopped(body, input_ids=batch.to(device), use_cache=False)
    return captured


@torch.no_grad()
def next_layer_inputs(layer: nn.Module, inputs: list[LayerInput]) -> list[LayerInput]:
    """Run `layer` on each captured input: what reaches the layer after it."""
    return [(layer_output(layer(hidden, **kwargs)), kwargs) for hidden, kwargs in inputs]


@contextlib.contextmanager
def swapped_submodules(parents: list[nn.Module], name: str, replacements: list[nn.Module]) -> Iterator[None]:
    """Temporarily set submodule `name` of each parent to its replacement (e.g. the original attention)."""
    current = [parent.get_submodule(name) for parent in parents]
    try:
        for parent, module in zip(parents, replacements):
            setattr(parent, name, module)
        yield
    finally:
        for parent, module in zip(parents, current):
            setattr(parent, name, module)
