"""The config of learned token routing and of its router training."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from llmopt.config import require, require_choice
from llmopt.distill import DistillationConfig

METHODS = ("learned", "static", "random", "shortgpt")


@dataclass
class RouterTrainingConfig(DistillationConfig):
    """Router training with the LLM frozen (see `DistillationConfig` for the loop): distillation against the dense
    model, plus `rate_weight` × the squared gap between each block's soft skip rate and its target, plus
    `guide_weight` × a cross-entropy toward the update-size rule (skip the tokens the block changes least),
    decayed linearly to zero over the first `guide_fraction` of the steps."""

    section: ClassVar[str] = "routing.training"
    steps: int = 60
    learning_rate: float = 3e-3
    batch_size: int = 2
    tokens: int = 65536
    warmup_steps: int = 5
    rate_weight: float = 10.0
    guide_weight: float = 1.0
    guide_fraction: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.rate_weight >= 0, f"routing.training.rate_weight must be non-negative, got {self.rate_weight}")
        require(self.guide_weight >= 0, f"routing.training.guide_weight must be non-negative, got {self.guide_weight}")
        require(0 < self.guide_fraction <= 1,
                f"routing.training.guide_fraction must be in (0, 1], got {self.guide_fraction}")


@dataclass
class TokenRoutingConfig:
    """Per-block token skipping: a token either runs a decoder block or passes on the residual; skipped tokens keep
    writing their K/V there (dense KV layout).

    ``sparsity``: the share of token×block FLOPs to skip (attention and MLP weighted by their real cost).
    ``method``: "learned" (ours: routers trained with the LLM frozen) or a baseline: "static" (a fixed rule on
    position), "random" (a hash of the token, no learning), "shortgpt" (drop whole blocks with the lowest Block
    Influence). ``allocation``: per-block sparsity by greedy search on measured block sensitivity, or "uniform".
    ``router``: one MLP of width ``hidden`` shared by all blocks, or a linear router per block. ``dense_blocks``
    never skip (block 0: skipping there is catastrophic). Allocation, feature statistics and thresholds are fitted
    on ``calibration_tokens`` tokens in windows of ``seq_len``.
    """

    name: ClassVar[str] = "routing"
    stage: ClassVar[int] = 20
    transform: ClassVar[str] = "llmopt.routing.transform:TokenRouting"

    sparsity: float = 0.3
    method: Literal["learned", "static", "random", "shortgpt"] = "learned"
    allocation: Literal["search", "uniform"] = "search"
    features: Literal["residual"] = "residual"
    router: Literal["shared-mlp", "per-block-linear"] = "shared-mlp"
    hidden: int = 64
    projections: int = 4
    dense_blocks: list[int] = field(default_factory=lambda: [0])
    max_block_sparsity: float = 0.9
    calibration_tokens: int = 4096
    seq_len: int = 256
    seed: int = 0
    training: RouterTrainingConfig | None = field(default_factory=RouterTrainingConfig)

    def __post_init__(self) -> None:
        require(0.0 < self.sparsity < 1.0, f"routing.sparsity must be in (0, 1), got {self.sparsity}")
        require_choice("routing", "method", self.method, METHODS)
        require_choice("routing", "allocation", self.allocation, ("search", "uniform"))
        require_choice("routing", "features", self.features, ("residual",))
        require_choice("routing", "router", self.router, ("shared-mlp", "per-block-linear"))
        require(self.hidden > 0, f"routing.hidden must be positive, got {self.hidden}")
        require(self.projections > 0, f"routing.projections must be positive, got {self.projections}")
        require(all(b >= 0 for b in self.dense_blocks), f"routing.dense_blocks must be block indices, "
                                                        f"got {self.dense_blocks}")
        require(0.0 < self.max_block_sparsity < 1.0,
                f"routing.max_block_sparsity must be in (0, 1), got {self.max_block_sparsity}")
        require(self.seq_len >= 16, f"routing.seq_len must be at least 16, got {self.seq_len}")
        require(self.calibration_tokens >= self.seq_len,
                f"routing.calibration_tokens ({self.calibration_tokens}) must be at least routing.seq_len "
                f"({self.seq_len})")
        require(self.method != "learned" or self.training is not None,
                "routing.method = 'learned' needs routing.training (the router is trained)")
