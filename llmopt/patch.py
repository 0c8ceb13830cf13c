"""`patch_model`: apply the configured transforms in order (kv → routing → sparse) to the model given."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from llmopt.calibration import CalibrationData
from llmopt.config import KVCompressionConfig, OptimizationConfig

Handler = Callable[..., nn.Module]
_HANDLERS: dict[type, Handler] = {}


def register_transform(config_type: type) -> Callable[[Handler], Handler]:
    """Register `handler(model, config, *, tokenizer, calibration) -> model` for one config type."""
    def decorate(handler: Handler) -> Handler:
        _HANDLERS[config_type] = handler
        return handler
    return decorate


def patch_model(model: nn.Module, config: OptimizationConfig, *, tokenizer=None,
                calibration: CalibrationData = None) -> nn.Module:
    """Transform `model` in place as `config` says and return it; `generate()` works as before.

    `calibration`: texts (tokenized here with `tokenizer`) or token windows ``[n, seq_len]``.
    """
    if not isinstance(config, OptimizationConfig):
        config = OptimizationConfig(**{_field_for(config): config})
    for transform in config.transforms():
        handler = _HANDLERS.get(type(transform))
        if handler is None:
            raise NotImplementedError(
                f"{type(transform).__name__} has not landed in llmopt yet; available: "
                f"{', '.join(t.__name__ for t in _HANDLERS)}"
            )
        model = handler(model, transform, tokenizer=tokenizer, calibration=calibration)
    return model


def _field_for(transform_config) -> str:
    for name, cls in (("kv", KVCompressionConfig),):
        if isinstance(transform_config, cls):
            return name
    raise TypeError(f"patch_model takes an OptimizationConfig or a transform config, got {transform_config!r}")


def _register_builtin() -> None:
    from llmopt.kv.transform import compress_kv_heads

    register_transform(KVCompressionConfig)(compress_kv_heads)


_register_builtin()
