"""The config of learned token routing and of its router training."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from llmopt.config import require, require_choice
from llmopt.distill import DistillationConfig

METHODS = ("learned", "static", "random", "shortgpt")
FINETUNED = ("attention", "mlp", "norms")  # what routing.training.finetune may train in each decoder block


@dataclass
class RouterTrainingConfig(DistillationConfig):
    """Training with the LLM frozen, in two stages on the same calibration windows.

    1. The guide: `guide_steps` Adam steps (`guide_learning_rate`) in which the router's scores regress, per block,
       the log relative update of each token on the dense model (the update-size rule: a block skips the tokens
       it changes least). Forward passes of the LLM only. With skip adapters, `guide_rounds` rounds of guide and
       adapter fit: from the second on, the target is the update the fitted adapter leaves unexplained.
    2. Distillation against the dense model (the `DistillationConfig` loop: `steps`, `learning_rate`, ...)
       through straight-through gates: the skip adapters train at `learning_rate`, the router's parameters at
       `router_learning_rate` (0: the router stays as the guide left it). Every block's threshold is re-set on
       each batch to skip exactly its target share (the rate is held by construction, not by a penalty).

    ``finetune`` (optional, default none: the LLM stays frozen): the decoder blocks' "attention", "mlp" and/or
    "norms" weights train too, at `finetune_learning_rate`, so the blocks adapt to the tokens they no longer see;
    the teacher is then a frozen copy of the blocks as they were. The result is still served as is (the weights
    are saved), but it is a fine-tuned model: report it apart from the frozen one.
    """

    section: ClassVar[str] = "routing.training"
    steps: int = 120
    learning_rate: float = 1e-3
    batch_size: int = 4
    tokens: int = 65536
    warmup_steps: int = 5
    guide_steps: int = 100
    guide_learning_rate: float = 3e-3
    guide_rounds: int = 2
    router_learning_rate: float = 1e-4
    finetune: list[str] = field(default_factory=list)
    finetune_learning_rate: float = 3e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = sorted(set(self.finetune) - set(FINETUNED))
        require(not unknown, f"routing.training.finetune takes {', '.join(FINETUNED)}; got {', '.join(unknown)}")
        require(self.finetune_learning_rate > 0,
                f"routing.training.finetune_learning_rate must be positive, got {self.finetune_learning_rate}")
        require(self.guide_steps >= 0, f"routing.training.guide_steps must be non-negative, got {self.guide_steps}")
        require(self.guide_rounds >= 1, f"routing.training.guide_rounds must be at least 1, got {self.guide_rounds}")
        require(self.guide_learning_rate > 0,
                f"routing.training.guide_learning_rate must be positive, got {self.guide_learning_rate}")
        require(self.router_learning_rate >= 0,
                f"routing.training.router_learning_rate must be non-negative, got {self.router_learning_rate}")


@dataclass
class TokenRoutingConfig:
    """Per-block token skipping: a token either runs a decoder block or passes on the residual; skipped tokens keep
    writing their K/V there (dense KV layout).

    ``sparsity``: the share of token×block FLOPs to skip (attention and MLP weighted by their real cost).
    ``method``: "learned" (ours: routers trained with the LLM frozen) or a baseline: "static" (a fixed rule on
    position), "random" (a hash of the token, no learning), "shortgpt" (drop whole blocks with the lowest Block
    Influence). ``allocation``: per-block sparsity by greedy search on measured block sensitivity, or "uniform".
    ``features``: what the learned router sees, "residual" (from the residual stream; any attention kernel, vLLM
    included) or "ftp" (FTP's position and attention-mass features; they switch the model to eager attention and
    are not served by vLLM; see `llmopt.routing.router`). ``router``: one MLP of width ``hidden`` shared by all
    blocks, or a linear router per block. ``dense_blocks`` never skip (block 0: skipping there is catastrophic).
    ``adapter_rank``: a token that skips a block gets a rank-r linear update of its normalized state instead of
    none (fitted by least squares, then trained with the router; 0: plain pass-through). Allocation, feature
    statistics, adapter fits and thresholds use ``calibration_tokens`` tokens in windows of ``seq_len``.
    ``seed``: the initial router and the order of the guide's batches (and the random baseline's hash).
    """

    name: ClassVar[str] = "routing"
    stage: ClassVar[int] = 20
    transform: ClassVar[str] = "llmopt.routing.transform:TokenRouting"

    sparsity: float = 0.3
    method: Literal["learned", "static", "random", "shortgpt"] = "learned"
    allocation: Literal["search", "uniform"] = "search"
    features: Literal["residual", "ftp"] = "residual"
    router: Literal["shared-mlp", "per-block-linear"] = "shared-mlp"
    hidden: int = 64
    projections: int = 4
    dense_blocks: list[int] = field(default_factory=lambda: [0])
    adapter_rank: int = 32
    max_block_sparsity: float = 0.9
    calibration_tokens: int = 4096
    seq_len: int = 256
    seed: int = 0
    training: RouterTrainingConfig | None = field(default_factory=RouterTrainingConfig)

    def __post_init__(self) -> None:
        require(0.0 < self.sparsity < 1.0, f"routing.sparsity must be in (0, 1), got {self.sparsity}")
        require_choice("routing", "method", self.method, METHODS)
        require_choice("routing", "allocation", self.allocation, ("search", "uniform"))
        require_choice("routing", "features", self.features, ("residual", "ftp"))
        require_choice("routing", "router", self.router, ("shared-mlp", "per-block-linear"))
        require(self.hidden > 0, f"routing.hidden must be positive, got {self.hidden}")
        require(self.projections > 0, f"routing.projections must be positive, got {self.projections}")
        require(self.adapter_rank >= 0, f"routing.adapter_rank must be non-negative, got {self.adapter_rank}")
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
        require(self.training is None or self.method == "learned" or self.adapter_rank > 0,
                f"routing.training has nothing to train with method = {self.method!r} and adapter_rank = 0: "
                f"remove it or set adapter_rank")
