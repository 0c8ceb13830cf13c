"""Block-sparse prefill attention as one transform: no data, no weights; `apply` installs the backend."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from llmopt.arch import ArchAdapter, adapter_for
from llmopt.arch.adapter import UnsupportedModelError, architecture, sliding_window
from llmopt.config import ConfigError
from llmopt.sparse.attention import STATS_ATTRIBUTE, install
from llmopt.sparse.config import SparseAttentionConfig
from llmopt.transforms import CalibrationContext, Support, Transform


def triton_available() -> bool:
    """Whether the CUDA kernel can run here (a GPU and the kernel module)."""
    if not torch.cuda.is_available():
        return False
    try:
        import llmopt.triton_kernels.block_sparse_attention  # noqa: F401
    except ImportError:
        return False
    return True


class SparseAttention(Transform):
    def support(self, adapter: ArchAdapter, model_config=None) -> Support:
        softcap = "attn_logit_softcapping" in adapter.score_fields and (
            model_config is None or getattr(model_config, "attn_logit_softcapping", None) is not None)
        if softcap:
            return Support(False, "attention scores are soft-capped (attn_logit_softcapping), which the block "
                                  "selection and the block-sparse kernels do not apply")
        if model_config is not None and sliding_window(model_config) is not None:
            return Support(False, f"sliding-window layers (window {sliding_window(model_config)}): the block "
                                  "selection does not apply the window")
        return Support(True, "" if model_config is not None else "refused where the config sets a sliding window",
                       exact="approximate (blocks kept by cumulative attention mass)",
                       served_by="transformers (torch on CPU, Triton on CUDA); vLLM: the plugin's CPU backend")

    def check(self, model: nn.Module, config: SparseAttentionConfig, context: CalibrationContext) -> None:
        support = self.support(adapter_for(model), model.config)
        if not support.applies:
            raise UnsupportedModelError(f"sparse: {architecture(model)}: {support.reason}")
        if not model._can_set_attn_implementation():
            raise ConfigError(f"sparse: {type(model).__name__} does not dispatch attention through transformers' "
                              "AttentionInterface, so its attention cannot be switched")

    def calibrate(self, model: nn.Module, config: SparseAttentionConfig, context: CalibrationContext) -> dict:
        self.apply(model, config)
        device = next(model.parameters()).device
        return {"backend": "triton" if device.type == "cuda" and triton_available() else "torch",
                "dense_below_tokens": config.min_seq_len}

    def apply(self, model: nn.Module, config: SparseAttentionConfig) -> None:
        install(model, adapter_for(model).attention_modules(model), config)

    def baselines(self, config: SparseAttentionConfig) -> dict[str, SparseAttentionConfig]:
        return {"dense": dataclasses.replace(config, mass=1.0, decode_pages=0)}

    def cost(self, model: nn.Module, config: SparseAttentionConfig,
             windows: torch.Tensor | None = None) -> dict[str, float | str]:
        """``attention_density``: kept / causally possible blocks of the sparse calls, measured on `windows`
        when they are long enough to be sparse, else from the calls seen so far (1.0 if none was sparse); with
        sparse calls, also per layer (``attention_density_by_layer``, layer 0 first) and the share of KV heads
        whose selection took the vertical-slash pattern (``vertical_slash_heads``)."""
        stats = getattr(model, STATS_ATTRIBUTE)
        if windows is not None and windows.shape[-1] >= config.min_seq_len:
            stats.reset()
            device = next(model.parameters()).device
            with torch.no_grad():
                for window in windows:
                    model(window[None].to(device))
        if stats.density is None:
            return {"attention_density": 1.0}
        return {"attention_density": stats.density,
                "attention_density_by_layer": " ".join(f"{d:.2f}" for d in stats.layer_densities.values()),
                "vertical_slash_heads": stats.vertical_slash_heads / stats.selected_heads}
