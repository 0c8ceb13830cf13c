"""Which floating-point type training and estimates compute in: bfloat16 where the device has bf16 arithmetic,
float32 elsewhere. On a CPU without AVX512-BF16 or AMX, torch's bf16 matmuls fall back to a scalar kernel: 7×
slower than float32 on an AVX2 EPYC, where one distillation step of the default model took 229 s instead of a few.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Literal

import torch

Precision = Literal["auto", "bfloat16", "float32"]
PRECISIONS = ("auto", "bfloat16", "float32")


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls in hardware (CUDA with bf16; a CPU with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def resolve_precision(precision: Precision, device: torch.device) -> Literal["bfloat16", "float32"]:
    """`precision`, with "auto" made bfloat16 where `device` has native bf16 and float32 elsewhere."""
    if precision == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    return precision


def training_autocast(precision: Literal["bfloat16", "float32"], device: torch.device) -> ContextManager:
    """bf16 autocast for a resolved "bfloat16" (weights stay float32), nothing for "float32"."""
    if precision == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
