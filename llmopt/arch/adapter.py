"""Where the attention of each supported model family lives, as data (no per-model patch functions)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

# How RoPE pairs a head's dimensions into the 2-D planes it rotates; only these can be folded exactly.
ROPE_LAYOUTS = ("rotate_half",)  # pairs (j, j + d/2), as Llama, Mistral and Qwen2 in transformers


class UnsupportedModelError(ValueError):
    """The model's architecture or attention layout is one llmopt does not transform (yet)."""


@dataclass(frozen=True)
class ArchAdapter:
    """Module paths of one family; q/k/v/o are attributes of each layer's attention module."""

    layers: str = "model.layers"
    attention: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    rope_layout: str = "rotate_half"

    def to_complex(self, x: torch.Tensor, head_dim: int) -> torch.Tensor:
        """``[..., heads·d]`` real → ``[..., heads, d/2]`` complex128, one entry per RoPE rotation plane."""
        x = x.to(torch.float64).unflatten(-1, (-1, head_dim))
        half = head_dim // 2
        return torch.complex(x[..., :half], x[..., half:])

    def from_complex(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_complex`: ``[..., heads, d/2]`` complex → ``[..., heads·d]`` float64."""
        return torch.cat([z.real, z.imag], dim=-1).flatten(-2)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.get_submodule(self.attention) for layer in self.decoder_layers(model)]


LLAMA = ArchAdapter()
ADAPTERS: dict[str, ArchAdapter] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": LLAMA,
    "Qwen2ForCausalLM": LLAMA,
}


@dataclass(frozen=True)
class AttentionShape:
    """Head counts of a model: h query heads, m KV heads of dimension d."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    num_layers: int

    def kv_bytes_per_token(self, bytes_per_element: int) -> int:
        """K and V of every layer for one token."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_element


def architecture(model: nn.Module) -> str:
    names = getattr(model.config, "architectures", None) or [type(model).__name__]
    return names[0]


def adapter_for(model: nn.Module) -> ArchAdapter:
    """The adapter of `model`'s family; refuses unknown families and RoPE layouts it cannot pair exactly."""
    name = architecture(model)
    if name not in ADAPTERS:
        raise UnsupportedModelError(
            f"architecture {name} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        )
    adapter = ADAPTERS[name]
    if adapter.rope_layout not in ROPE_LAYOUTS:
        raise UnsupportedModelError(f"{name} pairs RoPE dimensions as {adapter.rope_layout!r}; llmopt folds only "
                                    f"{', '.join(ROPE_LAYOUTS)} exactly")
    config = model.config
    rotary = getattr(config, "partial_rotary_factor", 1.0)
    if rotary != 1.0:
        raise UnsupportedModelError(
            f"{name} uses partial rotary embeddings (partial_rotary_factor={rotary}); only full rotate_half RoPE "
            "layouts can be folded exactly"
        )
    return adapter


def attention_shape(config) -> AttentionShape:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return AttentionShape(heads, kv_heads, head_dim, config.hidden_size, config.num_hidden_layers)
