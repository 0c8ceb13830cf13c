"""llmopt's vLLM plugin: serves llmopt checkpoints whose transforms need code inside vLLM.

vLLM calls `register` (entry point group ``vllm.general_plugins``, name ``llmopt``) in each of its processes.
It only names classes by string, so nothing heavy is imported until vLLM builds a model; every setting comes from
the served checkpoint's llmopt record (config.json), none from the environment. Models without a record are
served exactly as by stock vLLM. ``VLLM_PLUGINS`` (comma-separated entry point names) can leave it out.
"""

from __future__ import annotations

CPU_ATTENTION = "llmopt.vllm_plugin.cpu_attention.SparseCPUAttentionBackend"
ROUTED_ARCHITECTURE = "LlmoptLlamaForCausalLM"  # what a routed checkpoint's config.json names for vLLM
PER_LAYER_KV_ARCHITECTURE = "LlmoptKVLlamaForCausalLM"  # ... and one with KV heads per layer, not routed
MODELS = {ROUTED_ARCHITECTURE: "llmopt.vllm_plugin.routed_llama:LlmoptLlamaForCausalLM",
          PER_LAYER_KV_ARCHITECTURE: "llmopt.vllm_plugin.per_layer_kv:LlmoptKVLlamaForCausalLM"}

_registered = False


def register() -> None:
    """Install llmopt's architectures and attention backend in vLLM; idempotent, safe to call in every process."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    for architecture, model_class in MODELS.items():
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, model_class)

    # The CPU platform picks CPU_ATTN whatever backend is asked for, so llmopt's backend takes its place; it
    # runs vLLM's own kernel for every model and layer without a sparse record.
    register_backend(AttentionBackendEnum.CPU_ATTN, CPU_ATTENTION)
    _registered = True
