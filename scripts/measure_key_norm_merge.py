"""Shared q/k RMSNorm (Qwen3, Gemma3): how the KV fold's key merges compare, as KL (nats/token) of the final logits
against the uncompressed model. Tiny random models (tests/tiny_models.py: 2 layers, 4 heads of 16 dims), made like
real checkpoints in the two ways that matter here: norm weights far from 1 (exp(0.7·N(0,1)), not plane-symmetric)
and key heads of different raw scale before the norm (×1, 4, 0.5, 2); 4 → 2 KV heads, 2,048 calibration tokens,
4 held-out random windows of 64 tokens.

    PYTHONPATH=$PWD python scripts/measure_key_norm_merge.py Qwen3ForCausalLM,Gemma3ForCausalLM

"after-norm calibrated" is llmopt's fold for these families; "before-norm calibrated" is the same fold on the
keys before the norm (the adapter's key_norm switched off for the run), as a norm-blind converter would do.
"""

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import tiny_family_model

from llmopt import KVCompressionConfig, patch_model
from llmopt.arch import adapter as arch

CALIBRATION = torch.randint(0, 97, (32, 64), generator=torch.Generator().manual_seed(1))
HELD_OUT = torch.randint(0, 97, (4, 64), generator=torch.Generator().manual_seed(2))
VARIANTS = (("after-norm calibrated", "calibrated", True), ("before-norm calibrated", "calibrated", False),
            ("mean-pool", "mean-pool", True), ("keep-one", "keep-one", True), ("svd-w", "svd-w", True))


def model_of(architecture: str) -> torch.nn.Module:
    model = tiny_family_model(architecture)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            for norm in (attention.q_norm, attention.k_norm):
                weight = torch.exp(0.7 * torch.randn(norm.weight.shape, generator=generator))
                norm.weight.copy_(weight - 1 if "Gemma" in architecture else weight)  # Gemma scales by 1 + weight
            attention.k_proj.weight.mul_(torch.tensor([1.0, 4.0, 0.5, 2.0]).repeat_interleave(16)[:, None])
    return model


def kl(reference: torch.nn.Module, model: torch.nn.Module) -> float:
    with torch.no_grad():
        p, q = reference(HELD_OUT).logits.log_softmax(-1), model(HELD_OUT).logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def main() -> None:
    for architecture in sys.argv[1].split(","):
        reference, adapter, row = model_of(architecture), arch.ADAPTERS[architecture], {}
        for label, method, after_norm in VARIANTS:
            arch.ADAPTERS[architecture] = adapter if after_norm else dataclasses.replace(adapter, key_norm=None)
            config = KVCompressionConfig(ratio=2, method=method, calibration_tokens=2048, seq_len=64)
            row[label] = round(kl(reference, patch_model(model_of(architecture), config, calibration=CALIBRATION)), 5)
        arch.ADAPTERS[architecture] = adapter
        print(architecture, row, flush=True)


if __name__ == "__main__":
    main()
