"""Sequential, layer-by-layer calibration over cached hidden states (the GPTQ / llm-compressor pipeline).

Each layer is calibrated on the inputs that the already-compressed layers before it produce, so errors do
not compound unseen; only one layer's activations and weights are ever held: an offloaded model (accelerate's
``device_map`` with ``max_memory``) has each layer brought into memory and written back in turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from llmopt.arch import ArchAdapter, AttentionShape
from llmopt.hooks import LayerInput, StopForward, first_layer_inputs, hooks, next_layer_inputs, run_until_stopped
from llmopt.kv.config import LayerHealingConfig
from llmopt.kv.fold import fold_attention
from llmopt.kv.layer_healing import heal_layer
from llmopt.kv.solvers import GroupFold, reconstruction_error
from llmopt.kv.statistics import LayerStatistics, StatisticsCollector
from llmopt.offload import onloaded


def refit_output_projection(attention: nn.Module, o_proj: nn.Linear, calls: list[tuple[dict, torch.Tensor]],
                            ridge: float = 1e-3) -> float:
    """Least-squares o_proj so the folded attention reproduces the original outputs of the same calls.

    Solves for the correction Δ to the folded weights W₀ (ridge toward W₀, so an exact fold stays exact):
    min ‖A (W₀ + Δ) − T‖² + λ‖Δ‖². Returns the relative residual ‖A (W₀ + Δ) − T‖ / ‖T‖.
    """
    width = o_proj.in_features
    folded = o_proj.weight.detach().float().cpu().T  # W₀ [in, out]
    gram = torch.zeros(width, width, dtype=torch.float64)
    cross = torch.zeros(width, o_proj.out_features, dtype=torch.float64)
    residual_energy = torch.zeros((), dtype=torch.float64)
    target_energy = torch.zeros((), dtype=torch.float64)
    inputs: list[torch.Tensor] = []
    with hooks(o_proj.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))):
        for kwargs, target in calls:
            attention(**kwargs)
            # Products per batch in float32 (fast GEMM), sums across batches and the solve in float64.
            a = inputs.pop().flatten(0, -2).float().cpu()
            t = target.flatten(0, -2).float().cpu()
            if o_proj.bias is not None:
                t = t - o_proj.bias.float().cpu()
            r = t - a @ folded
            gram += (a.T @ a).double()
            cross += (a.T @ r).double()
            residual_energy += (r.double() ** 2).sum()
            target_energy += (t.double() ** 2).sum()
    damp = ridge * torch.diagonal(gram).mean() * torch.eye(width, dtype=torch.float64)
    delta = torch.linalg.solve(gram + damp, cross)
    error = residual_energy - 2 * (delta * cross).sum() + (delta * (gram @ delta)).sum()
    o_proj.weight.copy_((folded.double() + delta).T.to(o_proj.weight))
    return float((error.clamp_min(0) / target_energy.clamp_min(1e-300)).sqrt())


@dataclass
class LayerReport:
    """Per layer: relative RMS reconstruction error of keys and values on windows held out from the fit, the
    relative residual of the o_proj refit, and the layer-healing error (relative squared error of the layer's
    output against the original trajectory, on the fit windows) over its first and last pass; None where off."""

    key_error: float
    value_error: float
    refit_residual: float | None
    healing_error_first: float | None = None
    healing_error_last: float | None = None


@torch.no_grad()
def calibrate_layerwise(model: nn.Module, adapter: ArchAdapter, shape: AttentionShape, groups: list[int],
                        windows: torch.Tensor, solve: Callable[[nn.Module, LayerStatistics], GroupFold],
                        refit: bool, healing: LayerHealingConfig | None = None,
                        batch_size: int = 4) -> list[LayerReport]:
    """Fold every layer in turn into its count of `groups` (KV heads; a layer that keeps all it has is passed
    through): statistics on its current inputs → `solve` → fold → optional o_proj refit → optional layer-wise
    healing toward the original model's trajectory (carried alongside).

    The last eighth of the windows is held out from the fit and only measures the reconstruction error.
    """
    held_out = max(len(windows) // 8, 1) if len(windows) > 1 else 0
    fit = first_layer_inputs(model, adapter, windows[: len(windows) - held_out], batch_size)
    check = first_layer_inputs(model, adapter, windows[len(windows) - held_out:], batch_size) if held_out else []
    original_trajectory = list(fit)
    reports = []
    layers = adapter.decoder_layers(model)
    for index, (layer, layer_groups) in enumerate(tqdm(zip(layers, groups), desc="calibrating layers", unit="layer",
                                                       total=len(layers))):
        rotary = adapter.rotary_dims(model.config, index)
        with onloaded(layer):
            if layer_groups == shape.num_kv_heads:
                reports.append(LayerReport(0.0, 0.0, None))
                if healing:
                    original_trajectory = next_layer_inputs(layer, original_trajectory)
                fit, check = next_layer_inputs(layer, fit), next_layer_inputs(layer, check)
                continue
            if healing:  # the layer is still the original one: its output on the original trajectory is the target
                original_trajectory = next_layer_inputs(layer, original_trajectory)
            attention = layer.get_submodule(adapter.attention)
            calls: list[tuple[dict, torch.Tensor]] = []
            fit_stats = _run_collecting(layer, attention, adapter, shape, layer_groups, rotary, fit,
                                        calls if refit else None)
            check_stats = (_run_collecting(layer, attention, adapter, shape, layer_groups, rotary, check) if check
                           else fit_stats)
            fold = solve(attention, fit_stats)
            key_error, value_error = reconstruction_error(fold, check_stats)
            fold_attention(attention, adapter, fold, shape.num_heads, shape.num_kv_heads, shape.head_dim)
            o_proj = getattr(attention, adapter.o_proj)
            residual = refit_output_projection(attention, o_proj, calls) if refit else None
            del calls
            errors = (None, None)
            if healing:
                errors = heal_layer(layer, adapter, fit, [hidden for hidden, _ in original_trajectory], healing)
            reports.append(LayerReport(key_error, value_error, residual, *errors))
            fit, check = next_layer_inputs(layer, fit), next_layer_inputs(layer, check)
    return reports


def _run_collecting(layer: nn.Module, attention: nn.Module, adapter: ArchAdapter, shape: AttentionShape,
                    groups: int, rotary_dims: int, batches: list[LayerInput],
                    calls: list[tuple[dict, torch.Tensor]] | None = None) -> LayerStatistics:
    """Run `layer` up to the end of its attention (the MLP's output would be thrown away) and collect its
    statistics, and, into `calls`, each attention call's keyword arguments and output (the refit's targets)."""
    collector = StatisticsCollector(attention, adapter, shape, groups, rotary_dims)

    def record(_module, args, kwargs, output):
        calls.append(({**kwargs, **dict(zip(["hidden_states"], args))}, output[0]))

    def stop(*_):
        raise StopForward

    handles = [attention.register_forward_hook(record, with_kwargs=True)] if calls is not None else []
    try:
        with hooks(*handles, attention.register_forward_hook(stop)):
            for hidden, kwargs in batches:
                run_until_stopped(layer, hidden, **kwargs)
    finally:
        collector.remove()
    return collector.stats.normalized()
