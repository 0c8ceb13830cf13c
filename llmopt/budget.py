"""The accuracy budget's search, shared by every transform: spend savings where they cost the least loss.

Each unit (a layer, a block) has a ladder of settings, from unchanged (rung 0) to the heaviest the recipe allows,
with what each rung saves (KV bytes, FLOPs) and the loss measured when only that unit takes it (KL of the final
logits on calibration windows). `greedy_path` climbs one rung at a time, always where the loss grows least per
unit saved; a transform walks that path until its own target is met (a share of FLOPs: routing) or, with
`longest_within`, as far as a loss measured on the whole model allows (an accuracy budget: KV heads).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from llmopt.errors import ConfigError


@dataclass(frozen=True)
class Ladder:
    """One unit's settings: ``savings[r]`` and ``losses[r]`` at rung r (rung 0 is unchanged: 0 and 0)."""

    savings: tuple[float, ...]
    losses: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.savings) != len(self.losses) or not self.savings:
            raise ValueError(f"a ladder needs as many losses as savings, at least one, got {len(self.savings)} "
                             f"savings and {len(self.losses)} losses")
        if any(b <= a for a, b in zip(self.savings, self.savings[1:])):
            raise ValueError(f"each rung of a ladder must save more than the one below it, got {self.savings}")


def greedy_path(ladders: list[Ladder]) -> Iterator[list[int]]:
    """The rungs of every unit after each step: each step raises by one rung the unit whose loss grows least per
    unit saved (the lowest index on ties), until every unit stands on its top rung."""
    rungs = [0] * len(ladders)
    while True:
        best, best_rate = None, math.inf
        for index, (ladder, rung) in enumerate(zip(ladders, rungs)):
            if rung + 1 < len(ladder.savings):
                rate = ((ladder.losses[rung + 1] - ladder.losses[rung])
                        / (ladder.savings[rung + 1] - ladder.savings[rung]))
                if best is None or rate < best_rate:
                    best, best_rate = index, rate
        if best is None:
            return
        rungs[best] += 1
        yield list(rungs)


def longest_within(path: list[list[int]], loss: Callable[[list[int]], float],
                   max_loss: float) -> tuple[int, dict[int, float]]:
    """The furthest step of `path` whose measured `loss` is at most `max_loss`, by bisection (the loss grows
    along the path), and the losses measured on the way (step → loss). A budget that even the first step
    misses is refused with its numbers."""
    measured: dict[int, float] = {}

    def within(step: int) -> bool:
        measured[step] = loss(path[step])
        return measured[step] <= max_loss

    if not path:
        raise ConfigError("the accuracy budget has nothing to choose: every unit is already unchanged")
    if not within(0):
        raise ConfigError(f"max_loss = {max_loss:g} cannot be met: the lightest setting (one unit changed, the "
                          f"least sensitive) already loses {measured[0]:.4f} on the search windows; allow at least "
                          f"that much, or measure with more calibration text")
    low, high = 0, len(path) - 1
    if within(high):
        return high, measured
    while high - low > 1:
        middle = (low + high) // 2
        if within(middle):
            low = middle
        else:
            high = middle
    return low, measured
