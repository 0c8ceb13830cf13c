"""What was done to a model, in its config (and so in config.json), as llm-compressor records quantization.

The record is exactly a recipe (`OptimizationConfig.to_dict()`): the transforms and their configs, with the
format version; re-validated strictly whenever it is read. A saved checkpoint whose config.json names llmopt's vLLM
architecture keeps the original ``architectures`` in its record too. Diagnostics never go here (see
`save_optimized`).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from llmopt.config import ConfigError, OptimizationConfig

RECORD_KEY = "llmopt"
ORIGINAL_ARCHITECTURES = "architectures"


def read_record(model_or_config: Any) -> OptimizationConfig | None:
    """The transforms recorded in a model (or its config, or a config.json dict); None for an untouched model."""
    data = _raw_record(model_or_config)
    if data is None:
        return None
    try:
        return OptimizationConfig.from_dict({k: v for k, v in data.items() if k != ORIGINAL_ARCHITECTURES}
                                            if isinstance(data, dict) else data)
    except ConfigError as error:
        raise ConfigError(f"the model's llmopt record is not valid for this llmopt: {error}") from None


def write_record(model: nn.Module, record: OptimizationConfig | None) -> None:
    """Record `record` in the model's config (None: the model is untouched)."""
    if record is None:
        if hasattr(model.config, RECORD_KEY):
            delattr(model.config, RECORD_KEY)
    else:
        setattr(model.config, RECORD_KEY, record.to_dict())


def original_architectures(model_or_config: Any) -> list[str] | None:
    """The architectures the model had before config.json named llmopt's vLLM class (None: it names its own)."""
    data = _raw_record(model_or_config)
    return data.get(ORIGINAL_ARCHITECTURES) if isinstance(data, dict) else None


def _raw_record(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    return config.get(RECORD_KEY) if isinstance(config, dict) else getattr(config, RECORD_KEY, None)
