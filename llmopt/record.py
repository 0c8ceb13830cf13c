"""What was done to a model, in its config (and so in config.json), as llm-compressor records quantization.

The record is exactly a recipe (`OptimizationConfig.to_dict()`): the transforms and their configs, with the
format version; re-validated strictly whenever it is read. Diagnostics never go here (see `save_optimized`).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from llmopt.config import ConfigError, OptimizationConfig

RECORD_KEY = "llmopt"


def read_record(model_or_config: Any) -> OptimizationConfig | None:
    """The transforms recorded in a model (or its config, or a config.json dict); None for an untouched model."""
    config = getattr(model_or_config, "config", model_or_config)
    data = config.get(RECORD_KEY) if isinstance(config, dict) else getattr(config, RECORD_KEY, None)
    if data is None:
        return None
    try:
        return OptimizationConfig.from_dict(data)
    except ConfigError as error:
        raise ConfigError(f"the model's llmopt record is not valid for this llmopt: {error}") from None


def write_record(model: nn.Module, record: OptimizationConfig) -> None:
    setattr(model.config, RECORD_KEY, record.to_dict())
