"""Tiny models built in code; the real sizes in comments."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

# SmolLM2-135M for scale: hidden 576, 30 layers, 9 heads, 3 KV heads, head_dim 64, vocab 49152.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=8,
            num_key_value_heads=4, head_dim=16, vocab_size=97, max_position_embeddings=256, rope_theta=10000.0)


def tiny_model(family: str = "llama", **overrides) -> torch.nn.Module:
    """A random model of the family, deterministic; Qwen2 carries q/k/v biases, as the real ones do."""
    config_class = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    config = config_class(**{**TINY, **overrides})
    config.architectures = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                             "qwen2": "Qwen2ForCausalLM"}[family]]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random init gives near-uniform attention; sharpen it so errors show
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(4.0)
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    return model
