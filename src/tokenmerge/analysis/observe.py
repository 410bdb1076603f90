"""``Observe``: a method that merges nothing and records redundancy statistics of every block input, per step.

It runs under :func:`tokenmerge.apply` like any method (the patch machinery's hooks and step tracking), but its
``plan`` returns ``None``, so every block runs unmerged and the output is bit-identical to the unpatched model.
Statistics are streamed: no similarity matrix outlives its block call. Per block and generation, the merge decisions
of the earlier steps are kept as compact sets (int8/int16 codes per token: a few KB per step), to measure the drift
of the current sets from every earlier step; the merge matrix only of the previous step. Per (run, block, step) a
few scalars are recorded, and histograms summed over runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tokenmerge.analysis import stats as st
from tokenmerge.methods.base import Generation, Method, PlanCache, check_ratio, check_tile
from tokenmerge.methods.cells import check_cells
from tokenmerge.ops.bipartite import bipartite_match, cell_destinations
from tokenmerge.ops.tiles import TileGrid

#: Stability metrics per (block, step): Jaccard distances of sets, relative Frobenius change of ToMA's merge matrix.
STABILITY = {
    "pairs_adj": "CA-ToMe pairs (best similarity >= pair threshold): Jaccard distance to the previous step",
    "pairs_top_adj": "ToMeSD pairs (top ratio*N sources): Jaccard distance to the previous step",
    "pairs_level": "CA-ToMe pairs: Jaccard distance to the level's first block at the same step",
    "dest_adj": "ToMA destinations: Jaccard distance to the previous step",
    "dest_level": "ToMA destinations: Jaccard distance to the level's first block at the same step",
    "weight_adj": "ToMA merge matrix, fixed destinations: relative Frobenius change from the previous step",
}
#: Sets whose Jaccard distance from every earlier step is recorded (``drift[s][t]``, ``s < t``).
DRIFT = ("pairs", "dest")
HIST_KINDS = ("cell", "tile")


@dataclass(eq=False)
class Recorder:
    """Where an :class:`Observe` writes: scalar rows per (run, block, step), histograms per (kind, block, step)
    summed over runs. A run is one generation (one pipeline call)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    hists: dict[tuple[str, int, int], torch.Tensor] = field(default_factory=dict)
    runs: int = 0
    generation: Generation | None = None  # of the current run
    blocks: int = 0  # blocks seen in the current run
    levels: dict[str, tuple[int, dict[str, torch.Tensor]]] = field(default_factory=dict)  # group -> first block's sets

    def run_of(self, generation: Generation) -> int:
        """The run (0-based) that ``generation`` is; a new one when it was not seen last."""
        if generation is not self.generation:
            self.generation, self.blocks, self.levels = generation, 0, {}
            self.runs += 1
        return self.runs - 1

    def add_hist(self, kind: str, block: int, step: int, counts: torch.Tensor) -> None:
        key = (kind, block, step)
        self.hists[key] = self.hists[key] + counts if key in self.hists else counts


@dataclass(eq=False)
class ObserveCache(PlanCache):
    """One block's observation state in a run: its number in call order, its last observed step, that step's sets,
    ToMA destinations and weights, and the compact sets of every earlier step."""

    block: int | None = None
    step: int | None = None
    sets: dict[str, torch.Tensor] = field(default_factory=dict)
    dest: list[torch.Tensor] | None = None
    weights: list[torch.Tensor] | None = None
    history: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class Observe(Method):
    """Observation hooks: record redundancy statistics of every block input; merge nothing.

    Per block at step ``t`` (its first call of the step; classifier-free-guidance halves and batch mates are separate
    samples, averaged):

    - 2x2-cell best matches (ToMeSD / CA-ToMe): every source's best cosine similarity to the ``sy x sx`` cell
      destinations: histogram (``bins`` bins over ``[-1, 1]``), mean, and share ``>=`` each of ``thresholds``;
    - tile-local best matches (ToMA): every token's best similarity to another token of its ``tile``, likewise;
    - Jaccard distances ``1 - |A & B| / |A | B|`` of CA-ToMe's pair set (sources with best similarity
      ``>= pair_threshold`` -> their destination) and ToMeSD's (the top ``int(ratio * N)``) to step ``t - 1``, and of
      CA-ToMe's to the level's first block at step ``t``;
    - the same for ToMA's destination sets (``ratio``, ``tile``), and ``||A_t - A_{t-1}||_F / ||A_{t-1}||_F`` of
      ToMA's merge matrix, both computed with step ``t - 1``'s destinations;
    - drift: the Jaccard distance of CA-ToMe's pairs and of ToMA's destinations at step ``t`` from those at every
      earlier step ``s`` (``drift[s][t]``): what reusing step ``s``'s sets at step ``t`` changes.

    Cell destinations are fixed per grid (top-left with ``use_rand=False``, else one draw from a generator seeded
    with ``seed``), so pair changes come from the tokens, not from the draw; no global random state is touched.
    ``layout``: the blocks in call order as ``(name, group, downsample)`` (filled by
    :func:`tokenmerge.analysis.analyze`); without it blocks are named by call order and levels are not compared.
    """

    thresholds: tuple[float, ...] = (0.5, 0.7, 0.9)
    pair_threshold: float = 0.7
    ratio: float = 0.5
    tile: tuple[int, int] = (4, 4)
    tau: float = 100.0  # ToMA's default
    sx: int = 2
    sy: int = 2
    use_rand: bool = False
    seed: int = 0
    bins: int = 40
    layout: tuple[tuple[str, str, int], ...] = ()
    max_downsample: int | None = field(default=1 << 20, kw_only=True)
    recorder: Recorder = field(default_factory=Recorder, compare=False, repr=False)

    cache_scope = "block"
    cache_type = ObserveCache

    def validate(self) -> None:
        if not self.thresholds or not all(-1.0 <= t <= 1.0 for t in (*self.thresholds, self.pair_threshold)):
            raise ValueError(
                f"thresholds must be cosine similarities in [-1, 1], got {self.thresholds} and "
                f"pair_threshold {self.pair_threshold}"
            )
        check_ratio(self.ratio)
        object.__setattr__(self, "tile", check_tile(self.tile))
        if self.tau <= 0 or self.bins < 1:
            raise ValueError(f"tau must be positive and bins at least 1, got tau={self.tau}, bins={self.bins}")
        check_cells(self.sx, self.sy)
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))

    @property
    def roles(self) -> frozenset[str]:
        return frozenset()

    def plan(self, x: torch.Tensor, grid: tuple[int, int], cache: ObserveCache, step: int) -> None:
        run = self.recorder.run_of(cache.generation)
        if cache.block is None:
            cache.block = self.recorder.blocks
            self.recorder.blocks += 1
        if cache.step != step:
            with torch.no_grad():
                self._observe(x.detach(), grid, cache, run, step)
        return None

    def _observe(self, x: torch.Tensor, grid: tuple[int, int], cache: ObserveCache, run: int, step: int) -> None:
        (h, w), block = grid, cache.block
        row: dict[str, Any] = dict(run=run, block=block, step=step, grid=[h, w])
        sets: dict[str, torch.Tensor] = {}
        if h >= self.sy and w >= self.sx:
            _, best, match = bipartite_match(x, self._cell_destinations(h, w, x.device))
            row.update(self._distribution("cell", best, block, step))
            sets.update(pairs=st.threshold_pairs(best, match, self.pair_threshold))
            sets.update(pairs_top=st.top_pairs(best, match, h * w, self.ratio))
        tiles = TileGrid(h, w, *self.tile)
        near = st.tile_best(x, tiles)
        if near.numel():
            row.update(self._distribution("tile", near, block, step))
        dest = st.toma_destinations(x, tiles, self.ratio)
        sets["dest"] = st.destination_codes(dest, tiles)
        if cache.step == step - 1:
            row.update({f"{k}_adj": _mean(st.jaccard_distance(cache.sets[k], v)) for k, v in sets.items()})
            fixed = st.toma_weights(x, tiles, cache.dest, self.tau)
            row["weight_adj"] = _mean(st.relative_change(fixed, cache.weights))
        history = cache.history
        for kind in DRIFT:
            if kind in sets:
                row[f"{kind}_drift"] = {
                    s: _mean(st.jaccard_distance(old[kind], sets[kind])) for s, old in history.items()
                }
        history[step] = {k: st.compact(sets[k], h * w if k == "pairs" else 1) for k in DRIFT if k in sets}
        row.update(self._against_level(sets, block, step))
        cache.step, cache.sets, cache.dest = step, sets, dest
        cache.weights = st.toma_weights(x, tiles, dest, self.tau)
        self.recorder.rows.append(row)

    def _cell_destinations(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        rng = torch.Generator().manual_seed(self.seed) if self.use_rand else None
        return cell_destinations(h, w, self.sx, self.sy, rng, device)

    def _distribution(self, kind: str, best: torch.Tensor, block: int, step: int) -> dict[str, float]:
        self.recorder.add_hist(kind, block, step, st.histogram(best, self.bins))
        shares = st.shares_above(best, self.thresholds)
        return {f"{kind}_mean": float(best.float().mean())} | {
            f"{kind}_share>={t:g}": s for t, s in zip(self.thresholds, shares, strict=True)
        }

    def _against_level(self, sets: dict[str, torch.Tensor], block: int, step: int) -> dict:
        """Distances to the sets of the first block of the same level (``layout`` group) at this step."""
        if block >= len(self.layout):
            return {}
        levels = self.recorder.levels
        first = levels.get(self.layout[block][1])
        if first is None or first[0] != step:
            levels[self.layout[block][1]] = (step, sets)
            return {}
        return {f"{k}_level": _mean(st.jaccard_distance(first[1][k], sets[k])) for k in ("pairs", "dest") if k in sets}


def _mean(values: torch.Tensor) -> float:
    return float(values.float().mean())


def summarize(observe: Observe) -> dict[str, Any]:
    """The recorded statistics as plain data (JSON-able): every metric per block and step as mean, std, min and max
    over runs (``metrics[m][stat][block][step]``, ``None`` where undefined; every :data:`STABILITY` metric is
    present), the drift matrices as mean and max over runs (``drift[kind][stat][block][s][t]``, defined for
    ``s < t``), and the histograms summed over runs and samples (``histograms[kind][block][step][bin]``).

    Raises ``ValueError`` when nothing was observed.
    """
    rows, recorder = observe.recorder.rows, observe.recorder
    if not rows:
        raise ValueError("nothing was observed: no block ran with a token grid while the observer was applied")
    num_blocks, num_steps = 1 + max(r["block"] for r in rows), 1 + max(r["step"] for r in rows)
    skip = {"run", "block", "step", "grid", *(f"{k}_drift" for k in DRIFT)}
    names = list(dict.fromkeys([*(k for r in rows for k in r if k not in skip), *STABILITY]))
    cubes = {m: np.full((recorder.runs, num_blocks, num_steps), np.nan) for m in names}
    drift = {k: np.full((recorder.runs, num_blocks, num_steps, num_steps), np.nan) for k in DRIFT}
    grids: dict[int, list[int]] = {}
    for r in rows:
        grids.setdefault(r["block"], r["grid"])
        for m in names:
            if m in r:
                cubes[m][r["run"], r["block"], r["step"]] = r[m]
        for k in DRIFT:
            for s, d in r.get(f"{k}_drift", {}).items():
                drift[k][r["run"], r["block"], s, r["step"]] = d
    blocks = []
    for b in range(num_blocks):
        name, group, downsample = observe.layout[b] if b < len(observe.layout) else (f"block{b}", f"block{b}", 0)
        blocks.append(dict(name=name, group=group, downsample=downsample, grid=grids.get(b)))
    hists = {
        kind: [
            [_plain(recorder.hists.get((kind, b, t), torch.zeros(observe.bins)).tolist()) for t in range(num_steps)]
            for b in range(num_blocks)
        ]
        for kind in HIST_KINDS
    }
    internal = {"recorder", "layout", "blocks", "steps", "max_downsample"}
    config = {f.name: getattr(observe, f.name) for f in dataclasses.fields(observe) if f.name not in internal}
    return dict(
        config=_plain(config),
        runs=recorder.runs,
        num_steps=num_steps,
        blocks=blocks,
        bin_edges=np.linspace(-1.0, 1.0, observe.bins + 1).tolist(),
        metrics={m: spread(c) for m, c in cubes.items()},
        drift={k: {stat: v for stat, v in spread(c).items() if stat in ("mean", "max")} for k, c in drift.items()},
        histograms=hists,
    )


def spread(cube: np.ndarray) -> dict[str, list]:
    """``(runs, ...)`` values with NaN for missing ones -> ``mean``, ``std`` (population), ``min``, ``max`` over runs
    as nested lists, ``None`` where no run has a value."""
    valid = ~np.isnan(cube)
    count = valid.sum(0)
    safe = np.where(valid, cube, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = safe.sum(0) / count
        std = np.sqrt(np.where(valid, (cube - mean) ** 2, 0.0).sum(0) / count)
    low = np.where(valid, cube, np.inf).min(0)
    high = np.where(valid, cube, -np.inf).max(0)
    return {
        k: _plain(np.where(count > 0, v, np.nan).tolist())
        for k, v in dict(mean=mean, std=std, min=low, max=high).items()
    }


def _plain(value: Any) -> Any:
    """Nested lists/tuples/dicts with NaN as ``None`` and tuples as lists."""
    if isinstance(value, float):
        return None if value != value else value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
