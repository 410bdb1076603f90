"""Recomputation schedules from observed stability: pure functions of :func:`tokenmerge.analysis.summarize` output.

Both rest on the triangle inequality. The Jaccard distance is a metric on sets, so the distance between the sets at
steps ``a`` and ``t`` is at most ``sum_{i=a+1..t} d_i`` with ``d_i`` the distance between steps ``i - 1`` and ``i``;
for the merge matrix, ``||A_t - A_a|| <= sum_i ||A_i - A_{i-1}||``, and the relative changes are summed the same way
(each relative to its own previous matrix, whose norms barely differ). Only adjacent-step changes are kept by the
observer (streaming), so the schedules bound the expected drift since the last recomputation by these sums:
conservative, never optimistic. ``d_i`` is the mean over runs, samples and the selected blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def step_curve(stats: dict[str, Any], metric: str, max_downsample: int | None = None) -> list[float]:
    """Per step, the mean of ``metric`` (over runs) averaged over the blocks at downsample ``<= max_downsample``
    (``None``: the finest observed level); 0 where no block has a value (step 0 of adjacent-step metrics)."""
    blocks = stats["blocks"]
    limit = min(b["downsample"] for b in blocks) if max_downsample is None else max_downsample
    chosen = [i for i, b in enumerate(blocks) if b["downsample"] <= limit]
    if not chosen:
        levels = sorted({b["downsample"] for b in blocks})
        raise ValueError(f"no observed block at downsample <= {max_downsample}; observed downsamples: {levels}")
    mean = stats["metrics"][metric]["mean"]
    values = [[mean[i][t] for i in chosen if mean[i][t] is not None] for t in range(stats["num_steps"])]
    if not any(values):
        raise ValueError(f"no {metric} values at downsample <= {limit} (grids smaller than a cell, or one step)")
    return [sum(v) / len(v) if v else 0.0 for v in values]


def greedy_checkpoints(curve: Sequence[float], tolerance: float) -> list[int]:
    """Checkpoints ``[0, ...]``: walking the steps, a step becomes a checkpoint when the summed adjacent distances
    since the last checkpoint, this step's included, exceed ``tolerance``."""
    _check_tolerance(tolerance)
    points, drift = [0], 0.0
    for t in range(1, len(curve)):
        drift += curve[t]
        if drift > tolerance:
            points.append(t)
            drift = 0.0
    return points


def largest_interval(curve: Sequence[float], tolerance: float) -> int:
    """The largest ``n`` such that recomputing at steps ``0, n, 2n, ...`` keeps the summed adjacent distances since
    the last recomputation within ``tolerance`` at every step (1 if even ``n = 2`` does not)."""
    _check_tolerance(tolerance)
    steps = len(curve)
    for n in range(max(steps, 1), 1, -1):
        if all(sum(curve[s + 1 : s + n]) <= tolerance for s in range(0, steps, n)):
            return n
    return 1


def catome_schedule(stats: dict[str, Any], tolerance: float = 0.2, max_downsample: int | None = None) -> list[int]:
    """A CA-ToMe checkpoint schedule for the observed step count: ``tm.CAToMe(schedule=...)`` recomputes the pairs
    whenever their expected Jaccard distance since the last checkpoint (bounded by the summed adjacent distances of
    ``pairs_adj``) would exceed ``tolerance``. Blocks: those at downsample ``<= max_downsample`` (``None``: the finest
    observed level, where CA-ToMe merges by default)."""
    return greedy_checkpoints(step_curve(stats, "pairs_adj", max_downsample), tolerance)


def toma_intervals(stats: dict[str, Any], tolerance: float = 0.2, max_downsample: int | None = 4) -> dict[str, int]:
    """``dest_every`` / ``weight_every`` for ``tm.ToMA(**...)``: the longest fixed intervals over which the summed
    adjacent Jaccard distances of the destination sets (``dest_adj``) / relative Frobenius changes of the merge
    matrix (``weight_adj``) stay within ``tolerance``. ToMA recomputes destinations only together with weights, so
    ``dest_every`` is rounded down to a multiple of ``weight_every`` (then destinations are recomputed exactly every
    ``dest_every`` steps). Blocks: downsample ``<= max_downsample`` (ToMA's default 4)."""
    dest = largest_interval(step_curve(stats, "dest_adj", max_downsample), tolerance)
    weight = min(largest_interval(step_curve(stats, "weight_adj", max_downsample), tolerance), dest)
    return dict(dest_every=dest - dest % weight, weight_every=weight)


def drift_bound(curve: Sequence[float], checkpoints: Sequence[int]) -> list[float]:
    """Per step, the summed adjacent distances since the last checkpoint (0 at checkpoints): the bound on the drift
    that a schedule's reuse allows."""
    points, out, drift = set(checkpoints), [], 0.0
    for t, d in enumerate(curve):
        drift = 0.0 if t in points or t == 0 else drift + d
        out.append(drift)
    return out


def _check_tolerance(tolerance: float) -> None:
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a positive number, got {tolerance}")
