"""The config of learned token routing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from llmopt.config import require, require_choice


@dataclass
class TokenRoutingConfig:
    """Learned per-block token skipping (FTP-style routers); skipped tokens keep their K/V."""

    name: ClassVar[str] = "routing"
    stage: ClassVar[int] = 20
    transform: ClassVar[str] = "llmopt.routing.transform:TokenRouting"

    sparsity: float = 0.25
    features: Literal["residual", "attention"] = "residual"
    dense_blocks: list[int] = field(default_factory=lambda: [0])
    training_steps: int = 300

    def __post_init__(self) -> None:
        require(0.0 < self.sparsity < 1.0, f"routing.sparsity must be in (0, 1), got {self.sparsity}")
        require_choice("routing", "features", self.features, ("residual", "attention"))
        require(self.training_steps > 0, "routing.training_steps must be positive")
