"""What was done to a model, stored in its config (and so in config.json), as llm-compressor records quantization."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch.nn as nn

RECORD_KEY = "llmopt"


def add_record(model: nn.Module, transform: str, config: Any, details: dict) -> None:
    record = getattr(model.config, RECORD_KEY, None) or {"version": 1, "transforms": []}
    record["transforms"].append({"transform": transform, "config": asdict(config), **details})
    setattr(model.config, RECORD_KEY, record)


def read_record(model_or_config: Any) -> dict | None:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, RECORD_KEY, None)
