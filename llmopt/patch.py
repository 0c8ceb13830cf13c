"""`patch_model`: apply the configured transforms in stage order (kv → routing → sparse) to the model given."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from llmopt.config import ConfigError, OptimizationConfig
from llmopt.record import read_record, write_record
from llmopt.transforms import CalibrationContext, Observer, Transform, transform_for

DIAGNOSTICS_ATTRIBUTE = "llmopt_diagnostics"


def patch_model(model: nn.Module, config: Any, *, tokenizer=None, calibration=None,
                observer: Observer | None = None) -> nn.Module:
    """Transform `model` in place as `config` says and return it; `generate()` works as before.

    `config`: an `OptimizationConfig` or one transform's config. `calibration`: texts (tokenized with
    `tokenizer`) or token windows ``[n, seq_len]``. `observer(stage, model, facts)` is called at named intermediate
    stages (e.g. ``"kv/training-free"``) so a caller can measure them. Every transform is found and checked
    before the first one runs. Diagnostics go to ``model.llmopt_diagnostics``; the record of what was done
    to ``model.config.llmopt`` (written into config.json by `save_optimized`).
    """
    plan = _checked_plan(model, config, tokenizer, calibration, observer)
    record = read_record(model)
    diagnostics = getattr(model, DIAGNOSTICS_ATTRIBUTE, {})
    for name, settings, transform, context in plan:
        # recorded before it runs, so that an observer measuring an intermediate stage sees what it costs
        before, record = record, OptimizationConfig(**{**(record.transforms if record else {}), name: settings})
        write_record(model, record)
        try:
            diagnostics[name] = transform.calibrate(model, settings, context)
        except BaseException:
            write_record(model, before)
            raise
        record = read_record(model)  # a transform may record what it chose (e.g. kv counts under a budget)
    setattr(model, DIAGNOSTICS_ATTRIBUTE, diagnostics)
    return model


def check_recipe(model: nn.Module, config: Any, *, tokenizer=None, calibration=None) -> None:
    """Raise what `patch_model(model, config, ...)` would refuse (ConfigError, ValueError), changing nothing: the
    model's architecture and head counts, the amount of calibration text, each transform's own `check`. A caller
    that measures the model before patching it calls this first, so a bad recipe costs no measurement."""
    _checked_plan(model, config, tokenizer, calibration, None)


def _checked_plan(model: nn.Module, config: Any, tokenizer, calibration,
                  observer: Observer | None) -> list[tuple[str, Any, Transform, CalibrationContext]]:
    """(name, settings, transform, context) for each transform of `config`, in stage order, every one checked."""
    if not isinstance(config, OptimizationConfig):
        if not hasattr(type(config), "name"):
            raise TypeError(f"patch_model takes an OptimizationConfig or a transform config, got {config!r}")
        config = OptimizationConfig(**{type(config).name: config})
    record = read_record(model)
    done = [name for name in config.transforms if record is not None and record.get(name) is not None]
    if done:
        raise ConfigError(f"the model already went through {', '.join(done)}; start from the original model")
    plan = [(name, settings, transform_for(settings), CalibrationContext(tokenizer, calibration, observer, f"{name}/"))
            for name, settings in config.transforms.items()]
    for _, settings, transform, context in plan:
        transform.check(model, settings, context)
    return plan


def diagnostics(model: nn.Module) -> dict:
    """What each transform reported while calibrating `model` (empty for a loaded model)."""
    return getattr(model, DIAGNOSTICS_ATTRIBUTE, {})
