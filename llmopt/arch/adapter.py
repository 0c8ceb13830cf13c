"""Where the attention of each supported model family lives and what a transform must know about it, as data.

One `ArchAdapter` per family, keyed by the HF architecture name: module paths, how q/k/v are laid out (separate
Linears or one fused projection), how much of each head RoPE rotates and in which layers, key norms, score
scalars that a fold carries through untouched, and which classes serve a result with fewer KV heads. The facts
that depend on a checkpoint (head counts, partial rotary, optional norms) are read from its config here, wherever
the config keeps them (older fields and transformers 5's ``rope_parameters``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

# How RoPE pairs a head's dimensions into the 2-D planes it rotates; only these can be folded exactly.
ROPE_LAYOUTS = ("rotate_half", "none")  # rotate_half pairs (j, j + r/2) of the first r dims; none: no RoPE at all

# q/k/v as one projection: [Q|K|V] rows (Phi3 qkv_proj), per head [q,k,v] rows (GPT-NeoX query_key_value),
# or [Q|K|V] columns of a transposed Conv1D weight [in, out] (GPT-2 c_attn).
QKVLayout = Literal["separate", "concatenated", "per-head", "conv1d"]

Switch = bool | str  # a fact that holds always (True), never (False), or where the named config flag is set


class UnsupportedModelError(ValueError):
    """The model's architecture or attention layout is one llmopt does not transform (yet)."""


@dataclass(frozen=True)
class Projection:
    """One projection's parameters as a Linear holds them: weight ``[out, in]``, bias ``[out]`` or None."""

    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass(frozen=True)
class ArchAdapter:
    """The facts of one family. q/k/v/o (or the fused ``qkv_proj``) are attributes of each layer's attention."""

    family: str = "Llama"
    layers: str = "model.layers"
    attention: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    qkv_proj: str | None = None  # the fused projection, where `qkv_layout` is not "separate"
    qkv_layout: QKVLayout = "separate"
    rope_layout: str = "rotate_half"
    rope_layers: str | None = None  # a config list with one entry per layer, 0 where the layer has no RoPE
    # a norm on q and k after their projections: "shared-rms" (an RMSNorm over each head's dims, one weight for
    # all heads, modules q_norm/k_norm), "layer-norm" (LayerNorms over each head's dims), "whole-projection"
    # (an RMSNorm over all heads at once)
    key_norm: Literal["shared-rms", "layer-norm", "whole-projection"] | None = None
    key_norm_switch: Switch = True  # where `key_norm` exists (StableLM and Phi: only with qk_layernorm)
    q_norm: str = "q_norm"
    k_norm: str = "k_norm"
    clip_qkv: Switch = False  # OLMo's clip_qkv: q, k and v outputs clamped elementwise
    score_fields: tuple[str, ...] = ()  # config fields that change attention scores; a fold leaves them as they are
    parallel_block: Switch = False  # attention and MLP read the same input and add to the residual together
    holds_fewer_kv_heads: bool = True  # the family's transformers class reads num_key_value_heads
    vllm_path: str = "native"  # how vLLM 0.32 runs the family: "native" (its own class), "transformers backend"

    def to_complex(self, x: torch.Tensor, head_dim: int, rotary_dims: int | None = None) -> torch.Tensor:
        """``[..., heads·d]`` real → ``[..., heads, r/2]`` complex128, one entry per RoPE rotation plane of the first
        r = `rotary_dims` dims of each head (all of them by default)."""
        x = x.to(torch.float64).unflatten(-1, (-1, head_dim))
        half = (head_dim if rotary_dims is None else rotary_dims) // 2
        return torch.complex(x[..., :half], x[..., half:2 * half])

    def from_complex(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_complex` for fully rotated heads: ``[..., heads, d/2]`` complex → ``[..., heads·d]``."""
        return torch.cat([z.real, z.imag], dim=-1).flatten(-2)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.get_submodule(self.attention) for layer in self.decoder_layers(model)]

    def rotary_dims(self, config: Any, layer: int) -> int:
        """How many leading dims of each head RoPE rotates in `layer` (0: none, the layer is position-free)."""
        if self.rope_layout == "none" or (self.rope_layers and not getattr(config, self.rope_layers)[layer]):
            return 0
        return int(attention_shape(config).head_dim * rotary_fraction(config))

    def projection_modules(self, attention: nn.Module) -> list[nn.Module]:
        """The modules whose outputs hold q, k and v: three Linears, or the one fused projection."""
        if self.qkv_layout == "separate":
            return [getattr(attention, name) for name in (self.q_proj, self.k_proj, self.v_proj)]
        return [getattr(attention, self.qkv_proj)]

    def split_qkv(self, outputs: list[torch.Tensor], num_heads: int, num_kv_heads: int,
                  head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[..., h·d]``, k and v ``[..., m·d]`` from the outputs of `projection_modules` (or their weight
        rows/bias laid out as a Linear's: outputs along the first dim, pass ``x.T``-shaped tensors transposed)."""
        if self.qkv_layout == "separate":
            return outputs[0], outputs[1], outputs[2]
        fused = outputs[0]
        if self.qkv_layout == "per-head":
            q, k, v = fused.unflatten(-1, (num_heads, 3, head_dim)).unbind(-2)
            return q.flatten(-2), k.flatten(-2), v.flatten(-2)
        return fused.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)

    def projections(self, attention: nn.Module, num_heads: int, num_kv_heads: int,
                    head_dim: int) -> tuple[Projection, Projection, Projection]:
        """q, k and v as Linear-shaped weights and biases (views where the layout allows)."""
        modules = self.projection_modules(attention)
        weights = [self._linear_weight(m).T for m in modules]  # [in, out]: outputs along the last dim, as split wants
        biases = [m.bias for m in modules]
        split_weights = self.split_qkv(weights, num_heads, num_kv_heads, head_dim)
        split_biases = (self.split_qkv(biases, num_heads, num_kv_heads, head_dim) if biases[0] is not None
                        else (None, None, None))
        return tuple(Projection(w.T.detach(), None if b is None else b.detach())  # type: ignore[return-value]
                     for w, b in zip(split_weights, split_biases))

    def replace_projections(self, attention: nn.Module, q: Projection, k: Projection, v: Projection) -> None:
        """Write q, k and v back in the family's own layout (k and v may have fewer heads than before)."""
        if self.qkv_layout == "separate":
            query = getattr(attention, self.q_proj)
            query.weight.copy_(q.weight)
            if q.bias is not None:
                query.bias.copy_(q.bias)
            setattr(attention, self.k_proj, _linear(k))
            setattr(attention, self.v_proj, _linear(v))
            return
        if self.qkv_layout != "concatenated":
            raise UnsupportedModelError(f"{self.family}: its {self.qkv_layout} qkv projection holds as many KV heads "
                                        "as query heads; it cannot be written back with fewer")
        bias = None if q.bias is None else torch.cat([q.bias, k.bias, v.bias])
        setattr(attention, self.qkv_proj, _linear(Projection(torch.cat([q.weight, k.weight, v.weight]), bias)))

    @staticmethod
    def _linear_weight(module: nn.Module) -> torch.Tensor:
        """``[out, in]``, also for a transposed Conv1D (``nf`` outputs, weight ``[in, out]``)."""
        return module.weight.T if hasattr(module, "nf") else module.weight

    def norm_weight(self, attention: nn.Module, which: str) -> torch.Tensor:
        """The effective per-dim weight ``[d]`` (float64) of the shared RMSNorm `which` ("q" or "k"): its output on
        a vector of ones, so that conventions like Gemma's ``1 + weight`` need no special case."""
        norm = getattr(attention, self.q_norm if which == "q" else self.k_norm)
        ones = torch.ones(1, norm.weight.shape[-1], dtype=norm.weight.dtype, device=norm.weight.device)
        with torch.no_grad():
            return norm(ones)[0].to(torch.float64)

    def holds(self, switch: Switch, config: Any) -> bool:
        return switch if isinstance(switch, bool) else bool(getattr(config, switch, False))


def _linear(projection: Projection) -> nn.Linear:
    weight, bias = projection.weight, projection.bias
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


LLAMA = ArchAdapter()
ADAPTERS: dict[str, ArchAdapter] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": ArchAdapter(family="Mistral"),
    "MixtralForCausalLM": ArchAdapter(family="Mixtral"),
    "Qwen2ForCausalLM": ArchAdapter(family="Qwen2"),
    "Qwen2MoeForCausalLM": ArchAdapter(family="Qwen2-MoE"),
    "Qwen3ForCausalLM": ArchAdapter(family="Qwen3", key_norm="shared-rms"),
    "Qwen3MoeForCausalLM": ArchAdapter(family="Qwen3-MoE", key_norm="shared-rms"),
    "GraniteForCausalLM": ArchAdapter(family="Granite", score_fields=("attention_multiplier",)),
    "SmolLM3ForCausalLM": ArchAdapter(family="SmolLM3", rope_layers="no_rope_layers", vllm_path="transformers backend"),
    "GemmaForCausalLM": ArchAdapter(family="Gemma"),
    "Gemma2ForCausalLM": ArchAdapter(family="Gemma2", score_fields=("query_pre_attn_scalar", "attn_logit_softcapping")),
    "Gemma3ForCausalLM": ArchAdapter(family="Gemma3", key_norm="shared-rms", score_fields=("query_pre_attn_scalar",)),
    "PhiForCausalLM": ArchAdapter(family="Phi", o_proj="dense", key_norm="layer-norm", key_norm_switch="qk_layernorm",
                                  parallel_block=True, vllm_path="transformers backend"),
    "Phi3ForCausalLM": ArchAdapter(family="Phi3", qkv_proj="qkv_proj", qkv_layout="concatenated"),
    "GPTNeoXForCausalLM": ArchAdapter(family="GPT-NeoX", layers="gpt_neox.layers", attention="attention",
                                      o_proj="dense", qkv_proj="query_key_value", qkv_layout="per-head",
                                      parallel_block="use_parallel_residual", holds_fewer_kv_heads=False,
                                      vllm_path="transformers backend"),
    "StableLmForCausalLM": ArchAdapter(family="StableLM", key_norm="layer-norm", key_norm_switch="qk_layernorm",
                                       parallel_block="use_parallel_residual"),
    "OlmoForCausalLM": ArchAdapter(family="OLMo", clip_qkv="clip_qkv", vllm_path="transformers backend"),
    "Olmo2ForCausalLM": ArchAdapter(family="OLMo2", key_norm="whole-projection", vllm_path="transformers backend"),
    "GPT2LMHeadModel": ArchAdapter(family="GPT-2", layers="transformer.h", attention="attn", o_proj="c_proj",
                                   qkv_proj="c_attn", qkv_layout="conv1d", rope_layout="none",
                                   holds_fewer_kv_heads=False),
    "OPTForCausalLM": ArchAdapter(family="OPT", layers="model.decoder.layers", o_proj="out_proj", rope_layout="none",
                                  holds_fewer_kv_heads=False),
}


@dataclass(frozen=True)
class AttentionShape:
    """Head counts of a model: h query heads, m KV heads of dimension d."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    num_layers: int


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
    return adapter


def rotary_fraction(config: Any) -> float:
    """The share of each head that RoPE rotates: ``partial_rotary_factor`` (top level or in ``rope_parameters``,
    also per layer type), or GPT-NeoX's older ``rotary_pct``; 1.0 where none is given."""
    parameters = getattr(config, "rope_parameters", None) or {}
    nested = [p for p in parameters.values() if isinstance(p, dict)]
    for source in (parameters, *nested):
        if source.get("partial_rotary_factor") is not None:
            return float(source["partial_rotary_factor"])
    for field in ("partial_rotary_factor", "rotary_pct"):
        if getattr(config, field, None) is not None:
            return float(getattr(config, field))
    return 1.0


def sliding_window(config: Any) -> int | None:
    """The attention window of the config's sliding-window layers; None where every layer attends to all tokens."""
    if getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return getattr(config, "sliding_window", None) or None


def attention_shape(config: Any) -> AttentionShape:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return AttentionShape(heads, kv_heads, head_dim, config.hidden_size, config.num_hidden_layers)
