"""Warm-up, repeats, median and spread: how every number of the bench is taken."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Spread:
    """The median of repeated measurements and their range."""

    median: float
    low: float
    high: float
    samples: int

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values), len(values))

    def scaled(self, factor: float) -> Spread:
        """The same measurements multiplied by `factor` (another unit)."""
        low, high = sorted((self.low * factor, self.high * factor))
        return Spread(self.median * factor, low, high, self.samples)

    def format(self, pattern: str = "{:.3g}") -> str:
        return f"{pattern.format(self.median)} ({pattern.format(self.low)}–{pattern.format(self.high)})"


def ratio(numerator: list[float], denominator: list[float]) -> Spread:
    """median(numerator) / median(denominator); the range pairs the extremes, so it holds every pairing of the
    repeats (the two sides were measured separately and are not paired)."""
    return Spread(statistics.median(numerator) / statistics.median(denominator),
                  min(numerator) / max(denominator), max(numerator) / min(denominator),
                  min(len(numerator), len(denominator)))


def timed_rounds(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function over `repeats` rounds after `warmup` rounds; the functions take turns
    within each round so that load from other processes falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times
