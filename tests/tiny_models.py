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
    return sharpened(AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval(), family)


@torch.no_grad()
def sharpened(model: torch.nn.Module, model_type: str) -> torch.nn.Module:
    """Random init gives near-uniform attention: q/k scaled up and biases drawn so that a fold's errors show."""
    for name, param in model.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight", "query_key_value.weight",
                          "c_attn.weight")):
            param.mul_(4.0)
        if name.endswith("bias"):
            param.normal_(0, 0.5)
        if name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")) and param.dim() == 1:
            # the spread of real q/k norm weights, equal on both dims of each RoPE plane (where a merge of
            # redundant heads after the norm stays lossless); Gemma's norms scale by 1 + weight
            half = torch.exp(0.5 * torch.randn(param.shape[0] // 2))
            param.copy_(torch.cat([half, half]) - (1.0 if "gemma" in model_type else 0.0))
    return model


# One tiny multi-head model per family (4 heads of 16 dims, 2 layers), each with its family's quirks switched on.
FAMILY_CONFIGS = {
    "LlamaForCausalLM": ("llama", {}),
    "MistralForCausalLM": ("mistral", {"sliding_window": 32}),
    "MixtralForCausalLM": ("mixtral", {"num_local_experts": 2, "num_experts_per_tok": 1}),
    "Qwen2ForCausalLM": ("qwen2", {}),
    "Qwen2MoeForCausalLM": ("qwen2_moe", {"num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 32,
                                          "shared_expert_intermediate_size": 32}),
    "Qwen3ForCausalLM": ("qwen3", {}),
    "Qwen3MoeForCausalLM": ("qwen3_moe", {"num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 32}),
    "GraniteForCausalLM": ("granite", {"attention_multiplier": 0.2}),
    "SmolLM3ForCausalLM": ("smollm3", {"no_rope_layers": [1, 0]}),  # layer 1 without RoPE
    "GemmaForCausalLM": ("gemma", {}),
    "Gemma2ForCausalLM": ("gemma2", {"query_pre_attn_scalar": 24, "attn_logit_softcapping": 20.0,
                                     "sliding_window": 32}),
    "Gemma3ForCausalLM": ("gemma3_text", {}),
    "PhiForCausalLM": ("phi", {}),  # partial rotary 0.5, biases, parallel block
    "Phi3ForCausalLM": ("phi3", {"partial_rotary_factor": 0.75}),  # fused [Q|K|V], partial rotary as Phi-4-mini
    "GPTNeoXForCausalLM": ("gpt_neox", {}),
    "StableLmForCausalLM": ("stablelm", {"use_qkv_bias": True}),  # partial rotary 0.25
    "OlmoForCausalLM": ("olmo", {}),
    "Olmo2ForCausalLM": ("olmo2", {}),
    "GPT2LMHeadModel": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4}),
    "OPTForCausalLM": ("opt", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
}
FAMILY_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, head_dim=16, vocab_size=TINY["vocab_size"], max_position_embeddings=256,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_family_model(architecture: str, **sizes) -> torch.nn.Module:
    """A random multi-head model of `architecture`'s family, deterministic, its q/k sharpened as in `tiny_model`."""
    from transformers import CONFIG_MAPPING

    model_type, overrides = FAMILY_CONFIGS[architecture]
    config = CONFIG_MAPPING[model_type](**{**FAMILY_SIZES, **sizes, **overrides})
    config.architectures = [architecture]
    torch.manual_seed(0)
    # eager attention where the family's scores have more than SDPA applies (Gemma2's soft-capping)
    implementation = "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"
    return sharpened(AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                      attn_implementation=implementation).eval(), model_type)
