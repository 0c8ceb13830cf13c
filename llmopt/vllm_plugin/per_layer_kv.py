"""KV heads per layer in vLLM: vLLM's Llama whose decoder layers each build their attention with the count the
checkpoint's llmopt record gives that layer (as vLLM's nemotron_nas.py builds each layer's own).

Each attention layer then reports its own KV cache spec; vLLM's V1 engine keeps per-layer cache sizes in one
`UniformTypeKVCacheSpecs` group and builds one attention metadata builder per distinct spec, so the CPU backend
reads each layer's count from its spec, not from the model-wide config (which keeps the original count).
"""

from __future__ import annotations

import copy

from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from llmopt.kv.config import kv_heads_per_layer


class PerLayerKVDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama layer, built from a copy of the config that holds this layer's KV head count."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None) -> None:
        config = config or vllm_config.model_config.hf_config
        heads = kv_heads_per_layer(config)[extract_layer_index(prefix)]
        if heads != config.num_key_value_heads:
            config = copy.copy(config)
            config.num_key_value_heads = heads
        super().__init__(vllm_config, prefix, config)


class LlmoptKVLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's Llama with one KV head count per layer, read from the checkpoint's llmopt record."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=PerLayerKVDecoderLayer)
