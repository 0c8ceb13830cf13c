"""KV-head compression as one transform: (calibrated) fold per layer → optional o_proj refit → optional healing.

The result is vanilla: the same architecture with fewer KV heads, loaded by transformers and vLLM as is.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings

import torch
import torch.nn as nn

from llmopt.arch import ArchAdapter, AttentionShape, adapter_for, attention_shape
from llmopt.arch.adapter import UnsupportedModelError, architecture
from llmopt.config import ConfigError
from llmopt.kv.budget import spend_budget
from llmopt.kv.config import METHODS, KVCompressionConfig
from llmopt.kv.fold import fold_attention
from llmopt.kv.heal import heal_attention
from llmopt.kv.layerwise import LayerReport, calibrate_layerwise
from llmopt.kv.solvers import calibrated_fold, pooling_fold, weight_statistics
from llmopt.offload import is_offloaded, onloaded
from llmopt.record import read_record, write_record
from llmopt.transforms import CalibrationContext, Support, Transform


KEY_NORM_REFUSALS = {
    "layer-norm": ("LayerNorms over each key head (qk_layernorm: mean subtracted, own bias) sit between k_proj and "
                   "attention: a merge of key heads does not pass through them, and none is calibrated for them"),
    "whole-projection": ("k_norm normalizes the whole key projection at once (all heads together): with fewer "
                         "heads, every head's scale changes, so no merge of heads passes through it"),
}


def check_head_counts(num_heads: int, num_kv_heads: int, targets: list[int], tensor_parallel_size: int) -> None:
    """Refuse per-layer head counts that cannot be served; warn where vLLM would replicate KV heads across GPUs."""
    divisors = [n for n in range(1, num_kv_heads + 1) if num_kv_heads % n == 0]
    wrong = [(index, target) for index, target in enumerate(targets) if target not in divisors]
    if wrong:
        if is_uniform(targets):
            raise ConfigError(f"kv: {targets[0]} KV heads do not divide the model's {num_kv_heads} KV heads; "
                              f"choose one of {divisors[:-1]}")
        raise ConfigError(f"kv: layers {[i for i, _ in wrong]} ask for {[t for _, t in wrong]} KV heads, which do "
                          f"not divide the model's {num_kv_heads} KV heads; choose one of {divisors[:-1]} or "
                          f"{num_kv_heads} (the layer unchanged)")
    if min(targets) == num_kv_heads:
        raise ConfigError(f"kv: the model already has {num_kv_heads} KV heads; ask for fewer (a divisor of it)")
    tp = tensor_parallel_size
    for target in sorted(set(targets)):
        if num_heads % tp or (target % tp and tp % target):
            raise ConfigError(f"kv: tensor_parallel_size={tp} needs {num_heads} query heads divisible by it and "
                              f"{target} KV heads divisible by it (or dividing it); vLLM refuses otherwise")
        if target < tp:
            warnings.warn(f"{target} KV heads at tensor_parallel_size={tp}: vLLM replicates each KV head on "
                          f"{tp // target} GPUs, so each GPU still caches one full head", stacklevel=4)


def is_uniform(targets: list[int]) -> bool:
    return len(set(targets)) == 1


def fold_without_data(attention: nn.Module, adapter: ArchAdapter, config: KVCompressionConfig, shape: AttentionShape,
                      target: int, rotary_dims: int) -> None:
    """The baselines' folds: from the weights alone (svd-w) or by pooling the group's heads."""
    if config.method == "svd-w":
        _, k, v = adapter.projections(attention, shape.num_heads, shape.num_kv_heads, shape.head_dim)
        stats = weight_statistics(k, v, target, shape.head_dim, rotary_dims, adapter)
        fold = calibrated_fold(stats, None, shape.num_heads, shape.num_kv_heads, shape.head_dim,
                               query_weighted=False, output_weighted=False)
    else:
        fold = pooling_fold(target, shape.num_kv_heads // target, shape.head_dim,
                            keep_one=config.method == "keep-one", rotary_dims=rotary_dims)
    fold_attention(attention, adapter, fold, shape.num_heads, shape.num_kv_heads, shape.head_dim)


def _flag(adapter: ArchAdapter, switch: bool | str, model_config) -> bool | None:
    """Whether a switched fact holds for this checkpoint; None where it depends on a flag and no config is given."""
    if model_config is None and isinstance(switch, str):
        return None
    return adapter.holds(switch, model_config)


class KVCompression(Transform):
    vanilla = True

    def support(self, adapter: ArchAdapter, model_config=None) -> Support:
        conditions = [
            (adapter.key_norm_switch if adapter.key_norm in KEY_NORM_REFUSALS else False,
             KEY_NORM_REFUSALS.get(adapter.key_norm, "")),
            (adapter.clip_qkv, ("q, k and v are clamped elementwise after their projections, and the clamp of a "
                                "merged key head is not the merge of the clamped heads")),
            (not adapter.holds_fewer_kv_heads, (f"transformers' {adapter.family} class has no KV-head count "
                                                "(num_key_value_heads): nothing would load a result with fewer KV "
                                                "heads (not served yet)")),
        ]
        blocking, conditional = [], []
        for switch, reason in conditions:
            holds = _flag(adapter, switch, model_config)
            if holds:
                blocking.append(reason)
            elif holds is None:
                conditional.append(f"refused where {switch} is set: {reason}")
        if blocking:
            return Support(False, "; ".join(blocking))
        exact = "lossless where a group's heads are redundant, else a calibrated low-rank merge"
        if adapter.key_norm == "shared-rms":
            exact = ("approximate: values exact as elsewhere, keys merged after the shared q/k norm, whose per-token "
                     "rescaling of a merged head no fold can undo")
        return Support(True, "; ".join(conditional), exact=exact,
                       served_by=f"transformers' {adapter.family} class; vLLM: {adapter.vllm_path}")

    def is_vanilla(self, config: KVCompressionConfig) -> bool:
        """A uniform count is a plain checkpoint; one count per layer needs `apply` (and the vLLM plugin)."""
        return not isinstance(config.num_kv_heads, list) or is_uniform(config.num_kv_heads)

    def check(self, model: nn.Module, config: KVCompressionConfig, context: CalibrationContext) -> None:
        adapter = adapter_for(model)
        support = self.support(adapter, model.config)
        if not support.applies:
            raise UnsupportedModelError(f"kv: {architecture(model)}: {support.reason}")
        offloaded = is_offloaded(model)
        if offloaded and config.healing is not None:
            raise ConfigError("kv.healing distils the whole model end to end and needs it in memory, but this model "
                              "is offloaded: drop kv.healing, or give it more memory (--max-memory)")
        if not offloaded and any(p.device.type == "meta" for p in model.parameters()):
            raise ValueError("the model has weights on the meta device that no offload hook loads: load it with "
                             "real weights, or offloaded with accelerate (device_map, max_memory, offload folder)")
        shape = attention_shape(model.config)
        targets = config.layer_targets(shape.num_kv_heads, shape.num_layers)
        check_head_counts(shape.num_heads, shape.num_kv_heads, targets, config.tensor_parallel_size)
        self._calibration_windows(config, context, shape.num_kv_heads // min(targets) * shape.head_dim)

    def _calibration_windows(self, config: KVCompressionConfig, context: CalibrationContext,
                             group_width: int) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                                        tuple[torch.Tensor, torch.Tensor] | None]:
        """(fold windows, healing windows, (search windows, verification windows) of the accuracy budget), each
        None where the config does not need it; the budget's windows follow the fold's in the calibration text."""
        fold = heal = budget = None
        if config.method == "calibrated":
            extra = (config.search_tokens + config.verify_tokens) if config.max_loss is not None else 0
            fold = context.windows(config.seq_len, config.calibration_tokens + extra,
                                   minimum_tokens=4 * group_width + extra)
            if extra:
                split = [max(tokens // config.seq_len, 1) for tokens in
                         (config.calibration_tokens, config.search_tokens, config.verify_tokens)]
                fold, search, verify = fold[:sum(split)].split(split)
                budget = search, verify
        if config.healing is not None:
            heal = context.windows(config.healing.seq_len, config.healing.tokens)
        return fold, heal, budget

    def calibrate(self, model: nn.Module, config: KVCompressionConfig, context: CalibrationContext) -> dict:
        adapter, shape = adapter_for(model), attention_shape(model.config)
        targets = config.layer_targets(shape.num_kv_heads, shape.num_layers)
        windows, heal_windows, budget_windows = self._calibration_windows(
            config, context, shape.num_kv_heads // min(targets) * shape.head_dim)
        keep_originals = heal_windows is not None or budget_windows is not None
        originals = [copy.deepcopy(a) for a in adapter.attention_modules(model)] if keep_originals else []
        started = time.perf_counter()
        details: dict = {"num_key_value_heads": [shape.num_kv_heads, targets[0] if is_uniform(targets) else targets]}
        if config.method == "calibrated":
            def solve(attention, stats):
                return calibrated_fold(stats, getattr(attention, adapter.o_proj).weight.detach().cpu(),
                                       shape.num_heads, shape.num_kv_heads, shape.head_dim,
                                       query_weighted=config.key_objective == "query-weighted",
                                       output_weighted=config.value_objective == "output-weighted")

            reports = calibrate_layerwise(model, adapter, shape, targets, windows, solve, config.refit_o_proj,
                                          config.layer_healing)
            columns = [f.name for f in dataclasses.fields(LayerReport)
                       if any(getattr(r, f.name) is not None for r in reports)]
            details["layers"] = {name: [None if getattr(r, name) is None else round(getattr(r, name), 4)
                                        for r in reports] for name in columns}
        else:
            for index, (attention, target) in enumerate(zip(adapter.attention_modules(model), targets)):
                if target < shape.num_kv_heads:
                    with onloaded(attention):
                        fold_without_data(attention, adapter, config, shape, target,
                                          adapter.rotary_dims(model.config, index))
        details["fold_seconds"] = round(time.perf_counter() - started, 1)
        if budget_windows is not None:
            targets, details["budget"] = spend_budget(model, adapter, originals, shape, targets,
                                                      config.max_loss, *budget_windows)
            details["num_key_value_heads"][1] = targets[0] if is_uniform(targets) else targets
            record_layer_targets(model, config, targets)
        model.config.num_key_value_heads = targets[0] if is_uniform(targets) else shape.num_kv_heads
        if heal_windows is not None:
            context.observe("training-free", model, training_minutes=0.0)
            def checkpoint(mark: str, minutes: float) -> None:
                context.observe(f"healed {mark}", model, training_minutes=round(minutes, 2))

            details["healing"] = heal_attention(model, config.healing, heal_windows, adapter, originals, checkpoint)
        return details

    def apply(self, model: nn.Module, config: KVCompressionConfig) -> None:
        """Give each layer its recorded KV head count (k/v projections and the query grouping); nothing to do for a
        uniform count, which the saved config already holds (a vanilla checkpoint). The weights load after."""
        if self.is_vanilla(config):
            return
        adapter, shape = adapter_for(model), attention_shape(model.config)
        for attention, target in zip(adapter.attention_modules(model),
                                     config.layer_targets(shape.num_kv_heads, shape.num_layers)):
            if target < shape.num_kv_heads:
                fold = pooling_fold(target, shape.num_kv_heads // target, shape.head_dim, keep_one=True)
                fold_attention(attention, adapter, fold, shape.num_heads, shape.num_kv_heads, shape.head_dim)

    def baselines(self, config: KVCompressionConfig) -> dict[str, KVCompressionConfig]:
        return {method: dataclasses.replace(config, method=method, max_loss=None, layer_healing=None, healing=None)
                for method in METHODS if method != config.method}


def record_layer_targets(model: nn.Module, config: KVCompressionConfig, targets: list[int]) -> None:
    """Record the counts the budget chose (one number where uniform), in place of the budget that chose them."""
    chosen = dataclasses.replace(config, num_kv_heads=targets[0] if is_uniform(targets) else targets, ratio=None,
                                 max_loss=None)
    write_record(model, read_record(model).replace(KVCompressionConfig.name, chosen))
