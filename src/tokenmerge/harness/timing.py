"""Timing shared by ``eval`` and ``pareto``: warm-up, then interleaved rounds in shuffled order, median.

A run over ``n`` configurations follows a :class:`Schedule`: ``warmup`` untimed passes over every configuration
(the first call of a configuration pays one-off costs: allocator growth, lazy initialisation, kernel selection), then
``rounds`` timed rounds, each calling every configuration once in an order drawn afresh per round from
``random.Random(seed)``. Slow drifts of clock speed or machine load then hit all configurations alike, and no
configuration always runs right after another one (the baseline, say). Callers apply a configuration before its call
and remove it after, outside the timed region, and compare configurations by their medians over the same rounds.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Call:
    """One call of a schedule: configuration ``config`` (an index) in timed round ``round`` (``None``: warm-up)."""

    config: int
    round: int | None

    @property
    def timed(self) -> bool:
        return self.round is not None


@dataclass(frozen=True)
class Schedule:
    """``warmup`` untimed passes over the configurations in their given order, then ``rounds`` timed rounds of every
    configuration once, each round in its own order shuffled by ``random.Random(seed)``."""

    rounds: int = 3
    warmup: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")

    def calls(self, n: int) -> list[Call]:
        """The calls of a run over ``n`` configurations, in order."""
        rng = random.Random(self.seed)
        warm = [Call(i, None) for _ in range(self.warmup) for i in range(n)]
        return warm + [Call(i, r) for r in range(self.rounds) for i in rng.sample(range(n), n)]


def time_call(run: Callable[[], Any], device: torch.device) -> float:
    """Seconds taken by ``run()``: CUDA events on a GPU, wall clock (``perf_counter``) on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000
    start_s = time.perf_counter()
    run()
    return time.perf_counter() - start_s


def timed(run: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """``run()``'s result and the seconds it took (:func:`time_call`)."""
    box: list[T] = []
    seconds = time_call(lambda: box.append(run()), device)
    return box[0], seconds
