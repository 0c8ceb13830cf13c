"""The configs of KV-head compression and of its optional healing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from llmopt.config import ConfigError, require, require_choice
from llmopt.distill import DistillationConfig
from llmopt.precision import PRECISIONS, Precision

METHODS = ("calibrated", "mean-pool", "svd-w", "keep-one")


@dataclass
class HealingConfig(DistillationConfig):
    """Distillation against the original model's logits after the fold (see `DistillationConfig`); trains the
    attention projections (``parameters="attention"``) or only k/v (``"keys-values"``)."""

    section: ClassVar[str] = "healing"
    parameters: Literal["attention", "keys-values"] = "attention"

    def __post_init__(self) -> None:
        super().__post_init__()
        require_choice("healing", "parameters", self.parameters, ("attention", "keys-values"))


@dataclass
class LayerHealingConfig:
    """Layer-wise healing during the fold (`llmopt.kv.layer_healing`): `epochs` passes of Adam at
    `learning_rate` over the fold's calibration windows, per layer, training its attention projections."""

    epochs: int = 2
    learning_rate: float = 2e-4
    precision: Precision = "auto"

    def __post_init__(self) -> None:
        require(self.epochs >= 1, f"layer_healing.epochs must be at least 1, got {self.epochs}")
        require(self.learning_rate > 0, f"layer_healing.learning_rate must be positive, got {self.learning_rate}")
        require_choice("layer_healing", "precision", self.precision, PRECISIONS)


@dataclass
class KVCompressionConfig:
    """Merge groups of KV heads into fewer heads (MHA/GQA → GQA), folded into the weights.

    Give exactly one of ``num_kv_heads`` (the target of every layer, or a list with one target per layer: each a
    divisor of the layer's KV heads, at most that count) and ``ratio`` (current KV heads / target).
    ``max_loss`` (an accuracy budget, `llmopt.kv.budget`): each layer gets its own count, at least the target
    above, so that the perplexity ratio − 1 stays within it; measured on ``search_tokens`` of calibration text
    after the fold's, verified on ``verify_tokens`` after those (the search never sees them).
    ``method``: "calibrated" (ours: RoPE-exact complex keys, PCA values, fitted on activations) or a baseline:
    "mean-pool" (average the group's weights, the GQA paper's init), "svd-w" (SVD of the weights, no data),
    "keep-one" (keep the first head of each group). ``refit_o_proj`` (calibrated only): refit each o_proj by
    least squares to the original attention output. ``layer_healing`` (calibrated only): train each folded layer
    toward the original layer's output, also where the model is offloaded. ``healing``: end-to-end distillation
    after the fold (the model must fit in memory).
    """

    name: ClassVar[str] = "kv"
    stage: ClassVar[int] = 10
    transform: ClassVar[str] = "llmopt.kv.transform:KVCompression"

    num_kv_heads: int | list[int] | None = None
    ratio: int | None = None
    max_loss: float | None = None
    search_tokens: int = 4096
    verify_tokens: int = 4096
    method: Literal["calibrated", "mean-pool", "svd-w", "keep-one"] = "calibrated"
    key_objective: Literal["query-weighted", "plain"] = "query-weighted"
    value_objective: Literal["output-weighted", "plain"] = "output-weighted"
    refit_o_proj: bool = True
    calibration_tokens: int = 16384
    seq_len: int = 512
    tensor_parallel_size: int = 1
    layer_healing: LayerHealingConfig | None = None
    healing: HealingConfig | None = None

    def __post_init__(self) -> None:
        require((self.num_kv_heads is None) != (self.ratio is None), "kv: give exactly one of num_kv_heads and ratio")
        counts = self.num_kv_heads if isinstance(self.num_kv_heads, list) else [self.num_kv_heads, self.ratio]
        require(bool(counts) and all(value is None or _positive_int(value) for value in counts),
                f"kv.num_kv_heads and kv.ratio take positive integers (num_kv_heads: one per layer, or a list with "
                f"one per layer), got num_kv_heads={self.num_kv_heads!r}, ratio={self.ratio!r}")
        require(self.max_loss is None or self.max_loss > 0,
                f"kv.max_loss is the perplexity ratio - 1 a user gives up (e.g. 0.03), got {self.max_loss}")
        require(self.max_loss is None or self.method == "calibrated",
                "kv.max_loss searches over the calibrated fold: set method: calibrated")
        require(self.max_loss is None or not isinstance(self.num_kv_heads, list),
                "kv.max_loss chooses the per-layer counts itself: give num_kv_heads as one number (the fewest any "
                "layer may keep) or ratio, not a list")
        for name in ("search_tokens", "verify_tokens"):
            require(getattr(self, name) >= self.seq_len,
                    f"kv.{name} ({getattr(self, name)}) must be at least kv.seq_len ({self.seq_len})")
        require_choice("kv", "method", self.method, METHODS)
        require_choice("kv", "key_objective", self.key_objective, ("query-weighted", "plain"))
        require_choice("kv", "value_objective", self.value_objective, ("output-weighted", "plain"))
        require(self.seq_len >= 16, f"kv.seq_len must be at least 16, got {self.seq_len}")
        require(self.calibration_tokens >= self.seq_len,
                f"kv.calibration_tokens ({self.calibration_tokens}) must be at least kv.seq_len ({self.seq_len})")
        require(self.tensor_parallel_size >= 1, "kv.tensor_parallel_size must be at least 1")
        require(self.layer_healing is None or self.method == "calibrated",
                "kv.layer_healing runs inside the calibrated fold: set method: calibrated or drop layer_healing")

    def layer_targets(self, num_kv_heads: int, num_layers: int) -> list[int]:
        """The KV head count of each of `num_layers` layers after compression (each has `num_kv_heads` today)."""
        if isinstance(self.num_kv_heads, list):
            if len(self.num_kv_heads) != num_layers:
                raise ConfigError(f"kv.num_kv_heads lists {len(self.num_kv_heads)} counts; the model has "
                                  f"{num_layers} layers: give one per layer")
            return list(self.num_kv_heads)
        return [self.target_kv_heads(num_kv_heads)] * num_layers

    def target_kv_heads(self, num_kv_heads: int) -> int:
        """The KV head count after compression of every layer, each of which has `num_kv_heads` today (a config
        with one count per layer: see `layer_targets`)."""
        if isinstance(self.num_kv_heads, list):
            raise ConfigError("kv.num_kv_heads lists one count per layer: ask layer_targets for them")
        if self.num_kv_heads is not None:
            return self.num_kv_heads
        if num_kv_heads % self.ratio:
            raise ConfigError(f"kv.ratio = {self.ratio} does not divide the model's {num_kv_heads} KV heads; "
                              f"use a divisor of {num_kv_heads} or set num_kv_heads")
        return num_kv_heads // self.ratio

    @property
    def needs_calibration(self) -> bool:
        return self.method == "calibrated" or self.healing is not None


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def kv_heads_per_layer(config: Any) -> list[int]:
    """The KV head count of each layer of a model with HF `config`: its llmopt record's per-layer counts where it
    has them, else the config's one count in every layer."""
    from llmopt.arch import attention_shape
    from llmopt.record import read_record

    shape = attention_shape(config)
    record = read_record(config)
    kv = record.get(KVCompressionConfig.name) if record is not None else None
    if kv is not None and isinstance(kv.num_kv_heads, list):
        return kv.layer_targets(shape.num_kv_heads, shape.num_layers)
    return [shape.num_kv_heads] * shape.num_layers


def kv_bytes_per_token(config: Any, bytes_per_element: int) -> int:
    """K and V of every layer for one token, each layer with its own KV head count (`kv_heads_per_layer`)."""
    from llmopt.arch import attention_shape

    return 2 * sum(kv_heads_per_layer(config)) * attention_shape(config).head_dim * bytes_per_element
