"""A model of a forward step's time, fitted on this machine: ``t = overhead + flops * a + bytes * b``.

`a` (seconds per FLOP) and `b` (seconds per byte) are fitted by non-negative least squares over measured steps
(prefill and decode, both models), so the model says how much of a step is arithmetic and how much is memory
traffic here, and therefore which ratio a smaller KV cache can buy. `on_machine` rescales the terms to another
machine's FLOPs-per-byte ratio (e.g. a GPU's), without the fixed overhead.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from llmopt.bench.bounds import StepCost

TERMS = ("overhead_s", "seconds_per_flop", "seconds_per_byte")


@dataclass(frozen=True)
class StepModel:
    overhead_s: float
    seconds_per_flop: float
    seconds_per_byte: float
    max_relative_error: float = 0.0  # over the steps it was fitted on

    @classmethod
    def fit(cls, steps: list[StepCost], seconds: list[float]) -> StepModel:
        """Non-negative least squares, relative error weighted (each step counts alike, short or long): the
        best fit over every subset of the three terms whose coefficients all come out non-negative."""
        features = np.array([[1.0, s.flops, s.bytes] for s in steps])
        target = np.array(seconds, dtype=float)
        weights = 1.0 / target
        scale = features.max(axis=0)  # FLOPs and bytes are ~1e9: scale the columns for a well-posed solve
        best, best_error = np.zeros(3), np.inf
        for size in (1, 2, 3):
            for subset in map(list, itertools.combinations(range(3), size)):
                design = features[:, subset] / scale[subset] * weights[:, None]
                solution, *_ = np.linalg.lstsq(design, target * weights, rcond=None)
                if (solution < 0).any():
                    continue
                coefficients = np.zeros(3)
                coefficients[subset] = solution / scale[subset]
                error = float(np.sum(((features @ coefficients - target) * weights) ** 2))
                if error < best_error:
                    best, best_error = coefficients, error
        worst = float(np.max(np.abs(features @ best - target) / target))
        return cls(*map(float, best), max_relative_error=worst)

    def seconds(self, step: StepCost) -> float:
        return self.overhead_s + step.flops * self.seconds_per_flop + step.bytes * self.seconds_per_byte

    @property
    def flops_per_byte(self) -> float:
        """FLOPs this machine does in the time it moves one byte (the roofline's ridge point); inf if the fit
        found no compute term."""
        return self.seconds_per_byte / self.seconds_per_flop if self.seconds_per_flop else float("inf")

    def on_machine(self, flops_per_byte: float) -> StepModel:
        """A machine that does `flops_per_byte` FLOPs per byte moved, without the fixed overhead: the fitted
        memory term with compute rescaled (or the compute term with memory rescaled, where no memory term was
        fitted). Only ratios of its predictions mean anything."""
        if self.seconds_per_byte:
            return StepModel(0.0, self.seconds_per_byte / flops_per_byte, self.seconds_per_byte)
        return StepModel(0.0, self.seconds_per_flop, self.seconds_per_flop * flops_per_byte)
