"""Calibration wall time per transform on the bench's model: `patch_model` with each transform's recipe, timed.

A recipe that names a transform not installed here is skipped with a line saying so.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from llmopt.bench.compressed import build_optimized
from llmopt.bench.results import Row, SectionResult

# The recipe (in the bench's recipe folder) that stands for each transform.
RECIPES = {"kv": "kv-3to1.yaml", "routing": "routing-15.yaml", "sparse": "sparse-attention.yaml"}


def patch_seconds(bench, recipe: Path) -> float:
    """Seconds `patch_model` takes for `recipe` (the optimized model of this run reuses its own build)."""
    if recipe == bench.recipe:
        bench.optimized()
        if recipe.stem in bench.calibration_seconds:
            return bench.calibration_seconds[recipe.stem]
    with tempfile.TemporaryDirectory() as folder:
        return build_optimized(bench.model, recipe, Path(folder) / "model")


def run(bench) -> SectionResult:
    from llmopt import OptimizationConfig
    from llmopt.config import ConfigError
    from llmopt.transforms import transform_for

    result = SectionResult("calibration", "Calibration wall time per transform")
    if not bench.settings.time_calibration:  # report only a calibration this run had to do anyway
        built = bench.calibration_seconds.get(bench.recipe.stem)
        if built is None:
            result.skipped = "--quick does not calibrate again (the cached compressed model was reused)"
        else:
            result.rows.append(Row(f"patch_model, {bench.recipe.name}", "s", optimized=built))
        return result
    for transform, name in RECIPES.items():
        recipe = bench.recipe_dir / name
        if not recipe.is_file():
            result.notes.append(f"{transform}: skipped, no recipe {recipe}")
            continue
        try:
            for settings in OptimizationConfig.from_yaml(str(recipe)).transforms.values():
                transform_for(settings)
        except ConfigError as error:
            result.notes.append(f"{transform}: skipped, {error}")
            continue
        bench.progress(f"calibration: {name}")
        started = time.perf_counter()
        seconds = patch_seconds(bench, recipe)
        result.rows.append(Row(f"patch_model, {name}", "s", optimized=seconds))
        result.raw[transform] = {"recipe": str(recipe), "seconds": seconds,
                                 "wall_seconds": time.perf_counter() - started}
    result.notes.append(f"Wall time of `patch_model` (calibration and conversion, not loading or saving) on "
                        f"{bench.model}, with the default calibration text, on this machine.")
    return result
