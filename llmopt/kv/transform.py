"""KV-head compression as one transform: (calibrated) fold per layer → optional o_proj refit → optional healing."""

from __future__ import annotations

import copy
import time
import warnings
from typing import Callable

import torch.nn as nn

from llmopt.arch import adapter_for, attention_shape
from llmopt.calibration import CalibrationData, calibration_windows
from llmopt.config import ConfigError, KVCompressionConfig
from llmopt.kv.fold import fold_attention
from llmopt.kv.heal import heal_attention
from llmopt.kv.layerwise import calibrate_layerwise
from llmopt.kv.solvers import calibrated_fold, pooling_fold, weight_statistics
from llmopt.record import add_record


def check_head_counts(num_heads: int, num_kv_heads: int, target: int, tensor_parallel_size: int) -> None:
    """Refuse head counts that cannot be served; warn where vLLM would replicate KV heads across GPUs."""
    if target >= num_kv_heads:
        raise ConfigError(f"kv: the model already has {num_kv_heads} KV heads; ask for fewer (a divisor of it)")
    if num_kv_heads % target:
        divisors = [n for n in range(1, num_kv_heads) if num_kv_heads % n == 0]
        raise ConfigError(f"kv: {target} KV heads do not divide the model's {num_kv_heads} KV heads; "
                          f"choose one of {divisors}")
    tp = tensor_parallel_size
    if num_heads % tp or (target % tp and tp % target):
        raise ConfigError(f"kv: tensor_parallel_size={tp} needs {num_heads} query heads divisible by it and "
                          f"{target} KV heads divisible by it (or dividing it); vLLM refuses otherwise")
    if target < tp:
        warnings.warn(f"{target} KV heads at tensor_parallel_size={tp}: vLLM replicates each KV head on "
                      f"{tp // target} GPUs, so each GPU still caches one full head", stacklevel=3)


def compress_kv_heads(model: nn.Module, config: KVCompressionConfig, *, tokenizer=None,
                      calibration: CalibrationData = None,
                      after_fold: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Convert `model` in place to fewer KV heads; returns it, with a record of what was done in its config.

    `after_fold(model)`, if given, sees the training-free result before healing starts (to measure it).
    """
    adapter = adapter_for(model)
    if any(p.device.type == "meta" for p in model.parameters()):
        raise NotImplementedError("the model has weights offloaded to disk (meta tensors): the fold rewrites "
                                  "weights in place; load it onto devices that hold it (e.g. device_map=None)")
    shape = attention_shape(model.config)
    target = config.target_kv_heads(shape.num_kv_heads)
    check_head_counts(shape.num_heads, shape.num_kv_heads, target, config.tensor_parallel_size)
    g = shape.num_kv_heads // target
    windows = heal_windows = None
    if config.method == "calibrated":
        windows = calibration_windows(calibration, tokenizer, config.seq_len, config.calibration_tokens,
                                      minimum_tokens=4 * g * shape.head_dim)
    if config.healing is not None:
        heal_windows = calibration_windows(calibration, tokenizer, config.healing.seq_len, config.healing.tokens)
        originals = [copy.deepcopy(a) for a in adapter.attention_modules(model)]  # the teacher's attention
    started = time.perf_counter()
    details: dict = {"original_num_key_value_heads": shape.num_kv_heads, "num_key_value_heads": target}
    if config.method == "calibrated":
        def solve(attention, stats):
            return calibrated_fold(stats, getattr(attention, adapter.o_proj).weight.detach().cpu(),
                                   shape.num_heads, shape.num_kv_heads, shape.head_dim,
                                   query_weighted=config.key_objective == "query-weighted",
                                   output_weighted=config.value_objective == "output-weighted")

        reports = calibrate_layerwise(model, adapter, shape, target, windows, solve, config.refit_o_proj)
        details["layers"] = {name: [None if getattr(r, name) is None else round(getattr(r, name), 4)
                                    for r in reports] for name in ("key_error", "value_error", "refit_residual")}
    else:
        for attention in adapter.attention_modules(model):
            if config.method == "svd-w":
                stats = weight_statistics(getattr(attention, adapter.k_proj), getattr(attention, adapter.v_proj),
                                          target, shape.head_dim)
                fold = calibrated_fold(stats, None, shape.num_heads, shape.num_kv_heads, shape.head_dim,
                                       query_weighted=False, output_weighted=False)
            else:
                fold = pooling_fold(target, g, shape.head_dim, keep_one=config.method == "keep-one")
            fold_attention(attention, adapter, fold, shape.num_heads, shape.num_kv_heads, shape.head_dim)
    model.config.num_key_value_heads = target
    details["fold_seconds"] = round(time.perf_counter() - started, 1)
    if after_fold is not None:
        after_fold(model)
    if heal_windows is not None:
        details["healing"] = heal_attention(model, config.healing, heal_windows, adapter, originals)
    add_record(model, "kv", config, details)
    return model
