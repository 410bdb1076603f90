"""The speed-fidelity sweep: measure settings on a runner, mark the Pareto front, check a method's targets.

:func:`run_sweep` follows a :class:`tokenmerge.harness.timing.Schedule`: one untimed warm-up call per setting (whose
images are the ones scored; a setting whose warm-up raises ``ValueError`` is dropped with its reason), then
interleaved timed rounds in shuffled order. Speed-up = the baseline's median / the setting's median over the same
rounds. Every timed call's images are compared with the warm-up's (``timed_max_diff``, 0 when the generation is
deterministic, as it is on a CPU). Fidelity: each :class:`Metric` of the setting's images against the baseline's
(same prompts and seeds). :func:`front` and :func:`check_targets` are pure functions of the measured points.

Targets (issue #12), in the units of the front's metric, for a method family ``F``:

- *default*: F's default is dominated when some setting is at least as fast and more than ``margin`` better;
- *gaps*: at each speed ``s >= min_speedup``, the best of F's settings at least ``s`` fast is within ``margin`` of the
  best of all settings at least ``s`` fast. Checked at every measured speed from ``min_speedup`` up (the best at
  ``>= s`` only changes there) and reported at bucket edges ``min_speedup + k * bucket``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import tokenmerge as tm
from tokenmerge.errors import HarnessError
from tokenmerge.harness import metrics as fidelity
from tokenmerge.harness import report, timing
from tokenmerge.harness.runners import Runner
from tokenmerge.harness.sweep import BASELINE, Setting, Skipped
from tokenmerge.harness.timing import Schedule

logger = logging.getLogger(__name__)

#: PSNR of an image identical to its reference is infinite; per image it is capped here before averaging, so that one
#: unchanged image does not make a set's mean infinite (a set of only identical images stays ``inf``).
PSNR_CAP = 100.0


@dataclass(frozen=True)
class Metric:
    """A fidelity score of a setting's images ``(N, 3, H, W)`` in ``[0, 1]`` against the baseline's, given the
    prompts: ``score(images, reference, prompts) -> float`` (a mean over the images)."""

    name: str
    higher_is_better: bool
    score: Callable[[torch.Tensor, torch.Tensor, Sequence[str]], float]
    unit: str = ""

    def oriented(self, value: float) -> float:
        """``value`` with higher = better."""
        return value if self.higher_is_better else -value


def _psnr(images: torch.Tensor, reference: torch.Tensor, prompts: Sequence[str]) -> float:
    values = fidelity.psnr(images, reference).double()
    return math.inf if torch.isinf(values).all() else float(values.clamp(max=PSNR_CAP).mean())


def _ssim(images: torch.Tensor, reference: torch.Tensor, prompts: Sequence[str]) -> float:
    if min(images.shape[-2:]) < 11:  # the Gaussian window
        return math.nan
    return float(fidelity.ssim(images, reference).double().mean())


def _rel_l2(images: torch.Tensor, reference: torch.Tensor, prompts: Sequence[str]) -> float:
    diff = (images - reference).flatten(1).double().norm(dim=1)
    return float((diff / reference.flatten(1).double().norm(dim=1).clamp_min(1e-12)).mean())


def standard_metrics(lpips: Any | None = None, dino: Any | None = None) -> list[Metric]:
    """PSNR (dB, per image capped at :data:`PSNR_CAP`), SSIM and relative L2; LPIPS with a
    :class:`tokenmerge.harness.lpips.LPIPS` and DINO delta with a :class:`tokenmerge.harness.metrics.DinoFeatures`
    when given. SSIM (sides under 11 pixels) and LPIPS (under ``lpips.MIN_SIZE``) are NaN on images too small."""
    out = [Metric("psnr", True, _psnr, "dB"), Metric("ssim", True, _ssim), Metric("rel_l2", False, _rel_l2)]
    if lpips is not None:
        from tokenmerge.harness.lpips import MIN_SIZE

        def lpips_mean(x: torch.Tensor, ref: torch.Tensor, prompts: Sequence[str]) -> float:
            if min(x.shape[-2:]) < MIN_SIZE:
                return math.nan
            return float(fidelity.batched(lpips, x, ref, batch=8).double().mean())

        out.append(Metric("lpips", False, lpips_mean))
    if dino is not None:

        def dino_delta(x: torch.Tensor, ref: torch.Tensor, prompts: Sequence[str]) -> float:
            features, reference = fidelity.batched(dino, x), fidelity.batched(dino, ref)
            return float(fidelity.dino_delta(features, reference).mean())

        out.append(Metric("dino_delta", False, dino_delta))
    return out


def scene_metrics() -> list[Metric]:
    """The reference models' scene metrics (:mod:`tokenmerge.reference.scenes`): ``caption_acc``, the mean share of
    each caption's attributes the scene classifier reads back from the setting's images (an offline CLIP-T; the
    baseline's own value says how far the model itself is from its captions), and ``scene_fd``, the Fréchet distance
    between the classifier features of the setting's and the baseline's images (an offline FID; small sets bias it
    upwards, so compare settings of one sweep only)."""
    from tokenmerge.reference import scenes

    def caption_acc(x: torch.Tensor, ref: torch.Tensor, prompts: Sequence[str]) -> float:
        return float(scenes.caption_accuracy(x, prompts).double().mean())

    def scene_fd(x: torch.Tensor, ref: torch.Tensor, prompts: Sequence[str]) -> float:
        if len(x) < 2:
            return math.nan
        return scenes.frechet_distance(scenes.scene_features(x), scenes.scene_features(ref))

    return [Metric("caption_acc", True, caption_acc), Metric("scene_fd", False, scene_fd)]


@dataclass
class Point:
    """A measured setting: its times, speed-up and scores (metric name -> value)."""

    setting: Setting = field(repr=False)
    times_s: list[float]
    speedup: float
    scores: dict[str, float]
    timed_max_diff: float  # largest |timed image - warm-up image| over its timed calls
    merged_nothing: bool  # not the baseline, yet its images equal the baseline's exactly
    digest: str = field(default="", compare=False)  # of the scored images: equal digests, the same computation
    merged_fraction: float | None = None  # of what its warm-up generation could merge away (tm.Summary)
    flop_ratios: dict[str, float] = field(default_factory=dict)  # projected: architecture label -> FLOP ratio

    @property
    def label(self) -> str:
        return self.setting.label

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    def row(self) -> dict[str, Any]:
        s = self.setting
        row: dict[str, Any] = dict(config=s.label, family=s.family, preset=s.preset, knob=s.knob, value=s.value)
        row.update(default=s.default, median_s=round(self.median_s, 5), speedup=round(self.speedup, 4))
        row.update({k: round(v, 5) if math.isfinite(v) else v for k, v in self.scores.items()})
        row.update(timed_max_diff=self.timed_max_diff, merged_nothing=self.merged_nothing)
        row.update({f"flops@{k}": round(v, 4) for k, v in self.flop_ratios.items()})
        return row


@dataclass
class SweepResult:
    """Every measured point (baseline first), the settings dropped at warm-up, the metrics and the schedule."""

    points: list[Point]
    dropped: list[Skipped]
    metrics: list[Metric]
    schedule: Schedule

    def metric(self, name: str) -> Metric:
        for m in self.metrics:
            if m.name == name:
                return m
        raise HarnessError(f"unknown metric {name!r}; measured: {', '.join(m.name for m in self.metrics)}")


def run_sweep(
    runner: Runner,
    settings: Sequence[Setting],
    metrics: Sequence[Metric],
    schedule: Schedule | None = None,
    progress: bool = False,
) -> SweepResult:
    """Time and score ``settings`` (the baseline is put first) on ``runner``; see the module docstring."""
    from tqdm.auto import tqdm

    schedule = schedule or Schedule()
    settings = [BASELINE, *(s for s in settings if s.label != BASELINE.label)]
    images: dict[int, torch.Tensor] = {}
    fractions: dict[int, float | None] = {}
    times: dict[int, list[float]] = {i: [] for i in range(len(settings))}
    diffs: dict[int, float] = dict.fromkeys(range(len(settings)), 0.0)
    dropped: dict[int, Skipped] = {}
    calls, checked = schedule.calls(len(settings)), schedule.warmup == 0
    bar = tqdm(calls, desc=f"pareto {runner.name}", disable=not progress, unit="call", leave=False)
    for call in bar:
        if call.timed and not checked:  # every warm-up done: drop the settings that repeat another's images
            dropped.update(_duplicates(settings, images, dropped))
            checked = True
        setting = settings[call.config]
        if call.config in dropped:
            continue
        bar.set_postfix_str(f"{setting.label} {'round ' + str(call.round + 1) if call.timed else 'warm-up'}")
        try:
            setting.apply(runner.target)
            try:
                out, seconds = timing.timed(runner.generate, runner.device) if call.timed else (runner.generate(), 0.0)
                if call.config not in fractions and getattr(setting, "method", None) is not None:
                    fractions[call.config] = tm.summary(runner.target).merged_fraction
            finally:
                setting.remove(runner.target)
        except ValueError as exc:
            if call.config == 0 or call.config in images:
                raise HarnessError(f"{setting.label} failed on {runner.name}: {exc}") from None
            dropped[call.config] = Skipped(setting.label, f"failed on {runner.name}: {exc}")
            logger.warning("dropped %s: %s", setting.label, dropped[call.config].reason)
            continue
        if call.config in images:
            diffs[call.config] = max(diffs[call.config], float((out - images[call.config]).abs().max()))
        else:
            images[call.config] = out
        if call.timed:
            times[call.config].append(seconds)
    base_images, base_median = images[0], statistics.median(times[0])
    prompts = list(runner.images.prompts)
    points = []
    for i, setting in enumerate(settings):
        if i in dropped:
            continue
        scores = {m.name: m.score(images[i], base_images, prompts) for m in metrics}
        speedup = base_median / statistics.median(times[i])
        merged_nothing = i > 0 and torch.equal(images[i], base_images)
        digest = hashlib.sha256(images[i].numpy().tobytes()).hexdigest()[:16]
        points.append(Point(setting, times[i], speedup, scores, diffs[i], merged_nothing, digest, fractions.get(i)))
    return SweepResult(points, list(dropped.values()), list(metrics), schedule)


def _duplicates(
    settings: Sequence[Setting], images: dict[int, torch.Tensor], dropped: dict[int, Skipped]
) -> dict[int, Skipped]:
    """Settings (never a default) whose warm-up images equal those of an earlier setting of their family or of the
    baseline: the same computation on this model (e.g. options that have no effect here), not timed again."""
    out: dict[int, Skipped] = {}
    kept: list[int] = [0]
    for i in range(1, len(settings)):
        if i in dropped or i not in images:
            continue
        same = next(
            (
                j
                for j in kept
                if (j == 0 or settings[j].family == settings[i].family) and torch.equal(images[i], images[j])
            ),
            None,
        )
        if same is None or settings[i].default:
            kept.append(i)
            continue
        what = "the unaccelerated images: merges nothing here" if same == 0 else f"the images of {settings[same].label}"
        out[i] = Skipped(settings[i].label, f"same as {what}")
        logger.info("skipped %s: %s", settings[i].label, out[i].reason)
    return out


def measured_speedup(point: Point) -> float:
    """The speed axis of a front: the measured speed-up on the swept model."""
    return point.speedup


@dataclass(frozen=True)
class FlopAxis:
    """The speed axis of a projected front: the FLOP ratio on architecture ``label`` (NaN where not counted)."""

    label: str

    def __call__(self, point: Point) -> float:
        return point.flop_ratios.get(self.label, math.nan)


Axis = Callable[[Point], float]


def front(points: Sequence[Point], metric: Metric, axis: Axis = measured_speedup) -> list[int]:
    """Indices of the points on the Pareto front of (``axis``: speed-up, ``metric``), by increasing speed; points
    without a finite-or-infinite score or speed (NaN) take no part."""
    valid = [
        i
        for i, p in enumerate(points)
        if not math.isnan(p.scores.get(metric.name, math.nan)) and not math.isnan(axis(p))
    ]
    pairs = [(axis(points[i]), metric.oriented(points[i].scores[metric.name])) for i in valid]
    return [valid[j] for j in report.pareto_front(pairs)]


@dataclass(frozen=True)
class DefaultCheck:
    """A family's default setting against every setting at least as fast: ``best_faster`` is the one with the largest
    ``advantage`` (oriented metric units) over the default; ``dominated`` when that exceeds the margin."""

    default: str
    speedup: float
    score: float
    best_faster: str | None
    advantage: float
    dominated: bool


@dataclass(frozen=True)
class SpeedGap:
    """At speed-up ``>= min_speedup``: the family's best setting and the best of all, and ``gap`` = how much better
    (oriented metric units) the best of all is (``inf`` when the family has no setting that fast)."""

    min_speedup: float
    family_best: str | None
    family_score: float
    overall_best: str
    overall_score: float
    gap: float


@dataclass(frozen=True)
class TargetReport:
    """The two checks of one family on one metric: the default (``None`` if the family has no default point) and
    the gaps at the bucket edges; ``worst``: the largest gap at any measured speed >= ``min_speedup``."""

    family: str
    metric: str
    margin: float
    min_speedup: float
    default: DefaultCheck | None
    gaps: list[SpeedGap]
    worst: SpeedGap | None

    @property
    def default_ok(self) -> bool:
        return self.default is not None and not self.default.dominated

    @property
    def gaps_ok(self) -> bool:
        return self.worst is None or self.worst.gap <= self.margin

    @property
    def ok(self) -> bool:
        return self.default_ok and self.gaps_ok


def _advantage(a: float, b: float) -> float:
    """``a - b`` for oriented scores, with equal infinities giving 0."""
    return 0.0 if a == b else a - b


def _gap(points: Sequence[Point], metric: Metric, family: str, speed: float, axis: Axis) -> SpeedGap | None:
    fast = [p for p in points if axis(p) >= speed and not math.isnan(p.scores[metric.name])]
    if not fast:
        return None
    best = max(fast, key=lambda p: metric.oriented(p.scores[metric.name]))
    mine = [p for p in fast if p.setting.family == family]
    own = max(mine, key=lambda p: metric.oriented(p.scores[metric.name])) if mine else None
    best_score = metric.oriented(best.scores[metric.name])
    own_score = metric.oriented(own.scores[metric.name]) if own else -math.inf
    gap = _advantage(best_score, own_score) if own else math.inf
    return SpeedGap(
        speed,
        own.label if own else None,
        own.scores[metric.name] if own else math.nan,
        best.label,
        best.scores[metric.name],
        gap,
    )


def check_targets(
    points: Sequence[Point],
    metric: Metric,
    family: str,
    margin: float = 1.0,
    min_speedup: float = 1.2,
    bucket: float = 0.1,
    axis: Axis = measured_speedup,
) -> TargetReport:
    """The default and speed-gap checks of ``family`` on ``metric`` (see the module docstring), speeds on ``axis``
    (the measured speed-up, or a projected front's FLOP ratio)."""
    name = metric.name
    points = [p for p in points if not math.isnan(axis(p))]
    default_point = next((p for p in points if p.setting.family == family and p.setting.default), None)
    check = None
    if default_point is not None:
        own = metric.oriented(default_point.scores[name])
        rivals = [
            p
            for p in points
            if p is not default_point and axis(p) >= axis(default_point) and not math.isnan(p.scores[name])
        ]
        rival = max(rivals, key=lambda p: metric.oriented(p.scores[name]), default=None)
        advantage = _advantage(metric.oriented(rival.scores[name]), own) if rival else 0.0
        check = DefaultCheck(
            default_point.label,
            axis(default_point),
            default_point.scores[name],
            rival.label if rival else None,
            advantage,
            advantage > margin,
        )
    top = max((axis(p) for p in points), default=0.0)
    edges = [min_speedup + k * bucket for k in range(max(0, math.floor((top - min_speedup) / bucket + 1e-9)) + 1)]
    gaps = [g for g in (_gap(points, metric, family, round(s, 6), axis) for s in edges if s <= top) if g is not None]
    speeds = sorted({min_speedup, *(axis(p) for p in points if axis(p) >= min_speedup)})
    every = [g for g in (_gap(points, metric, family, s, axis) for s in speeds) if g is not None]
    worst = max(every, key=lambda g: g.gap, default=None)
    return TargetReport(family, name, margin, min_speedup, check, gaps, worst)
