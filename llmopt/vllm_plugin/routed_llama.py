"""llmopt's routed Llama in vLLM: vLLM's `LlamaForCausalLM` with a routed decoder layer and the checkpoint's router.

The router (``model.token_router``, llmopt's `TokenRouter`, loaded from the checkpoint in float32) and its config
(the llmopt record in config.json) are those of the transformers model. It scores vLLM's flat batch, prefill chunks
and decode tokens of every request together: each feature is a function of one token, so the decisions do not
depend on how the scheduler batches or chunks. In a routed block every token writes its K/V; only kept tokens run
attention (`kept_attention`), o_proj and the MLP. q/k/v stay one fused GEMM over all tokens, since the skipped ones
need their K/V anyway. The model runs eagerly even where vLLM would compile it (data-dependent gathers, and the
router carries each block's input to the next), with vLLM's CPU kernels for its norms, rotary embedding and
activation, as in eager mode (for a compiled model vLLM picks their torch versions, slower when not compiled).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from vllm.compilation.decorators import ignore_torch_compile
from vllm.config import CompilationConfig, VllmConfig
from vllm.model_executor.models.llama import LlamaForCausalLM, LlamaModel
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

from llmopt.record import read_record
from llmopt.routing.router import TokenRouter
from llmopt.vllm_plugin.kept_attention import kept_attention, step_metadata, write_kv
from llmopt.vllm_plugin.per_layer_kv import PerLayerKVDecoderLayer
from llmopt.vllm_plugin.servable import FTP, FTP_REFUSAL


class RoutedDecoderLayer(PerLayerKVDecoderLayer):
    """vLLM's Llama layer (with its own KV head count) asking the model's router which tokens run it. Returns ``(mlp_out, residual)`` as vLLM's
    layers do (the next norm adds them): a skipped token's row is ``(its skip adapter's update or 0, its input)``."""

    token_router: TokenRouter

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None) -> None:
        super().__init__(vllm_config, prefix, config)
        if not isinstance(self.self_attn.attn.impl, CPUAttentionBackendImpl):
            raise NotImplementedError("llmopt: routed models run on vLLM's CPU attention backend only (got "
                                      f"{type(self.self_attn.attn.impl).__name__})")
        self.layer_index = extract_layer_index(prefix)
        self.tokens_seen = 0  # tokens this block routed in real steps, and how many of them ran it
        self.tokens_kept = 0

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions ``[T]``, hidden_states/residual ``[T, H]`` (the block's input is their sum)."""
        router, index = self.token_router, self.layer_index
        # a fresh tensor: vLLM's norms add the residual in place, and the router keeps this for the next block
        x = hidden_states.clone() if residual is None else hidden_states + residual
        if router.dropped(index):
            output = router.skip_update(index, self.input_layernorm(x)), x
        elif router.routes(index):
            output = self._routed(positions, x)
        else:
            output = super().forward(positions, hidden_states, residual)
        router.remember(index, x[None])
        return output

    def _routed(self, positions: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attention = self.self_attn
        normed = self.input_layernorm(x)
        keep = self.token_router.decide(self.layer_index, x[None], normed[None], positions[None])[0][0]
        metadata = step_metadata(attention.attn)
        if metadata is not None:
            keep[metadata.num_actual_tokens:] = False  # padding rows
            self.tokens_seen += metadata.num_actual_tokens
        rows = keep.nonzero().squeeze(1)
        qkv, _ = attention.qkv_proj(normed)
        q, k, v = qkv.split([attention.q_size, attention.kv_size, attention.kv_size], dim=-1)
        k, _ = attention.rotary_emb(positions, k)  # the keys alone: in place on CPU, a new tensor natively
        if metadata is None:  # a dummy run (memory profiling): every token runs, attention is left out
            rows = torch.arange(len(x), device=x.device)
            attended = q.new_zeros(len(x), attention.q_size)
        else:
            write_kv(attention.attn, k, v)
            self.tokens_kept += len(rows)
            if len(rows) == 0:
                return self._skip_updates(normed, keep), x
            q, _ = attention.rotary_emb(positions[rows], q[rows])
            attended = kept_attention(attention.attn, metadata, q, rows, positions)
        update, _ = attention.o_proj(attended)
        mlp_in, kept = self.post_attention_layernorm(update, x[rows])
        return self._skip_updates(normed, keep).index_copy_(0, rows, self.mlp(mlp_in)), x.index_copy(0, rows, kept)

    def _skip_updates(self, normed: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``[T, H]``: the skip adapter's update in the rows of skipped tokens, zeros elsewhere."""
        updates = torch.zeros_like(normed)
        if self.token_router.adapts:
            skipped = (~keep).nonzero().squeeze(1)
            updates.index_copy_(0, skipped, self.token_router.skip_update(self.layer_index, normed[skipped]))
        return updates


@contextlib.contextmanager
def vllm_kernels(compilation_config: CompilationConfig) -> Iterator[None]:
    """vLLM's own kernels ("custom ops") by default for the layers built in the scope; explicit choices stay."""
    saved = list(compilation_config.custom_ops)
    compilation_config.custom_ops[:] = ["all" if op == "none" else op for op in saved]
    try:
        yield
    finally:
        compilation_config.custom_ops[:] = saved


@ignore_torch_compile
class RoutedLlamaModel(LlamaModel):
    """vLLM's `LlamaModel`, never compiled."""


class LlmoptLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's Llama with llmopt's token routing, built from the checkpoint's record and router weights."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        with vllm_kernels(vllm_config.compilation_config):
            super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=RoutedDecoderLayer)
        config = vllm_config.model_config.hf_config
        record = read_record(config)
        routing = record.get("routing") if record is not None else None
        if routing is None:
            raise ValueError("llmopt: this checkpoint names LlmoptLlamaForCausalLM but its llmopt record has no "
                             "routing; re-save it with llmopt")
        if routing.features == FTP:
            raise ValueError(f"llmopt: cannot serve {FTP_REFUSAL}")
        router = TokenRouter(routing, config.num_hidden_layers, config.hidden_size).float().eval()
        self.model.token_router = router
        for layer in self.model.layers:
            object.__setattr__(layer, "token_router", router)  # registered once, at model.token_router

    def _init_model(self, vllm_config: VllmConfig, prefix: str = "",
                    layer_type: type[nn.Module] = RoutedDecoderLayer) -> RoutedLlamaModel:
        return RoutedLlamaModel(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)

    def routing_counts(self) -> dict[int, tuple[int, int]]:
        """Per routed block: (tokens routed, tokens that ran the block) over the steps served so far."""
        return {layer.layer_index: (layer.tokens_seen, layer.tokens_kept) for layer in self.model.layers
                if layer.tokens_seen}
