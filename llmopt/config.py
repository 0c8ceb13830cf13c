"""Typed configs for the transforms and their composition, with a strict YAML/JSON round trip.

Every config validates in ``__post_init__`` and names the field and the fix; an unknown key is an error.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_VERSION = 1


class ConfigError(ValueError):
    """A config that cannot be used as written; the message says which field and what to change."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _choice(owner: str, name: str, value: Any, allowed: tuple) -> None:
    _check(value in allowed, f"{owner}.{name} = {value!r} is not one of {', '.join(map(repr, allowed))}")


@dataclass
class HealingConfig:
    """Distillation against the original model's logits after the fold; trains only attention projections.

    Runs `steps` optimizer steps of `batch_size` windows of `seq_len` tokens, taken in turn from `tokens`
    tokens of calibration text (fresh windows keep the student from memorising the teacher), stopping early
    after `minutes` if given. ``precision="bfloat16"`` runs the forward and
    backward passes under bf16 autocast (about 1.7× faster on a CPU with AVX-512 bf16); weights stay float32.
    """

    steps: int = 200
    minutes: float | None = None
    tokens: int = 262144
    learning_rate: float = 3e-4
    seq_len: int = 256
    batch_size: int = 4
    warmup_steps: int = 10
    parameters: Literal["attention", "keys-values"] = "attention"
    precision: Literal["bfloat16", "float32"] = "bfloat16"

    def __post_init__(self) -> None:
        _check(self.steps > 0, f"healing.steps must be positive, got {self.steps}")
        _check(self.minutes is None or self.minutes > 0, f"healing.minutes must be positive, got {self.minutes}")
        _check(self.learning_rate > 0, f"healing.learning_rate must be positive, got {self.learning_rate}")
        _check(self.seq_len >= 16, f"healing.seq_len must be at least 16, got {self.seq_len}")
        _check(self.batch_size > 0, f"healing.batch_size must be positive, got {self.batch_size}")
        _check(self.tokens >= self.seq_len * self.batch_size,
               f"healing.tokens ({self.tokens}) must hold at least one batch ({self.batch_size} × {self.seq_len})")
        _check(self.warmup_steps >= 0, f"healing.warmup_steps must be non-negative, got {self.warmup_steps}")
        _choice("healing", "parameters", self.parameters, ("attention", "keys-values"))
        _choice("healing", "precision", self.precision, ("bfloat16", "float32"))


@dataclass
class KVCompressionConfig:
    """Merge groups of KV heads into fewer heads (MHA/GQA → GQA), folded into the weights.

    Give exactly one of ``num_kv_heads`` (the target per layer) and ``ratio`` (current KV heads / target).
    ``method``: "calibrated" (ours: RoPE-exact complex keys, PCA values, fitted on activations) or a baseline:
    "mean-pool" (average the group's weights, the GQA paper's init), "svd-w" (SVD of the weights, no data),
    "keep-one" (keep the first head of each group). ``refit_o_proj`` (calibrated only): refit each o_proj by
    least squares to the original attention output. ``healing``: distillation after the fold.
    """

    num_kv_heads: int | None = None
    ratio: int | None = None
    method: Literal["calibrated", "mean-pool", "svd-w", "keep-one"] = "calibrated"
    key_objective: Literal["query-weighted", "plain"] = "query-weighted"
    value_objective: Literal["output-weighted", "plain"] = "output-weighted"
    refit_o_proj: bool = True
    calibration_tokens: int = 16384
    seq_len: int = 512
    tensor_parallel_size: int = 1
    healing: HealingConfig | None = None

    def __post_init__(self) -> None:
        _check((self.num_kv_heads is None) != (self.ratio is None), "kv: give exactly one of num_kv_heads and ratio")
        for name in ("num_kv_heads", "ratio"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"kv.{name} must be a positive integer, got {value}")
        _choice("kv", "method", self.method, ("calibrated", "mean-pool", "svd-w", "keep-one"))
        _choice("kv", "key_objective", self.key_objective, ("query-weighted", "plain"))
        _choice("kv", "value_objective", self.value_objective, ("output-weighted", "plain"))
        _check(self.seq_len >= 16, f"kv.seq_len must be at least 16, got {self.seq_len}")
        _check(self.calibration_tokens >= self.seq_len,
               f"kv.calibration_tokens ({self.calibration_tokens}) must be at least kv.seq_len ({self.seq_len})")
        _check(self.tensor_parallel_size >= 1, "kv.tensor_parallel_size must be at least 1")

    def target_kv_heads(self, num_kv_heads: int) -> int:
        """The KV head count after compression, for a layer that has `num_kv_heads` today."""
        if self.num_kv_heads is not None:
            return self.num_kv_heads
        _check(num_kv_heads % self.ratio == 0,
               f"kv.ratio = {self.ratio} does not divide the model's {num_kv_heads} KV heads; "
               f"use a divisor of {num_kv_heads} or set num_kv_heads")
        return num_kv_heads // self.ratio

    @property
    def needs_calibration(self) -> bool:
        return self.method == "calibrated" or self.healing is not None


@dataclass
class TokenRoutingConfig:
    """Learned per-block token skipping (FTP-style routers); skipped tokens keep their K/V."""

    sparsity: float = 0.25
    features: Literal["residual", "attention"] = "residual"
    dense_blocks: list[int] = field(default_factory=lambda: [0])
    training_steps: int = 300

    def __post_init__(self) -> None:
        _check(0.0 < self.sparsity < 1.0, f"routing.sparsity must be in (0, 1), got {self.sparsity}")
        _choice("routing", "features", self.features, ("residual", "attention"))
        _check(self.training_steps > 0, "routing.training_steps must be positive")


@dataclass
class SparseAttentionConfig:
    """Block-sparse prefill attention: per head, keep the key blocks holding `mass` of the attention."""

    block_size: int = 64
    mass: float = 0.95
    sink_blocks: int = 1
    local_blocks: int = 1
    min_seq_len: int = 1024

    def __post_init__(self) -> None:
        _check(self.block_size in (16, 32, 64, 128), "sparse.block_size must be 16, 32, 64 or 128")
        _check(0.0 < self.mass <= 1.0, f"sparse.mass must be in (0, 1], got {self.mass}")
        _check(self.sink_blocks >= 1, "sparse.sink_blocks must be at least 1 (the attention sink is always kept)")
        _check(self.local_blocks >= 1, "sparse.local_blocks must be at least 1 (the diagonal is always kept)")


@dataclass
class OptimizationConfig:
    """The transforms to apply, run in the order kv → routing → sparse; any subset."""

    kv: KVCompressionConfig | None = None
    routing: TokenRoutingConfig | None = None
    sparse: SparseAttentionConfig | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        _check(self.version == CONFIG_VERSION,
               f"config version {self.version} is not supported; this llmopt reads version {CONFIG_VERSION}")
        _check(any((self.kv, self.routing, self.sparse)), "the config names no transform: add kv, routing or sparse")

    def transforms(self) -> list[Any]:
        return [t for t in (self.kv, self.routing, self.sparse) if t is not None]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> OptimizationConfig:
        return from_dict(cls, data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> OptimizationConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such config file: {path}")
        data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping with keys kv/routing/sparse, got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from plain data, strictly: unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where or cls.__name__}; "
                          f"allowed: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(hints[name], value, f"{where}{name}") for name, value in data.items()}
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return _coerce(options[0], value, where) if len(options) == 1 else value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, f"{where}.")
    if origin is Literal:
        return value  # __post_init__ names the allowed choices
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(args[0], v, where) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, bool, str) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where} must be {hint.__name__}, got {value!r}")
    return value
