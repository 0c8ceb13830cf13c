"""What one forward step of a model must compute and move, from its config alone, and the bounds that follow.

Decode of ``batch`` sequences at ``context`` tokens reads every weight once and every cached K/V once:
bytes ``W + K`` with ``K = batch * context * kv_bytes_per_token``. Its FLOPs are ``2 * matmul params`` per token
plus attention, ``4 * layers * heads * head_dim`` per token and context token (QKᵀ and PV over the query heads,
which fewer KV heads do not change). A step can go no faster than the slower of the two, so the speed-up a
k× smaller KV cache can bring is at most ``(W + K) / (W + K / k)`` (memory) and about 1 (compute).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn


@dataclass(frozen=True)
class StepCost:
    """FLOPs and bytes of one forward step."""

    flops: float
    bytes: float


@dataclass(frozen=True)
class ModelCost:
    """Per-token costs of a decoder: `params` (stored once; tied embeddings count once), `matmul_params` (weights
    every token multiplies by, the LM head included), KV bytes per token and attention FLOPs per context token."""

    params: int
    matmul_params: int
    bytes_per_param: int
    kv_bytes_per_token: int
    attention_flops_per_context_token: int

    @property
    def weight_bytes(self) -> int:
        return self.params * self.bytes_per_param

    def decode(self, batch: int, context: int) -> StepCost:
        """One decode step of `batch` sequences that attend to `context` tokens each."""
        return StepCost(2 * self.matmul_params * batch + self.attention_flops_per_context_token * batch * context,
                        self.weight_bytes + batch * context * self.kv_bytes_per_token)

    def prefill(self, batch: int, prompt: int) -> StepCost:
        """The prefill of `batch` prompts of `prompt` tokens (causal: each token sees half the prompt on average);
        it writes their K/V once."""
        tokens = batch * prompt
        return StepCost(2 * self.matmul_params * tokens + self.attention_flops_per_context_token * tokens * prompt / 2,
                        self.weight_bytes + tokens * self.kv_bytes_per_token)


def model_cost(model: nn.Module, bytes_per_param: int = 2) -> ModelCost:
    """The costs of `model` (any device, meta included) with weights and KV cache in `bytes_per_param` bytes."""
    from llmopt.arch import attention_shape
    from llmopt.kv.config import kv_bytes_per_token

    shape = attention_shape(model.config)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return ModelCost(params=sum(p.numel() for p in model.parameters()), matmul_params=matmul,
                     bytes_per_param=bytes_per_param, kv_bytes_per_token=kv_bytes_per_token(model.config, bytes_per_param),
                     attention_flops_per_context_token=4 * shape.num_layers * shape.num_heads * shape.head_dim)


def checkpoint_cost(directory: str | Path, bytes_per_param: int = 2) -> ModelCost:
    """`model_cost` of a saved checkpoint, built on the meta device (no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    return model_cost(model, bytes_per_param)


def memory_bound(original: StepCost, optimized: StepCost) -> float:
    """The largest speed-up that moving fewer bytes can give: (W + K) / (W' + K')."""
    return original.bytes / optimized.bytes


def compute_bound(original: StepCost, optimized: StepCost) -> float:
    """The speed-up if the step were limited by arithmetic alone."""
    return original.flops / optimized.flops
