"""Human-readable facts about a model: the numbers a user checks before and after a transform."""

from __future__ import annotations

import torch.nn as nn

from llmopt.arch import attention_shape
from llmopt.kv.config import kv_bytes_per_token, kv_heads_per_layer
from llmopt.record import read_record

KV_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}


def rope_description(config) -> str:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", "default") if isinstance(scaling, dict) else "default"
    return f"theta={theta:g}, {kind}" if theta is not None else kind


def model_summary(model: nn.Module) -> str:
    config = model.config
    shape = attention_shape(config)
    heads = kv_heads_per_layer(config)
    params = sum(p.numel() for p in model.parameters())
    rows = [
        ("architecture", (getattr(config, "architectures", None) or [type(model).__name__])[0]),
        ("parameters", f"{params / 1e6:.1f}M"),
        ("layers", shape.num_layers),
        ("hidden size", shape.hidden_size),
        ("attention heads", shape.num_heads),
        ("KV heads", shape.num_kv_heads if len(set(heads)) == 1 else f"per layer {heads}"),
        ("head dim", shape.head_dim),
        ("RoPE", rope_description(config)),
        ("tied embeddings", bool(getattr(config, "tie_word_embeddings", False))),
    ]
    rows += [(f"KV bytes/token ({name})", f"{kv_bytes_per_token(config, size):,}") for name, size in KV_DTYPES.items()]
    record = read_record(model)
    if record:
        rows.append(("llmopt transforms", ", ".join(record.transforms)))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
