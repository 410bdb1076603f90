"""Recomputation schedules from observed stability: pure functions of :func:`tokenmerge.analysis.summarize` output.

A *drift matrix* ``M[s][t]`` (``s < t``) is the expected change when the sets (or matrices) computed at step ``s``
are reused at step ``t``: the mean over runs, samples and the selected blocks. For CA-ToMe's pairs and ToMA's
destinations it is measured (the observer's ``drift``: Jaccard distance of the sets at ``t`` from those at ``s``).
For ToMA's merge matrix only adjacent steps are measured, so ``M[s][t] = sum_{i=s+1..t} c_i`` with ``c_i`` the
relative Frobenius change from step ``i - 1`` to ``i``: an upper bound by the triangle inequality (each change is
relative to its own previous matrix, whose norms barely differ).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

Matrix = list[list[float]]


def selected_blocks(stats: dict[str, Any], max_downsample: int | None = None) -> list[int]:
    """Indices of the blocks at downsample ``<= max_downsample`` (``None``: the finest observed level)."""
    blocks = stats["blocks"]
    limit = min(b["downsample"] for b in blocks) if max_downsample is None else max_downsample
    chosen = [i for i, b in enumerate(blocks) if b["downsample"] <= limit]
    if not chosen:
        levels = sorted({b["downsample"] for b in blocks})
        raise ValueError(f"no observed block at downsample <= {max_downsample}; observed downsamples: {levels}")
    return chosen


def _average(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def drift_matrix(stats: dict[str, Any], kind: str, max_downsample: int | None = None) -> Matrix:
    """Measured drift ``M[s][t]`` of ``kind`` (``pairs`` or ``dest``) averaged over the selected blocks (0 on and
    below the diagonal). Raises ``ValueError`` when no selected block has a value (grids too small, one step)."""
    mean = stats["drift"][kind]["mean"]
    chosen = selected_blocks(stats, max_downsample)
    n = stats["num_steps"]
    cells = [[_average(mean[b][s][t] for b in chosen) if s < t else 0.0 for t in range(n)] for s in range(n)]
    if n > 1 and all(cells[s][t] is None for s in range(n) for t in range(s + 1, n)):
        raise ValueError(f"no {kind} drift at downsample <= {max_downsample} (grids smaller than a cell?)")
    return [[0.0 if v is None else v for v in row] for row in cells]


def bound_matrix(stats: dict[str, Any], metric: str, max_downsample: int | None = None) -> Matrix:
    """``M[s][t] = sum_{i=s+1..t} c_i`` from the adjacent-step ``metric`` averaged over the selected blocks."""
    mean = stats["metrics"][metric]["mean"]
    chosen = selected_blocks(stats, max_downsample)
    n = stats["num_steps"]
    curve = [_average(mean[b][t] for b in chosen) or 0.0 for t in range(n)]
    return [[sum(curve[s + 1 : t + 1]) if s < t else 0.0 for t in range(n)] for s in range(n)]


def greedy_checkpoints(matrix: Matrix, tolerance: float) -> list[int]:
    """Checkpoints ``[0, ...]``: walking the steps, a step becomes a checkpoint when the drift of the last
    checkpoint's sets to it, ``M[last][t]``, exceeds ``tolerance``."""
    _check_tolerance(tolerance)
    points = [0]
    for t in range(1, len(matrix)):
        if matrix[points[-1]][t] > tolerance:
            points.append(t)
    return points


def schedule_drift(matrix: Matrix, checkpoints: Iterable[int]) -> list[float]:
    """Per step, the drift ``M[last checkpoint][t]`` a schedule allows (0 at checkpoints and before the first)."""
    points, out, last = set(checkpoints), [], None
    for t in range(len(matrix)):
        last = t if t in points or last is None else last
        out.append(matrix[last][t])
    return out


def every(n: int, num_steps: int) -> range:
    """The recomputation steps of an every-``n`` interval (as ToMA's ``dest_every``/``weight_every`` from step 0)."""
    return range(0, num_steps, n)


def largest_interval(matrix: Matrix, tolerance: float) -> int:
    """The largest ``n`` whose every-``n`` recomputation keeps the drift within ``tolerance`` at every step (1 if no
    longer interval does)."""
    _check_tolerance(tolerance)
    steps = len(matrix)
    for n in range(max(steps, 1), 1, -1):
        if max(schedule_drift(matrix, every(n, steps))) <= tolerance:
            return n
    return 1


def catome_schedule(stats: dict[str, Any], tolerance: float = 0.2, max_downsample: int | None = None) -> list[int]:
    """A CA-ToMe checkpoint schedule for the observed step count, for ``tm.CAToMe(schedule=...)``: greedy, a new
    checkpoint whenever the measured Jaccard distance of the pairs from the last checkpoint's would exceed
    ``tolerance``. Blocks: downsample ``<= max_downsample`` (``None``: the finest observed level, where CA-ToMe merges
    by default)."""
    return greedy_checkpoints(drift_matrix(stats, "pairs", max_downsample), tolerance)


def toma_intervals(stats: dict[str, Any], tolerance: float = 0.2, max_downsample: int | None = 4) -> dict[str, int]:
    """``dest_every`` / ``weight_every`` for ``tm.ToMA(**...)``: the longest fixed intervals over which the measured
    Jaccard drift of the destinations / the bounded relative change of the merge matrix stay within ``tolerance``.
    ToMA recomputes destinations only together with weights, so ``dest_every`` is rounded down to a multiple of
    ``weight_every`` (destinations are then recomputed exactly every ``dest_every`` steps). Blocks: downsample
    ``<= max_downsample`` (ToMA's default 4)."""
    dest = largest_interval(drift_matrix(stats, "dest", max_downsample), tolerance)
    weight = min(largest_interval(bound_matrix(stats, "weight_adj", max_downsample), tolerance), dest)
    return dict(dest_every=dest - dest % weight, weight_every=weight)


def _check_tolerance(tolerance: float) -> None:
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a positive number, got {tolerance}")
