"""``tm.tune``: the most faithful setting that reaches a speed target, measured on the user's pipeline and machine.

The search reuses the pareto harness (:func:`tokenmerge.harness.pareto.run_sweep`: interleaved shuffled rounds,
median, CUDA events on a GPU; fidelity of a setting's images to the unaccelerated ones) in four phases, each a
sweep with its own baseline, so every speed-up is a ratio measured in one run:

1. *prime*: the unaccelerated pipeline once (warms the model and prices one call: an over-estimate, it pays the
   one-off costs);
2. *coarse*: every method x explored preset of :data:`tokenmerge.harness.sweep.SWEEPS` (not the ablations) at its
   quick values, one timed call each (its images are the ones scored);
3. *refine*: per curve (one method and preset, settings ordered from mild to aggressive by their fidelity), the two
   neighbouring knob values between which the goal's constraint flips are bisected (a midpoint; beyond the coarse
   grid's mild or aggressive end, the next value of the full grid); curves that cannot beat the best feasible
   setting found so far are pruned, the ``probes`` most promising are measured per round, ``refine_rounds`` rounds;
4. *confirm*: the ``confirm`` best candidates (within ``slack`` of the target), plus the best one with a safe
   margin, timed again over ``rounds`` rounds; the pick is chosen from these measurements only. When re-timing
   rejects them all, the next candidates are confirmed (``attempts`` runs at most, budget permitting).

The goal (:class:`Goal`): with ``speedup`` only, the highest fidelity among settings at least ``speedup`` fast; with
``min_fidelity``, the fastest setting whose fidelity is at least ``min_fidelity`` (and at least ``speedup`` fast
unless ``speedup=None``). ``budget_s`` caps the estimated time (calls x the primed call time); the refinement and
confirmation shrink to fit it, and a budget too small for the coarse sweep is an error.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenmerge as tm
from tokenmerge.api import view_of
from tokenmerge.errors import HarnessError
from tokenmerge.harness.pareto import Metric, Point, SweepResult, front, run_sweep, standard_metrics
from tokenmerge.harness.registry import methods
from tokenmerge.harness.runners import ImageSet, Runner
from tokenmerge.harness.sweep import SWEEPS, MethodSetting, Selection, Setting, build_settings
from tokenmerge.harness.timing import Schedule

logger = logging.getLogger(__name__)

#: Default calibration set: (images, steps) for the packaged reference models and for diffusers pipelines.
DEFAULT_IMAGES = {"reference": (4, 15), "pipeline": (2, 20)}


@dataclass(frozen=True)
class Goal:
    """What to pick: see the module docstring. ``metric`` scores fidelity (``psnr``, ``ssim`` or ``rel_l2``)."""

    speedup: float | None
    min_fidelity: float | None
    metric: Metric

    def __post_init__(self) -> None:
        for name in ("speedup", "min_fidelity"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
                raise TypeError(f"{name} must be a number or None, got {type(value).__name__} {value!r}")
        if self.speedup is None and self.min_fidelity is None:
            raise HarnessError("give a speed-up target, a min_fidelity, or both")
        if self.speedup is not None and not (math.isfinite(self.speedup) and self.speedup > 1.0):
            raise HarnessError(f"speedup must be a number > 1, got {self.speedup}")
        if self.min_fidelity is not None and not math.isfinite(self.min_fidelity):
            raise HarnessError(f"min_fidelity must be a finite number, got {self.min_fidelity}")

    @property
    def fastest(self) -> bool:
        """Whether the objective is speed (``min_fidelity`` given) rather than fidelity."""
        return self.min_fidelity is not None

    def fidelity(self, point: Point) -> float:
        """The point's metric, higher = better (NaN: not scored)."""
        return self.metric.oriented(point.scores.get(self.metric.name, math.nan))

    def faithful(self, point: Point) -> bool:
        return self.min_fidelity is None or self.fidelity(point) >= self.metric.oriented(self.min_fidelity)

    def fast(self, point: Point, slack: float = 0.0) -> bool:
        return self.speedup is None or point.speedup >= self.speedup * (1.0 - slack)

    def meets(self, point: Point, slack: float = 0.0) -> bool:
        return point.setting.family != "baseline" and self.fast(point, slack) and self.faithful(point)

    def objective(self, point: Point) -> float:
        return point.speedup if self.fastest else self.fidelity(point)

    def constraint(self) -> str:
        """E.g. ``>= 1.3x and psnr >= 30``."""
        parts = [f">= {self.speedup:g}x"] if self.speedup is not None else []
        if self.min_fidelity is not None:
            op = ">=" if self.metric.higher_is_better else "<="
            parts.append(f"{self.metric.name} {op} {self.min_fidelity:g}")
        return " and ".join(parts)

    def describe(self) -> str:
        aim = "the fastest" if self.fastest else f"the highest {self.metric.name}"
        return f"{aim} at {self.constraint()}"


@dataclass(frozen=True)
class Search:
    """How hard to look: refinement rounds and probes per round, candidates confirmed and their rounds, how many
    confirmation runs (each with the next candidates) before giving up, the tolerance ``slack`` (fraction of the
    target) within which a setting counts as a candidate before confirmation, and ``safe`` (fraction above the
    target) for the fallback candidate."""

    refine_rounds: int = 2
    probes: int = 2
    confirm: int = 2
    rounds: int = 3
    attempts: int = 2
    slack: float = 0.05
    safe: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class Trial:
    """A setting measured during the search: the phase (coarse, refine, confirm), its speed-up and scores."""

    phase: str
    label: str
    method: str | None
    options: dict[str, Any]
    speedup: float
    scores: dict[str, float]


@dataclass
class TuneResult:
    """The outcome of :func:`tune`: the pick (``None`` when nothing meets the goal), its measured speed-up and
    scores (from the confirmation run), why it was picked, the front of every setting tried, and the cache key."""

    goal: dict[str, Any]
    reached: bool
    method: tm.Method | None
    label: str | None
    speedup: float
    scores: dict[str, float]
    reason: str
    front: list[str]
    trials: list[Trial]
    key: dict[str, Any]
    elapsed_s: float
    fastest: tuple[str, float] | None = None  # the fastest setting measured: (label, speed-up)
    from_cache: bool = field(default=False, compare=False)

    def apply(self, pipe: Any) -> tm.Method:
        """Apply the pick to ``pipe``; a :class:`HarnessError` when the goal was not reached."""
        if self.method is None:
            raise HarnessError(self.reason)
        tm.apply(pipe, self.method)
        return self.method

    def report(self) -> str:
        """A few lines: the front (speed-up, fidelity), the pick and why."""
        metric = self.goal["metric"]
        by_label = {t.label: t for t in self.trials}
        lines = [f"tune: {self.goal['describe']}; {len(by_label)} settings tried in {self.elapsed_s:.1f} s"]
        lines.append(f"front ({metric}):")
        for label in self.front:
            t = by_label[label]
            lines.append(f"  {t.speedup:6.3f}x  {t.scores.get(metric, math.nan):8.4g}  {label}")
        lines.append(("pick: " if self.reached else "no pick: ") + self.reason)
        return "\n".join(lines)


def method_record(method: tm.Method | None) -> tuple[str | None, dict[str, Any]]:
    """The registry name and the constructor options of ``method`` (JSON-ready; ``(None, {})`` for none)."""
    if method is None:
        return None, {}
    name = next(n for n, cls in methods().items() if type(method) is cls)
    options = {f.name: getattr(method, f.name) for f in dataclasses.fields(method) if f.init}
    return name, _jsonable(options)


def method_from_record(name: str, options: dict[str, Any]) -> tm.Method:
    """The method ``name`` with ``options`` (as :func:`method_record` wrote them)."""
    registry = methods()
    if name not in registry:
        raise HarnessError(f"unknown method {name!r} in a tuned result; known: {', '.join(registry)}")
    opts = {k: set(v) if k == "roles" and isinstance(v, list) else v for k, v in options.items()}
    try:
        return registry[name](**opts)
    except (TypeError, ValueError) as exc:
        raise HarnessError(f"tuned {name} options do not fit this tokenmerge: {exc}") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted(_jsonable(v) for v in value)
    return value


def _trials(phase: str, result: SweepResult) -> list[Trial]:
    out = []
    for p in result.points[1:]:
        name, options = method_record(getattr(p.setting, "method", None))
        out.append(Trial(phase, p.label, name, options, p.speedup, dict(p.scores)))
    return out


# --- the search ------------------------------------------------------------------------------------------------------


def _curves(points: Sequence[Point], goal: Goal) -> dict[tuple[str, str], list[Point]]:
    """Measured settings per (method, preset), one per knob value, from mild to aggressive: ordered by the knob,
    its direction read off the (deterministic) fidelity at the knob's two ends (the mild end is the more faithful).
    A curve whose images repeat an earlier curve's at every value (a preset whose options change nothing on this
    model) is left out: refining it would measure the same computation twice."""
    curves: dict[tuple[str, str], dict[Any, Point]] = {}
    for p in points:
        s = p.setting
        if s.family != "baseline" and s.value is not None and not math.isnan(goal.fidelity(p)):
            curves.setdefault((s.family, s.preset), {}).setdefault(s.value, p)  # the first measurement of a value
    out, seen = {}, set()
    for name, by_value in curves.items():
        pts = [by_value[v] for v in sorted(by_value)]
        images = (name[0], *((p.setting.value, p.digest) for p in pts))
        if all(p.digest for p in pts) and images in seen:
            continue
        seen.add(images)
        if goal.fidelity(pts[0]) < goal.fidelity(pts[-1]):  # a larger value is milder (e.g. a similarity threshold)
            pts.reverse()
        out[name] = pts
    return out


def _between(a: Any, b: Any) -> Any | None:
    """A knob value between ``a`` and ``b`` (an int for int knobs), or ``None`` if there is none."""
    if isinstance(a, int) and isinstance(b, int):
        mid = (a + b) // 2
        return mid if min(a, b) < mid < max(a, b) else None
    mid = round((a + b) / 2, 4)
    return mid if min(a, b) < mid < max(a, b) else None


def _beyond(value: Any, toward: Any, family: str, preset: str, tried: set[Any]) -> Any | None:
    """The preset's full grid's next value after ``value`` away from ``toward`` (one step past a curve's end),
    untried."""
    sweep = SWEEPS[family]
    grid = sorted(sweep.preset(preset).grid(sweep, quick=False))
    ahead = [v for v in grid if (v < value if toward > value else v > value) and v not in tried]
    if not ahead:
        return None
    return max(ahead) if toward > value else min(ahead)


def _probe(pts: list[Point], goal: Goal) -> tuple[float, Any] | None:
    """The next knob value to measure on one curve and the best objective it could reach (its bound), or ``None``.

    Fidelity objective: the mildest setting that is fast enough sits between the last too-slow and the first
    fast-enough setting. Speed objective: the most aggressive setting that is faithful enough sits between the last
    faithful and the first unfaithful one."""
    tried = {p.setting.value for p in pts}
    family, preset = pts[0].setting.family, pts[0].setting.preset
    if not goal.fastest:
        i = next((k for k, p in enumerate(pts) if goal.fast(p)), None)
        if i is None:
            return None
        if i == 0:
            value = (
                _beyond(pts[0].setting.value, pts[-1].setting.value, family, preset, tried) if len(pts) > 1 else None
            )
            return (math.inf, value) if value is not None else None
        value = _between(pts[i - 1].setting.value, pts[i].setting.value)
        return (goal.fidelity(pts[i - 1]), value) if value is not None else None
    j = max((k for k, p in enumerate(pts) if goal.faithful(p)), default=None)
    if j is None:
        return None
    if j == len(pts) - 1:
        value = _beyond(pts[-1].setting.value, pts[0].setting.value, family, preset, tried) if len(pts) > 1 else None
        return (math.inf, value) if value is not None else None
    value = _between(pts[j].setting.value, pts[j + 1].setting.value)
    return (pts[j + 1].speedup, value) if value is not None else None


def _best(points: Sequence[Point], goal: Goal, slack: float = 0.0) -> Point | None:
    ok = [p for p in points if goal.meets(p, slack)]
    return max(ok, key=goal.objective, default=None)


def _refinements(points: Sequence[Point], goal: Goal, probes: int) -> list[tuple[str, str, Any]]:
    """Up to ``probes`` (method, preset, value) to measure next: per curve its probe, best bound first, pruned when
    the bound cannot beat the best setting meeting the goal so far."""
    best = _best(points, goal)
    incumbent = goal.objective(best) if best is not None else -math.inf
    found = []
    for (family, preset), pts in _curves(points, goal).items():
        probe = _probe(pts, goal)
        if probe is not None and probe[0] > incumbent:
            found.append((probe[0], family, preset, probe[1]))
    found.sort(key=lambda item: -item[0])
    return [(family, preset, value) for _, family, preset, value in found[:probes]]


def _settings_for(runner: Runner, wanted: Sequence[tuple[str, str, Any]]) -> list[Setting]:
    """The :class:`MethodSetting` of each (method, preset, value), built as the pareto sweep builds its own."""
    layout, out = view_of(runner.target), []
    for family, preset, value in wanted:
        plan = build_settings(
            layout, Selection([family], {family: [preset]}, {family: [value]}), runner.method_defaults
        )
        label = MethodSetting(None, family, preset, SWEEPS[family].knob, value).label
        out += [s for s in plan.settings if s.label == label]
    return out


@dataclass(frozen=True)
class Found:
    """What :func:`search` found: every trial, the pick (from the confirmation run; ``None`` if nothing met the
    goal there), the settings confirmed, the fastest setting measured (confirmed speeds where re-timed) and the
    labels on the front of every setting tried."""

    trials: list[Trial]
    pick: Point | None
    confirmed: list[Point]
    fastest: Point | None
    front: list[str]


@dataclass
class _Clock:
    """The estimated cost of the search so far (calls x the primed call time) against ``budget_s``."""

    call_s: float
    budget_s: float | None
    spent_s: float = 0.0

    def fits(self, calls: int) -> bool:
        return self.budget_s is None or self.spent_s + calls * self.call_s <= self.budget_s

    def add(self, calls: int) -> None:
        self.spent_s += calls * self.call_s


def search(
    runner: Runner,
    goal: Goal,
    selection: Selection | None = None,
    budget_s: float | None = None,
    plan: Search | None = None,
    metrics: Sequence[Metric] | None = None,
    progress: bool = False,
) -> Found:
    """Run the four phases on ``runner`` (see the module docstring)."""
    from tqdm.auto import tqdm

    plan = plan or Search()
    metrics = list(metrics or standard_metrics())
    sweep = dict(metrics=metrics, progress=False)
    bar = tqdm(total=3 + plan.refine_rounds, desc=f"tune {runner.name}", disable=not progress, unit="phase")
    bar.set_postfix_str("prime")
    prime = run_sweep(runner, [], schedule=Schedule(rounds=1, warmup=0, seed=plan.seed), **sweep)
    clock = _Clock(prime.points[0].median_s, budget_s)
    bar.update()
    coarse_plan = build_settings(view_of(runner.target), _coarse(selection), runner.method_defaults)
    coarse = coarse_plan.settings[1:]
    if not clock.fits(len(coarse) + 1 + 2):  # the coarse sweep and one confirmation round of one candidate
        calls = len(coarse) + 1
        raise HarnessError(
            f"budget_s={budget_s:g} is too small: the coarse sweep alone takes ~{calls * clock.call_s:.0f} s ({calls} "
            f"calls of ~{clock.call_s:.2g} s), confirming a pick 2 more; raise it or choose fewer methods"
        )
    bar.set_postfix_str(f"coarse: {len(coarse)} settings")
    result = run_sweep(runner, coarse, schedule=Schedule(rounds=1, warmup=0, seed=plan.seed), **sweep)
    clock.add(len(coarse) + 1)
    points, trials = list(result.points[1:]), _trials("coarse", result)
    bar.update()
    for k in range(plan.refine_rounds):
        wanted = _refinements(points, goal, plan.probes)
        while wanted and not clock.fits(len(wanted) + 1 + 3 * (plan.confirm + 2)):
            wanted.pop()
        if wanted:
            bar.set_postfix_str(f"refine {k + 1}: {len(wanted)} settings")
            new = _settings_for(runner, wanted)
            result = run_sweep(runner, new, schedule=Schedule(rounds=1, warmup=0, seed=plan.seed + k + 1), **sweep)
            clock.add(len(new) + 1)
            points += result.points[1:]
            trials += _trials("refine", result)
        bar.update()
    pick, confirmed_points, confirmed = None, [], set()
    for attempt in range(plan.attempts):  # the next candidates when re-timing rejects every one
        candidates = _candidates([p for p in points if _same(p) not in confirmed], goal, plan)
        while len(candidates) > 1 and not clock.fits(plan.rounds * (len(candidates) + 1)):
            candidates.pop(-2)  # keep the safe fallback, drop the weakest of the others
        rounds = plan.rounds
        while rounds > 1 and not clock.fits(rounds * (len(candidates) + 1)):
            rounds -= 1
        if not candidates or (attempt > 0 and not clock.fits(rounds * (len(candidates) + 1))):
            break
        bar.set_postfix_str(f"confirm: {len(candidates)} settings")
        schedule = Schedule(rounds=rounds, warmup=0, seed=plan.seed + 100 + attempt)
        result = run_sweep(runner, [p.setting for p in candidates], schedule=schedule, **sweep)
        clock.add(rounds * (len(candidates) + 1))
        trials += _trials("confirm", result)
        confirmed_points += result.points[1:]
        confirmed |= {_same(p) for p in candidates}
        pick = _best(confirmed_points, goal)
        if pick is not None:
            break
    everything = [*confirmed_points, *(p for p in points if _same(p) not in confirmed)]
    bar.update()
    bar.close()
    fastest = max(everything, key=lambda p: p.speedup, default=None)
    on_front = [everything[i].label for i in front(everything, goal.metric)]
    return Found(trials, pick, confirmed_points, fastest, on_front)


def _coarse(selection: Selection | None) -> Selection:
    """Every explored preset (not the ablations) of the chosen methods at its quick values."""
    chosen = selection.chosen() if selection is not None else list(SWEEPS)
    presets = {m: [p.name for p in SWEEPS[m].presets if p.explore] for m in chosen}
    values: dict[str, Any] = {}
    if selection is not None:
        presets.update(selection.presets)
        values.update(selection.values)
    return Selection(chosen, presets, values, quick=True)


def _same(point: Point) -> str:
    """What identifies a setting's computation: its images' digest (its label when not known)."""
    return point.digest or point.label


def _candidates(points: Sequence[Point], goal: Goal, plan: Search) -> list[Point]:
    """The ``plan.confirm`` best settings meeting the goal within the slack, then the best one meeting it with the
    safe margin (when not among them): confirmation re-times them all. Of settings with the same images (the same
    computation), only the first measured is a candidate."""
    first: dict[str, Point] = {}
    for p in points:
        first.setdefault(_same(p), p)
    points = [p for p in points if first[_same(p)] is p]
    near = sorted((p for p in points if goal.meets(p, plan.slack)), key=goal.objective, reverse=True)
    out = near[: plan.confirm]
    if goal.speedup is not None:
        safe = [p for p in points if goal.meets(p) and p.speedup >= goal.speedup * (1 + plan.safe)]
        fallback = max(safe, key=goal.objective, default=None)
        if fallback is not None and fallback not in out:
            out.append(fallback)
    return out


# --- the entry point -------------------------------------------------------------------------------------------------


def _metric(name: str) -> Metric:
    for m in standard_metrics():
        if m.name == name:
            return m
    raise HarnessError(f"unknown metric {name!r}; choose psnr, ssim or rel_l2")


def pipeline_runner(
    pipe: Any,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float | None = None,
) -> Runner:
    """A runner over the user's ``pipe``: a packaged reference pipeline or a diffusers pipeline."""
    from tokenmerge.harness.runners import PipelineRunner, ReferenceRunner, reference_captions
    from tokenmerge.reference.pipeline import ReferencePipeline

    if isinstance(pipe, ReferencePipeline):
        if height or width:
            raise HarnessError(
                f"the reference models generate {pipe.size}x{pipe.size} images only: drop height / width"
            )
        n, default_steps = DEFAULT_IMAGES["reference"]
        chosen = list(prompts) if prompts is not None else reference_captions(n)
        images = ImageSet.cross(chosen, seeds, steps=steps or default_steps, guidance_scale=guidance_scale)
        return ReferenceRunner(f"reference-{pipe.name}", pipe, images)
    from tokenmerge.harness.prompts import load_prompts

    n, default_steps = DEFAULT_IMAGES["pipeline"]
    chosen = list(prompts) if prompts is not None else load_prompts("general")[:n]
    options = dict(steps=steps or default_steps, guidance_scale=guidance_scale, height=height, width=width)
    return PipelineRunner(type(pipe).__name__, pipe, ImageSet.cross(chosen, seeds, **options))


def tune(
    pipe: Any,
    speedup: float | None = 1.3,
    *,
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    budget_s: float | None = None,
    min_fidelity: float | None = None,
    metric: str = "psnr",
    methods: Sequence[str] | None = None,
    apply: bool = False,
    cache: str | Path | None = None,
    search_plan: Search | None = None,
    progress: bool = True,
) -> TuneResult:
    """The setting of ``methods`` (default: every sweepable method) that meets the goal best on ``pipe`` at these
    image settings (see the module docstring), measured against the unaccelerated ``pipe``.

    ``prompts`` / ``seeds``: the calibration images (default: a few built-in prompts, image ``i`` with seed
    ``1000 + i``); ``cache``: a folder (or a ``.json`` file) where the result is stored under its key (model,
    resolution, steps, device, dtype, library versions, goal) and from which a matching result is returned without
    measuring; ``apply``: apply the pick (an error when nothing meets the goal). Returns a :class:`TuneResult`.
    """
    goal = Goal(speedup, min_fidelity, _metric(metric))
    if budget_s is not None and budget_s <= 0:
        raise HarnessError(f"budget_s must be > 0, got {budget_s}")
    selection = Selection(list(methods)) if methods is not None else None
    if selection is not None:
        selection.check()
    if tm.is_applied(pipe):
        raise HarnessError("a method is applied to this pipeline: tm.remove(pipe) first; tune measures against it bare")
    runner = pipeline_runner(pipe, prompts, seeds, steps, height, width, guidance_scale)
    return tune_runner(runner, goal, selection, budget_s, search_plan, apply=apply, cache=cache, progress=progress)


def tune_runner(
    runner: Runner,
    goal: Goal,
    selection: Selection | None = None,
    budget_s: float | None = None,
    plan: Search | None = None,
    *,
    apply: bool = False,
    cache: str | Path | None = None,
    progress: bool = True,
) -> TuneResult:
    """:func:`tune` on a prepared runner (the command line's and the benchmark's entry)."""
    from tokenmerge.harness import tune_cache

    key = tune_cache.cache_key(runner, goal, selection)
    path = tune_cache.cache_path(cache, key) if cache is not None else None
    if path is not None and (hit := tune_cache.read_matching(path, key)) is not None:
        logger.info("tune: cache hit %s", path)
        if apply:
            hit.apply(runner.target)
        return hit
    if path is not None:
        tune_cache.check_cache(path)  # before measuring, not a minute later
    start = time.perf_counter()
    restore = _quiet(runner.target)
    try:
        found = search(runner, goal, selection, budget_s, plan, progress=progress)
    finally:
        restore()
    result = _result(goal, key, found, time.perf_counter() - start)
    if path is not None:
        tune_cache.write(path, result)
    if apply:
        result.apply(runner.target)
    return result


def _quiet(pipe: Any) -> Callable[[], None]:
    """Turn off a diffusers pipeline's progress bar; returns what restores it."""
    if not hasattr(pipe, "set_progress_bar_config"):
        return lambda: None
    before = dict(getattr(pipe, "_progress_bar_config", {}) or {})
    pipe.set_progress_bar_config(disable=True)

    def restore() -> None:
        pipe._progress_bar_config = before

    return restore


def _result(goal: Goal, key: dict[str, Any], found: Found, elapsed_s: float) -> TuneResult:
    name = goal.metric.name
    described = dict(speedup=goal.speedup, min_fidelity=goal.min_fidelity, metric=name, describe=goal.describe())
    fast = (found.fastest.label, found.fastest.speedup) if found.fastest is not None else None
    tried = len({t.label for t in found.trials})
    pick = found.pick
    if pick is None:
        best = f"the fastest measured is {fast[0]} at {fast[1]:.3g}x" if fast else "no setting could be measured"
        if goal.speedup is not None and (fast is None or fast[1] < goal.speedup):
            why = f"no setting reaches {goal.speedup:g}x on this pipeline: {best}"
        else:
            why = f"no setting meets {goal.constraint()} on this pipeline: {best}"
        if found.confirmed:
            top = max(p.speedup for p in found.confirmed)
            why += f" ({len(found.confirmed)} candidates re-timed at most {top:.3g}x in the final rounds)"
        why += f"; {tried} settings tried"
        return TuneResult(
            described, False, None, None, math.nan, {}, why, found.front, found.trials, key, elapsed_s, fast
        )
    why = f"{pick.label}: {pick.speedup:.3g}x, {name} {pick.scores[name]:.4g}: {goal.describe()} of the {tried} "
    why += "settings tried, confirmed over the final rounds"
    rivals = [p for p in found.confirmed if p is not pick and goal.meets(p)]
    if rivals:
        second = max(rivals, key=goal.objective)
        why += f"; next best {second.label}: {second.speedup:.3g}x, {name} {second.scores[name]:.4g}"
    method = pick.setting.method  # type: ignore[attr-defined]
    scores = dict(pick.scores)
    return TuneResult(
        described, True, method, pick.label, pick.speedup, scores, why, found.front, found.trials, key, elapsed_s, fast
    )
