"""Token routing as one transform: allocate per-block sparsity → (learned) guide the router → fit the skip adapters
→ distil (adapters, and the router at its own rate) → hold thresholds to target.

The result is not vanilla: decoder layers become `RoutedLlamaDecoderLayer` (same weights, same names) and the
router lives at ``model.model.token_router``, saved with the weights.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from llmopt.arch.adapter import ADAPTERS, ArchAdapter, UnsupportedModelError, adapter_for, architecture
from llmopt.config import ConfigError
from llmopt.routing.adapters import fit_adapters
from llmopt.routing.allocation import (
    LEVELS,
    block_influence,
    block_sensitivity,
    greedy_allocation,
    shortgpt_blocks,
    uniform_allocation,
)
from llmopt.routing.config import TokenRoutingConfig
from llmopt.routing.flops import block_flops, skipped
from llmopt.routing.layer import RoutedLlamaDecoderLayer
from llmopt.routing.router import TokenRouter
from llmopt.routing.train import (
    achieved_sparsity,
    calibrate_thresholds,
    fit_feature_statistics,
    guide_router,
    routed_keeps,
    train_router,
)
from llmopt.transforms import CalibrationContext, Support, Transform
from llmopt.vllm_plugin import ROUTED_ARCHITECTURE

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
SENSITIVITY_WINDOWS = 2  # of the calibration windows: each block's sensitivity costs a forward of the rest


def install(model: nn.Module, config: TokenRoutingConfig) -> TokenRouter:
    """Switch every decoder layer of `model` to the routed class in place and attach a fresh router (all blocks
    dense until its buffers are set or loaded). FTP features switch the model to eager attention: they need its
    probabilities."""
    layers = model.model.layers
    if config.features == "ftp":
        model.set_attn_implementation("eager")
    router = TokenRouter(config, len(layers), model.config.hidden_size).to(next(model.parameters()).device)
    router.train(model.training)
    model.model.token_router = router
    for index, layer in enumerate(layers):
        layer.__class__ = RoutedLlamaDecoderLayer
        layer.layer_index = index
        object.__setattr__(layer, "_token_router", router)  # shared, registered once: at model.model
        if config.features == "ftp":  # the blocks that run dense hand their eager attention weights on
            layer.self_attn.register_forward_hook(partial(hand_on_attention, router, index), with_kwargs=True)
    return router


def hand_on_attention(router: TokenRouter, index: int, _module, _args, kwargs, output) -> None:
    router.remember_attention(index, output[1], kwargs["hidden_states"].shape[1])


def router_of(model: nn.Module) -> TokenRouter:
    return model.model.token_router


class TokenRouting(Transform):
    def support(self, adapter: ArchAdapter, model_config=None) -> Support:
        if adapter is ADAPTERS["LlamaForCausalLM"]:
            return Support(True, exact="approximate (skipped tokens bypass the block)",
                           served_by=f"transformers; vLLM: the plugin's {ROUTED_ARCHITECTURE}")
        differences = [text for holds, text in (
            (adapter.holds(adapter.parallel_block, model_config), "attention and MLP in parallel"),
            (adapter.qkv_layout != "separate", f"a fused {adapter.qkv_proj}"),
            (bool(adapter.score_fields), "score scalars " + ", ".join(adapter.score_fields)),
            (adapter.key_norm is not None, "q/k norms"),
            (adapter.rope_layout != "rotate_half", "no RoPE")) if holds]
        return Support(False, "the routed decoder layer reimplements transformers' LlamaDecoderLayer; "
                              f"{adapter.family}'s layer is not implemented"
                              + (f" ({'; '.join(differences)})" if differences else ""))

    def check(self, model: nn.Module, config: TokenRoutingConfig, context: CalibrationContext) -> None:
        name = architecture(model)
        layers = getattr(getattr(model, "model", None), "layers", [])
        if name not in ADAPTERS:
            adapter_for(model)  # the error that names the supported architectures
        support = self.support(ADAPTERS[name], model.config)
        if not support.applies or not all(type(layer) is LlamaDecoderLayer for layer in layers):
            raise UnsupportedModelError(f"routing: {name}: {support.reason or 'its layers are not LlamaDecoderLayer'}")
        implementation = model.config._attn_implementation
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(f"routing: attention implementation {implementation!r} is not supported; load the "
                              f"model with attn_implementation in {ATTENTION_IMPLEMENTATIONS}")
        too_large = [b for b in config.dense_blocks if b >= len(layers)]
        if too_large:
            raise ConfigError(f"routing.dense_blocks {too_large} are not blocks of this {len(layers)}-block model")
        if config.adapter_rank >= model.config.hidden_size:
            raise ConfigError(f"routing.adapter_rank = {config.adapter_rank} must be below the hidden size "
                              f"({model.config.hidden_size}); a full-rank adapter costs as much as a small block")
        if self._needs_data(config):
            self._windows(config, context)
        if config.training is not None:
            context.windows(config.training.seq_len, config.training.tokens)

    @staticmethod
    def _needs_data(config: TokenRoutingConfig) -> bool:
        return config.method in ("learned", "shortgpt") or config.allocation == "search" or config.adapter_rank > 0

    @staticmethod
    def _windows(config: TokenRoutingConfig, context: CalibrationContext) -> torch.Tensor:
        return context.windows(config.seq_len, config.calibration_tokens)

    def calibrate(self, model: nn.Module, config: TokenRoutingConfig, context: CalibrationContext) -> dict:
        router = install(model, config)
        num_layers = len(router.threshold)
        windows = self._windows(config, context) if self._needs_data(config) else None
        share = block_flops(model.config, config.adapter_rank).skipped_share(config.seq_len)
        details: dict = {}
        started = time.perf_counter()
        blocks: dict[str, list] = {}
        if config.method == "shortgpt":
            with router.disabled():
                influence = block_influence(model, windows)
            sparsity = [0.0] * num_layers
            for index in shortgpt_blocks(influence, config.sparsity, config.dense_blocks):
                sparsity[index] = 1.0
            blocks["block_influence"] = [round(v, 5) for v in influence.tolist()]
        elif config.allocation == "search":
            with router.disabled():
                sensitivity = block_sensitivity(model, windows[:SENSITIVITY_WINDOWS], config.dense_blocks)
            sparsity = greedy_allocation(sensitivity, config.sparsity, config.dense_blocks, share,
                                         config.max_block_sparsity)
            blocks["kl_at_30%"] = [None if v == float("inf") else round(v, 5)
                                   for v in sensitivity[:, LEVELS.index(0.3)].tolist()]
        else:
            sparsity = uniform_allocation(config.sparsity, num_layers, config.dense_blocks, share,
                                          config.max_block_sparsity)
        router.block_sparsity.copy_(torch.tensor(sparsity))
        details["allocation_seconds"] = round(time.perf_counter() - started, 1)
        learned = config.method == "learned"
        training = config.training
        training_windows = None if training is None else context.windows(training.seq_len, training.tokens)
        if learned:
            fit_feature_statistics(model, router, windows)
        for round_ in range(training.guide_rounds if learned and config.adapter_rank else 1):
            if learned:
                details[f"guide_{round_ + 1}"] = guide_router(model, router, training_windows, training)
            if config.adapter_rank:
                blocks["adapter_fit_tokens"] = fit_adapters(model, router, windows)
        if learned:  # the guide and the adapter fit run the model dense: the thresholds matter from here on
            calibrate_thresholds(model, router, windows)
        if training is not None:
            context.observe("before distillation", model)
            details["training"] = train_router(model, router, training_windows, training)
            if learned:
                calibrate_thresholds(model, router, windows)
        blocks["target_sparsity"] = [round(v, 4) for v in sparsity]
        if windows is not None:
            keeps = routed_keeps(model, router, windows)
            blocks["achieved_sparsity"] = [round(v, 4) for v in achieved_sparsity(router, keeps)]
            costs = measured_cost(model, config, windows, keeps)
            details.update({f"calibration_{k}": round(v, 4) for k, v in costs.items()})
        details["blocks"] = blocks
        return details

    def apply(self, model: nn.Module, config: TokenRoutingConfig) -> None:
        install(model, config)

    def baselines(self, config: TokenRoutingConfig) -> dict[str, TokenRoutingConfig]:
        """ShortGPT as published (blocks dropped, nothing in their place); with the recipe's adapters, ShortGPT's
        dropped blocks replaced by adapters trained the same way; the static and random rules (adapters fitted,
        not trained); ours with uniform allocation."""
        baselines = {"shortgpt": dataclasses.replace(config, method="shortgpt", adapter_rank=0, training=None)}
        if config.adapter_rank:
            baselines["shortgpt-adapters"] = dataclasses.replace(config, method="shortgpt")
        return {**baselines, "static": dataclasses.replace(config, method="static", training=None),
                "random": dataclasses.replace(config, method="random", training=None),
                "uniform": dataclasses.replace(config, allocation="uniform")}

    def cost(self, model: nn.Module, config: TokenRoutingConfig,
             windows: torch.Tensor | None = None) -> dict[str, float]:
        """``token_sparsity`` and ``flops_skipped`` measured on `windows` (routed run; attention cost by real
        context length); without windows, the targets of the allocation."""
        router = router_of(model)
        if windows is None:
            return {"token_sparsity": router.block_sparsity.double().mean().item()}
        return measured_cost(model, config, windows, routed_keeps(model, router, windows))


def measured_cost(model: nn.Module, config: TokenRoutingConfig, windows: torch.Tensor,
                  keeps: dict[int, torch.Tensor]) -> dict[str, float]:
    """`TokenRouting.cost` of ``windows [n, seq_len]`` on which the routed blocks kept `keeps`."""
    router = router_of(model)
    num_layers = len(router.threshold)
    dropped = [index for index in range(num_layers) if router.dropped(index)]
    return skipped(block_flops(model.config, config.adapter_rank), num_layers, windows.shape[1], len(windows), keeps,
                   dropped)
