"""The transform contract and its registry.

A transform is a config dataclass plus a `Transform` class. The config carries three class variables: `name` (its
key in a recipe: ``kv``, ``routing``, ``sparse``), `stage` (run order) and `transform` (``"module:Class"``, imported
only when the transform runs). Config classes are found through the ``llmopt.transforms`` entry point group
(pyproject.toml), or `register_transform` at run time; adding a transform touches no generic file, and
``import llmopt`` imports no transform module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from llmopt.errors import ConfigError

ENTRY_POINT_GROUP = "llmopt.transforms"
Observer = Callable[[str, nn.Module, dict], None]  # (stage, model, facts about the stage)

_CONFIGS: dict[str, type] = {}


def register_transform(config_class: type) -> type:
    """Make `config_class` (with `name`, `stage` and `transform` class variables) usable in recipes."""
    for attribute in ("name", "stage", "transform"):
        if not hasattr(config_class, attribute):
            raise TypeError(f"{config_class.__name__} needs a class variable {attribute!r} to be a transform config")
    _configs()[config_class.name] = config_class
    return config_class


def _configs() -> dict[str, type]:
    if not _CONFIGS:
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            _CONFIGS.setdefault(entry.name, entry.load())
    return _CONFIGS


def available_transforms() -> list[str]:
    return sorted(_configs(), key=lambda name: _configs()[name].stage)


def config_class(name: str) -> type:
    """The config class of transform `name`; an unknown name is a ConfigError naming the available ones."""
    if name not in _configs():
        raise ConfigError(f"unknown key(s) {name} in the config: no such transform; available: "
                          f"{', '.join(available_transforms())}")
    return _configs()[name]


def transform_for(config: Any) -> Transform:
    """The `Transform` that runs `config`, imported now (an import error is reported as such)."""
    return _load_transform(type(config))


def transform_named(name: str) -> Transform:
    """The `Transform` of transform `name` (``kv``, ``routing``, ``sparse``), without a config."""
    return _load_transform(config_class(name))


def _load_transform(config_type: type) -> Transform:
    module, _, attribute = config_type.transform.partition(":")
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name is None or not module.startswith(error.name):
            raise  # the transform's own module exists but imports something missing: a real error
        raise ConfigError(f"transform {config_type.name} is not available in this installation "
                          f"(no module {module})") from error
    return getattr(loaded, attribute)()


@dataclass
class CalibrationContext:
    """What a transform may use while calibrating: data, a tokenizer, and an observer of named stages."""

    tokenizer: Any = None
    calibration: Any = None  # texts, or token windows [n, seq_len]
    observer: Observer | None = None
    stage_prefix: str = ""  # the transform's name: stages reach the observer as "kv/training-free"

    def windows(self, seq_len: int, tokens: int, minimum_tokens: int = 0) -> torch.Tensor:
        """``[n, seq_len]`` windows holding `tokens` tokens of calibration text (fewer is an error saying why)."""
        from llmopt.calibration import calibration_windows

        return calibration_windows(self.calibration, self.tokenizer, seq_len, tokens, minimum_tokens)

    def observe(self, stage: str, model: nn.Module, **facts: float) -> None:
        """Tell the caller the model has reached `stage`, so it can measure it; reported as ``<transform>/<stage>``
        with `facts` (e.g. ``training_minutes``) beside its costs."""
        if self.observer is not None:
            self.observer(f"{self.stage_prefix}{stage}", model, facts)


@dataclass(frozen=True)
class Support:
    """Whether a transform applies to a model family (or to one model, given its config), and if so how exact
    the result is and what serves it; if not, `reason` says why, before any work."""

    applies: bool
    reason: str = ""
    exact: str = ""
    served_by: str = ""


class Transform:
    """One transform. `calibrate` changes a model using data; `apply` rebuilds the same structure from the config
    alone, so that the saved weights load into it. `vanilla`: the result is a plain checkpoint of the original
    architecture, which transformers and vLLM load with no llmopt code."""

    vanilla: ClassVar[bool] = False

    def is_vanilla(self, config: Any) -> bool:
        """Whether the result of `config` is a plain checkpoint (`vanilla`, unless the config decides otherwise)."""
        return self.vanilla

    def check(self, model: nn.Module, config: Any, context: CalibrationContext) -> None:
        """Raise (ConfigError, ValueError) if `calibrate` would fail; runs for every transform before any runs."""

    def support(self, adapter: Any, model_config: Any = None) -> Support:
        """Whether this transform applies to the family of `adapter` (an `ArchAdapter`), for the checkpoint with
        `model_config` where given (None: the family in general, for the families table)."""
        return Support(True)

    def calibrate(self, model: nn.Module, config: Any, context: CalibrationContext) -> dict:
        """Transform `model` in place; return diagnostics (JSON-able), which go to the report, not config.json."""
        raise NotImplementedError

    def apply(self, model: nn.Module, config: Any) -> None:
        """Give a freshly built model of the saved config the structure `calibrate` produced (no data)."""
        raise NotImplementedError

    def baselines(self, config: Any) -> dict[str, Any]:
        """The methods this one is compared with, as configs of the same type, by name."""
        return {}

    def cost(self, model: nn.Module, config: Any, windows: torch.Tensor | None = None) -> dict[str, float]:
        """What the transformed model saves, e.g. ``{"kv_bytes_per_token": ...}``; `windows` are held-out token
        windows ``[n, seq_len]`` for costs that depend on the input (skipped tokens, attention density)."""
        return {}
