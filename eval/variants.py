"""Models named on the command line: an embedded name, a local HF directory, a hub id, or a YAML recipe
applied to a copy of the reference model (with the same calibration text `llmopt calibrate` uses)."""

from __future__ import annotations

import copy
from pathlib import Path


def is_recipe(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def label(spec: str) -> str:
    """The name a model gets in the report: a recipe's or a folder's name, else the spec itself."""
    if is_recipe(spec):
        return Path(spec).stem
    return Path(spec).name if Path(spec).exists() else spec


def read_recipe(spec: str):
    """The recipe's `OptimizationConfig`; refuses one that does not exist, does not parse, or names a transform
    this installation lacks."""
    from llmopt.config import OptimizationConfig
    from llmopt.transforms import transform_for

    config = OptimizationConfig.from_yaml(spec)
    for settings in config.transforms.values():
        transform_for(settings)
    return config


def load_variant(spec: str, reference: tuple):
    """``(model, tokenizer)`` for `spec`; a recipe transforms a deep copy, so the reference stays untouched."""
    from llmopt.models import load_model

    if not is_recipe(spec):
        return load_model(spec)
    from llmopt.data.corpora import calibration_texts
    from llmopt.patch import patch_model

    model, tokenizer = reference
    return (patch_model(copy.deepcopy(model), read_recipe(spec), tokenizer=tokenizer, calibration=calibration_texts()),
            tokenizer)


def unique_labels(specs: list[str], taken: set[str]) -> list[str]:
    """One distinct report name per spec: a clash gets ``-2``, ``-3``, ..."""
    names = []
    for spec in specs:
        name, n = label(spec), 1
        while name in taken:
            n += 1
            name = f"{label(spec)}-{n}"
        taken.add(name)
        names.append(name)
    return names
