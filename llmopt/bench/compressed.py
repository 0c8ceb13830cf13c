"""The optimized checkpoint a bench compares against: a recipe applied to the model, built once and cached."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from pathlib import Path

from llmopt.paths import cache_dir


def build_optimized(model_name: str, recipe: str | Path, out_dir: Path) -> float:
    """Apply `recipe` to `model_name` (default calibration text) and save it to `out_dir`; returns the seconds
    `patch_model` took (the calibration wall time)."""
    from llmopt import OptimizationConfig, patch_model, save_optimized
    from llmopt.data.corpora import calibration_texts
    from llmopt.models import load_model

    model, tokenizer = load_model(model_name)
    config = OptimizationConfig.from_yaml(str(recipe))
    started = time.perf_counter()
    patch_model(model, config, tokenizer=tokenizer, calibration=calibration_texts())
    seconds = time.perf_counter() - started
    save_optimized(model, out_dir, tokenizer)
    return seconds


def cached_optimized(model_name: str, recipe: str | Path) -> tuple[Path, float | None]:
    """(directory, calibration seconds if it was built now, else None): `model_name` with `recipe` applied,
    cached under ``<cache>/bench/<model>-<recipe>-<hash of the recipe's text>`` so that repeated benches do not
    calibrate again, and an edited recipe is built anew."""
    digest = hashlib.sha256(Path(recipe).read_bytes()).hexdigest()[:12]
    target = cache_dir() / "bench" / f"{Path(model_name).name}-{Path(recipe).stem}-{digest}"
    if (target / "config.json").is_file():
        return target, None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        seconds = build_optimized(model_name, recipe, tmp / "model")
        (tmp / "model").rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, seconds
