"""Fixtures shared per session: token windows for tiny models, the real default model."""

import pytest
import torch
from tiny_models import TINY


@pytest.fixture(scope="session")
def token_windows_tiny() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, TINY["vocab_size"], (24, 64), generator=generator)


@pytest.fixture(scope="session")
def default_model():
    from llmopt.models import load_model

    return load_model("smollm2-135m")
