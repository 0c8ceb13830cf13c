"""Toy transforms that exercise the contract: a non-vanilla one with an extra weight, one that refuses in check(),
one whose module does not exist. Registered at run time, as a third party would."""

from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch

from llmopt import register_transform
from llmopt.config import ConfigError, require
from llmopt.transforms import Transform


@dataclass
class OutputScaleConfig:
    """A toy non-vanilla transform: a learned scale after the final norm, a new parameter in the safetensors."""

    name: ClassVar[str] = "toy_scale"
    stage: ClassVar[int] = 90
    transform: ClassVar[str] = "toy_transforms:OutputScale"

    init: float = 1.0

    def __post_init__(self) -> None:
        require(self.init > 0, f"toy_scale.init must be positive, got {self.init}")


class ScaledNorm(torch.nn.Module):
    def __init__(self, norm: torch.nn.Module, width: int, init: float) -> None:
        super().__init__()
        self.norm = norm
        self.scale = torch.nn.Parameter(torch.full((width,), init))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden) * self.scale


class OutputScale(Transform):
    calibrated = 0

    def calibrate(self, model, config, context):
        OutputScale.calibrated += 1
        self.apply(model, config)
        with torch.no_grad():
            model.model.norm.scale.uniform_(0.5, 1.5)  # "learned": differs from what apply() builds
        return {"note": "toy"}

    def apply(self, model, config):
        model.model.norm = ScaledNorm(model.model.norm, model.config.hidden_size, config.init)


class FailingCheck(Transform):
    def check(self, model, config, context):
        raise ConfigError("toy_fail: refused before anything ran")


@dataclass
class FailingConfig:
    name: ClassVar[str] = "toy_fail"
    stage: ClassVar[int] = 95
    transform: ClassVar[str] = "toy_transforms:FailingCheck"


@dataclass
class MissingConfig:
    name: ClassVar[str] = "toy_missing"
    stage: ClassVar[int] = 99
    transform: ClassVar[str] = "llmopt.not_a_module:Nothing"


@contextmanager
def registered_toy_transforms():
    """The toy transforms registered inside the block only: tests after it (the families table) see the installed
    transforms alone."""
    from llmopt import transforms

    installed = {name: transforms.config_class(name) for name in transforms.available_transforms()}
    for config in (OutputScaleConfig, FailingConfig, MissingConfig):
        register_transform(config)
    try:
        yield
    finally:
        transforms._CONFIGS.clear()
        transforms._CONFIGS.update(installed)
