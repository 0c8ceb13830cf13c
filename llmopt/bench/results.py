"""What a section returns: claims as rows (original, optimized, ratio, bound, prediction), notes, plot series."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmopt.bench.timing import Spread

Value = Spread | float | None


@dataclass
class Row:
    """One claim: the same quantity for the original and the optimized model, their ratio (how many times better
    the optimized side is: optimized / original for tokens/s and capacity, original / optimized for ms and bytes;
    > 1 is a win), the bound it is held against and what the step-time model predicts. `check`: pass/fail against
    the claim's target, where it has one."""

    claim: str
    unit: str
    original: Value = None
    optimized: Value = None
    ratio: Value = None
    bound: str = ""
    predicted: float | None = None
    check: str = ""


@dataclass
class Series:
    """Points of one line in a plot (`plot` names the figure: see `llmopt.bench.report.PLOTS`)."""

    plot: str
    label: str
    x: list[float]
    y: list[float]


@dataclass
class SectionResult:
    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)
    skipped: str | None = None
    seconds: float = 0.0
    raw: dict = field(default_factory=dict)
