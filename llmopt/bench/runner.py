"""Runs the selected sections in order and writes the report into a temporary folder beside `out`, which becomes
`out` only when the whole bench has finished (a failed run leaves its partial folder and says where)."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from llmopt.bench.bounds import ModelCost, checkpoint_cost
from llmopt.bench.compressed import cached_optimized
from llmopt.bench.environment import command_line, machine, versions
from llmopt.bench.report import table, write_report
from llmopt.bench.results import SectionResult
from llmopt.bench.sections import NAMES, SECTIONS
from llmopt.bench.settings import FULL, QUICK, Settings
from llmopt.summary import KV_DTYPES
from llmopt.vllm_plugin.settings import cpu_build, fastest_dtype

# A 1-minute load average above this share of the cores means other processes were running during the bench.
SHARED_LOAD = 0.5


def default_recipe_dir() -> Path:
    """The repository's ``configs/`` folder (recipes are not installed with the package)."""
    return Path(__file__).resolve().parents[2] / "configs"


@dataclass
class Bench:
    """What sections share: the model, the optimized model (given, or built from `recipe` on first use), the
    settings, the work folder, the names of the sections that run, the dtype vLLM runs in, and measurements one
    section makes for the next (`shared`)."""

    model: str
    recipe: Path
    settings: Settings
    work: Path
    sections: tuple[str, ...] = NAMES
    optimized_dir: Path | None = None
    vllm_dtype: str = "bfloat16"
    calibration_seconds: dict[str, float] = field(default_factory=dict)
    shared: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @property
    def recipe_dir(self) -> Path:
        return self.recipe.parent

    @property
    def log(self) -> Path:
        """Where the vLLM engines' output goes."""
        return self.work / "engines.log"

    def original(self) -> Path:
        from llmopt.models import resolve_model

        return Path(resolve_model(self.model))

    def optimized(self) -> Path:
        if self.optimized_dir is None:
            self.progress(f"optimized model: {self.model} with {self.recipe.name} (built once, then cached)")
            self.optimized_dir, seconds = cached_optimized(self.model, self.recipe)
            if seconds is not None:
                self.calibration_seconds[self.recipe.stem] = seconds
        return self.optimized_dir

    @property
    def bytes_per_value(self) -> int:
        """Bytes of a weight or a cached K/V value as vLLM runs the models."""
        return KV_DTYPES[self.vllm_dtype]

    def cost(self, directory: Path) -> ModelCost:
        """The per-token costs of a checkpoint as vLLM runs it: weights and KV cache in `vllm_dtype`."""
        return checkpoint_cost(directory, self.bytes_per_value)

    def progress(self, message: str) -> None:
        print(f"[bench {time.perf_counter() - self.started:5.0f} s] {message}", file=sys.stderr, flush=True)


def shared_machine(load: float, cores: int) -> str | None:
    if load <= SHARED_LOAD * cores:
        return None
    return (f"1-minute load average up to {load:.1f} on {cores} cores during this run: other processes shared the "
            "machine, so absolute speeds are low and ratios noisier than on an idle machine.")


def run_bench(model: str, out: Path, *, recipe: Path, optimized: Path | None = None,
              sections: list[str] | None = None, quick: bool = False, argv: list[str] | None = None) -> Path:
    """Run the bench and return `out`, the folder holding bench.json, bench.md and the plots."""
    if out.exists():
        raise FileExistsError(f"{out} exists; give a new --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    settings = QUICK if quick else FULL
    chosen = [s for s in SECTIONS if sections is None or s.name in sections]
    bench = Bench(model, recipe, settings, work, tuple(s.name for s in chosen), optimized,
                  vllm_dtype=fastest_dtype(cpu_build()))
    header = {"command": command_line(argv), "quick": quick, "started": datetime.now(timezone.utc).isoformat(
        timespec="seconds"), "machine": machine(), "versions": versions(), "model": model, "recipe": str(recipe),
        "settings": vars(settings), "vllm_dtype": bench.vllm_dtype}
    results = []
    try:
        for index, section in enumerate(chosen, 1):
            reason = section.missing()
            if reason:
                bench.progress(f"[{index}/{len(chosen)}] {section.name}: skipped, {reason}")
                results.append(SectionResult(section.name, section.title, skipped=reason))
                continue
            bench.progress(f"[{index}/{len(chosen)}] {section.name}: {section.title}")
            started = time.perf_counter()
            result = section.runner()(bench)
            result.seconds = time.perf_counter() - started
            results.append(result)
    except BaseException:
        print(f"llmopt bench: failed; the partial output (engine log included) is in {work}", file=sys.stderr)
        raise
    load_end = os.getloadavg()[0]
    header |= {"seconds": time.perf_counter() - bench.started, "optimized": str(bench.optimized_dir),
               "load_average": [header["machine"]["load_average_1min"], round(load_end, 2)],
               "shared_machine": shared_machine(max(header["machine"]["load_average_1min"], load_end),
                                                os.cpu_count() or 1)}
    write_report(results, header, work)
    work.rename(out)
    print(table(results))
    for result in results:
        if result.skipped:
            print(f"{result.name}: skipped, {result.skipped}")
    print(f"\n{out / 'bench.md'} (JSON and plots beside it)")
    return out
