"""The bench's sections, in run order, each with what it needs installed. A transform's section plugs in here:
a module ``llmopt.bench.<name>`` with ``run(bench) -> SectionResult``; until its transform is installed the
section is skipped with a line saying so."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Section:
    name: str
    title: str
    module: str  # holds run(bench) -> SectionResult
    needs: tuple[tuple[str, str], ...] = ()  # (module, what it is) that must be importable

    def missing(self) -> str | None:
        """Why this section cannot run here, or None."""
        for module, what in self.needs:
            if not _importable(module):
                return f"{what} is not installed (no module {module})"
        if not _importable(self.module):
            return f"its bench section has not been written yet (no module {self.module})"
        return None

    def runner(self) -> Callable:
        return importlib.import_module(self.module).run


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


_KV = ("llmopt.kv.transform", "KV-head compression")
_VLLM = ("vllm", "vLLM (pip install 'llmopt[serve-cpu]' or 'llmopt[serve]')")

SECTIONS = (
    Section("kv-capacity", "KV cache: bytes per token and vLLM capacity, original vs KV-compressed",
            "llmopt.bench.kv_capacity", (_KV, _VLLM)),
    Section("decode", "vLLM decode throughput, original vs KV-compressed, against the bounds",
            "llmopt.bench.decode", (_KV, _VLLM)),
    Section("serving", "Serving at a fixed KV cache budget, and the step-time model",
            "llmopt.bench.serving", (_KV, _VLLM)),
    Section("routing", "Token routing vs dense: prefill and decode in transformers",
            "llmopt.bench.routing", (("llmopt.routing.transform", "token routing"),)),
    Section("crossover", "Sparse attention in vLLM: llmopt's paths vs vLLM's CPU kernel (the crossover)",
            "llmopt.bench.crossover", (("llmopt.sparse.transform", "sparse attention"), _VLLM)),
    Section("throughput", "vLLM throughput on held-out text, original vs each optimized checkpoint",
            "llmopt.bench.throughput", (_KV, ("llmopt.routing.transform", "token routing"),
                                        ("llmopt.sparse.transform", "sparse attention"), _VLLM)),
    Section("sparse", "Sparse attention vs dense SDPA", "llmopt.bench.sparse_attention",
            (("llmopt.sparse.transform", "sparse attention"),)),
    Section("calibration", "Calibration wall time per transform", "llmopt.bench.calibration"),
)
NAMES = tuple(section.name for section in SECTIONS)
