"""What a model costs to serve, the axis every report puts retention against."""

from __future__ import annotations

import torch
import torch.nn as nn

from llmopt.kv.config import kv_bytes_per_token
from llmopt.record import read_record
from llmopt.transforms import transform_for


def model_costs(model: nn.Module, windows: torch.Tensor | None = None) -> dict[str, float]:
    """KV cache bytes per token in bf16 (any model), then what each recorded transform reports it saves
    (`Transform.cost`), measured on held-out ``windows [n, seq_len]`` where it depends on the input."""
    costs: dict[str, float] = {"kv_bytes_per_token": kv_bytes_per_token(model.config, 2)}
    record = read_record(model)
    for settings in (record.transforms.values() if record else ()):
        costs.update(transform_for(settings).cost(model, settings, windows))
    return costs
