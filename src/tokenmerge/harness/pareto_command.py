"""``tokenmerge pareto``: sweep every method's main knob over its placement presets on one model, and mark the
speed-fidelity front.

    tokenmerge pareto --model reference-unet --out results/pareto-unet            # full sweep (see docs/benchmarks.md)
    tokenmerge pareto --model reference-flux --quick --methods toma,todo --out results/pareto-flux
    tokenmerge pareto --model path/to/pipeline --preset toma=default,attn --values toma=0.3,0.6 --out results/p

Writes ``results.json`` (meta, every setting with its times and scores, the front, skipped settings and the
targets), ``results.csv``, ``results.md`` and ``pareto.png`` into ``--out`` atomically. The measuring is
:func:`tokenmerge.harness.pareto.run_sweep`, the settings :func:`tokenmerge.harness.sweep.build_settings`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from tokenmerge.cost import CostSpec
from tokenmerge.errors import HarnessError
from tokenmerge.harness import report
from tokenmerge.harness.pareto import Axis, Metric, Point, SweepResult, TargetReport
from tokenmerge.harness.sweep import SWEEPS, Selection, Skipped

COLUMNS = ["config", "family", "preset", "value", "default", "front", "speedup", "median_s"]
#: The name of the measured speed axis (projected fronts are named by their architecture).
MEASURED = "measured"
METRICS = ("psnr", "ssim", "rel_l2", "lpips", "dino_delta", "caption_acc", "scene_fd")
#: Metrics measured on the reference models only (:func:`tokenmerge.harness.pareto.scene_metrics`).
SCENE_METRICS = ("caption_acc", "scene_fd")
#: (full, --quick) defaults of the image set and schedule: reference models / diffusers pipelines.
NUM_PROMPTS = {"reference": (8, 4), "pipeline": (4, 2)}
STEPS = {"reference": (15, 10), "pipeline": (20, 10)}
ROUNDS = (3, 2)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``pareto`` to the ``tokenmerge`` subcommands."""
    p = sub.add_parser("pareto", help="speed-fidelity sweep of every method's main knob; the Pareto front, targets")
    p.add_argument(
        "--model",
        required=True,
        help="reference-unet / reference-flux (packaged trained models), a tiny-* built-in pipeline, a local "
        "pipeline folder or a hub id",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--methods", help=f"comma-separated methods to sweep (default: {','.join(SWEEPS)}; none: only --caches/--stack)"
    )
    p.add_argument(
        "--caches",
        help="comma-separated step caches, each swept alone over its values: fbc,taylorseer (Flux), deepcache (UNet)",
    )
    p.add_argument(
        "--stack",
        action="append",
        default=[],
        metavar="CACHE[=V,..]+METHOD[@PRESET][=V,..]",
        help="a step cache stacked with a method (at one of its --preset names; default: default), every value "
        "pair (default: their quick values), e.g. fbc=0.1+toma=0.5,0.75 or deepcache=2+toma@kv=0.75; repeatable",
    )
    p.add_argument("--quick", action="store_true", help="a handful of settings per method, fewer images and rounds")
    p.add_argument(
        "--preset",
        action="append",
        default=[],
        metavar="METHOD=NAME[,NAME...]",
        help="presets of a method to sweep (repeatable; the default preset is always included)",
    )
    p.add_argument(
        "--values",
        action="append",
        default=[],
        metavar="METHOD=V[,V...]",
        help="knob values of a method (repeatable; its default value is always included)",
    )
    p.add_argument(
        "--cost",
        action="append",
        default=[],
        metavar="ARCH@RES",
        help="also put every setting at its exact FLOP ratio on this real-size architecture (e.g. sdxl@1024, "
        "sd15@512, flux-dev@1024): a projected front with the fidelity measured here; settings' auto options take "
        "their values on the first one (repeatable)",
    )
    p.add_argument("--metric", default="psnr", choices=METRICS, help="fidelity metric of the front (default psnr)")
    p.add_argument("--margin", type=float, default=1.0, help="targets: tolerance in the metric's units (default 1)")
    p.add_argument("--min-speedup", type=float, default=1.2, help="targets: speeds checked from here up (1.2)")
    p.add_argument("--bucket", type=float, default=0.1, help="targets: speed-up step of the reported gaps (0.1)")
    p.add_argument("--rounds", type=int, help="timed rounds, median reported (default 3; --quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per setting first (default 1, >= 1)")
    p.add_argument("--shuffle-seed", type=int, default=0, help="seed of the per-round order of settings")
    p.add_argument(
        "--prompts",
        help="built-in set (general, imagenet) or a prompt file (default: general; reference models: captions drawn "
        "from their scene grammar)",
    )
    p.add_argument("--num-prompts", type=int, help="first N prompts (default: reference 8, pipelines 4; --quick half)")
    p.add_argument(
        "--seeds", type=int, nargs="+", help="seeds for every prompt (default: one seed per prompt, 1000 + index)"
    )
    p.add_argument("--steps", type=int, help="denoising steps (default: reference 15, pipelines 20; --quick 10)")
    p.add_argument("--guidance-scale", type=float, help="default: the pipeline's (reference models: 3)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--lpips-backbone", metavar="PATH", help="torchvision AlexNet state dict: LPIPS (AlexNet, v0.1)")
    p.add_argument("--lpips-linear", metavar="PATH", help="LPIPS v0.1 linear weights (default: the lpips package's)")
    p.add_argument("--dino", help="DINOv2 model (local folder or hub id): DINO delta")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--dry-run", action="store_true", help="print the settings and those skipped; run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _number(text: str) -> int | float:
    """An int (``2``) or a float (``0.5``) knob value."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise HarnessError(f"--values: {text!r} is not a number") from None


def _per_method(items: Sequence[str], flag: str, parse: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for item in items:
        name, eq, rest = item.partition("=")
        values = [v.strip() for v in rest.split(",") if v.strip()]
        if not eq or not name.strip() or not values:
            raise HarnessError(f"{flag} {item!r}: expected METHOD=A[,B...]")
        out.setdefault(name.strip().lower(), []).extend(parse(v) for v in values)
    return out


def selection(args: argparse.Namespace) -> Selection:
    """The :class:`Selection` of ``--methods``, ``--preset``, ``--values`` and ``--quick`` (checked)."""
    chosen = None
    if args.methods is not None:
        chosen = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
        if chosen == ["none"]:  # caches and stacks only
            chosen = []
        elif not chosen:
            raise HarnessError("--methods: give at least one method, e.g. --methods toma,todo")
    presets = _per_method(args.preset, "--preset", str)
    values = _per_method(args.values, "--values", _number)
    sel = Selection(chosen, presets, values, args.quick)
    sel.check()
    return sel


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return "-" if value is None else str(value)


@dataclass(frozen=True)
class Front:
    """One speed axis of the sweep: its ``name`` (``measured``, or the architecture of a projected front), the axis,
    the indices of the points on its front and the targets checked on it."""

    name: str
    axis: Axis
    on_front: list[int]
    reports: list[TargetReport]

    @property
    def column(self) -> str:
        return "front" if self.name == MEASURED else f"front@{self.name}"

    @property
    def xlabel(self) -> str:
        if self.name == MEASURED:
            return "speed-up vs unaccelerated (x)"
        return f"FLOP ratio vs unaccelerated on {self.name} (x)"


def rows(result: SweepResult, fronts: Sequence[Front]) -> list[dict[str, Any]]:
    """One flat row per point (``front``, ``front@ARCH``: on the Pareto front of the chosen metric on that axis)."""
    out = []
    for i, point in enumerate(result.points):
        row = point.row()
        for f in fronts:
            row[f.column] = i in set(f.on_front)
        out.append(row)
    return out


def plot(path: Path, points: Sequence[Point], metric: Metric, front_: Front, title: str) -> None:
    """Speed (x: ``front_``'s axis) vs ``metric`` (y, better up), a colour per method family, the front joined by a
    line, defaults drawn as stars with their labels. Points with an infinite score (the baseline, settings that merged
    nothing) cannot be placed on the axis: a dotted line marks the baseline's speed 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    x = front_.axis
    colours = {f: plt.get_cmap("tab10")(i % 10) for i, f in enumerate(dict.fromkeys(p.setting.family for p in points))}
    finite = [p for p in points if math.isfinite(p.scores.get(metric.name, math.nan) + x(p))]
    hidden = len(points) - len(finite)
    for family, colour in colours.items():
        mine = [p for p in finite if p.setting.family == family]
        if mine:
            ax.scatter([x(p) for p in mine], [p.scores[metric.name] for p in mine], color=colour, s=22, label=family)
    for p in finite:
        if p.setting.default:
            ax.scatter(x(p), p.scores[metric.name], marker="*", s=180, color=colours[p.setting.family], zorder=3)
            ax.annotate(p.label, (x(p), p.scores[metric.name]), xytext=(5, 5), textcoords="offset points", fontsize=7)
    shown = [points[i] for i in front_.on_front if math.isfinite(points[i].scores[metric.name])]
    if shown:
        xs, ys = [x(p) for p in shown], [p.scores[metric.name] for p in shown]
        ax.plot(xs, ys, color="black", lw=1, alpha=0.6, drawstyle="steps-pre" if len(xs) > 1 else "default")
        ax.scatter(xs, ys, facecolors="none", edgecolors="black", s=70, lw=0.8, label="Pareto front")
    ax.axvline(
        1.0,
        color="grey",
        ls=":",
        lw=1,
        label="unaccelerated" + (f" ({hidden} not shown: inf or no ratio)" if hidden else ""),
    )
    if not metric.higher_is_better:
        ax.invert_yaxis()
    ax.set_xlabel(front_.xlabel)
    ax.set_ylabel(f"{metric.name} vs unaccelerated" + (f" ({metric.unit})" if metric.unit else ""))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def targets_markdown(front_: Front, unit: str) -> str:
    """The targets section of ``results.md`` for one axis."""
    reports = front_.reports
    if not reports:
        return ""
    r0 = reports[0]
    u = f" {unit}" if unit else ""
    axis = "measured speed-ups" if front_.name == MEASURED else f"FLOP ratios on {front_.name}"
    lines = [
        f"## Targets on {axis} ({r0.metric}, margin {r0.margin:g}{u}, speeds from {r0.min_speedup:g}x)",
        "",
        "Default: is some setting at least as fast and more than the margin better than the method's default? "
        "Gap: at each speed-up s, the best setting of any method at least s fast minus the method's best at least s "
        "fast (worst: over every measured speed from the minimum up).",
        "",
        "| method | default | speed-up | score | best at least as fast | advantage | default ok | worst gap | at >= "
        "| gaps ok |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in reports:
        d = r.default
        cells = [r.family]
        cells += [d.default, _fmt(d.speedup), _fmt(d.score), _fmt(d.best_faster), _fmt(d.advantage)] if d else ["-"] * 5
        cells.append("yes" if r.default_ok else "no")
        cells += [_fmt(r.worst.gap), f"{r.worst.min_speedup:.3g}x"] if r.worst else ["-", "-"]
        cells.append("yes" if r.gaps_ok else "no")
        lines.append("| " + " | ".join(cells) + " |")
    for r in reports:
        if not r.gaps:
            continue
        lines += [
            "",
            f"{r.family}: best at each speed",
            "",
            "| speed >= | best of method | score | best of all | score | gap |",
        ]
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for g in r.gaps:
            lines.append(
                f"| {g.min_speedup:.2f}x | {_fmt(g.family_best)} | {_fmt(g.family_score)} | {g.overall_best} | "
                f"{_fmt(g.overall_score)} | {_fmt(g.gap)} |"
            )
    return "\n".join(lines) + "\n"


def write_outputs(
    out: Path,
    overwrite: bool,
    result: SweepResult,
    metric: Metric,
    fronts: Sequence[Front],
    skipped: Sequence[Skipped],
    meta: dict[str, Any],
) -> list[dict[str, Any]]:
    """results.json / .csv / .md and pareto.png (one ``pareto@ARCH.png`` per projected front), atomically; returns
    the table rows."""
    table = rows(result, fronts)
    names = [m.name for m in result.metrics]
    projected = [f for f in fronts if f.name != MEASURED]
    columns = [*COLUMNS, *(f"flops@{f.name}" for f in projected), *(f.column for f in projected)]
    columns += [*names, "timed_max_diff", "merged_nothing"]
    skipped = [*skipped, *result.dropped]
    title = f"{meta['model']}: {meta['images']} images, {meta['steps']} steps, median of {result.schedule.rounds}"

    def targets(f: Front) -> list[dict[str, Any]]:
        return [dict(dataclasses.asdict(r), ok=r.ok, default_ok=r.default_ok, gaps_ok=r.gaps_ok) for r in f.reports]

    data = dict(
        meta=meta,
        metric=metric.name,
        settings=[dict(r, times_s=p.times_s) for r, p in zip(table, result.points, strict=True)],
        front=[result.points[i].label for i in fronts[0].on_front],
        skipped=[dataclasses.asdict(s) for s in skipped],
        targets=targets(fronts[0]),
        projected={
            f.name: dict(front=[result.points[i].label for i in f.on_front], targets=targets(f)) for f in projected
        },
    )
    md = [
        f"# tokenmerge pareto: {title}",
        "",
        f"{meta['date']}, {meta['machine']}, {meta['device']}, torch {meta['torch']}, {meta['threads']} threads. "
        f"Speed-up = baseline median / setting median over {result.schedule.rounds} interleaved rounds in shuffled "
        f"order after {result.schedule.warmup} untimed warm-up call(s); fidelity of the warm-up images to the "
        f"unaccelerated ones (same prompts and seeds). Front on `{metric.name}`; `default` = the method's default.",
        "",
        report.markdown_table(table, columns),
    ]
    differ = [p.label for p in result.points if p.timed_max_diff > 0]
    md.append(
        f"Timed images differ from the warm-up images for: {', '.join(differ)}.\n"
        if differ
        else "Every timed call gave exactly the warm-up call's images.\n"
    )
    nothing = [p.label for p in result.points if p.merged_nothing]
    if nothing:
        md.append(f"Images identical to the unaccelerated ones (merged nothing): {', '.join(nothing)}.\n")
    if projected:
        md.append(
            "Projected fronts (`flops@ARCH`): each setting made concrete for that real-size architecture, its FLOPs "
            "over the same steps counted exactly on a weightless twin (`tokenmerge.cost`), with the fidelity measured "
            "here; CA-ToMe at the fraction it merged here; step caches not counted.\n"
        )
    md += [targets_markdown(f, metric.unit) for f in fronts]
    if skipped:
        md += ["## Skipped", "", *(f"- {s.label}: {s.reason}" for s in skipped), ""]
    with report.atomic_dir(out, overwrite) as tmp:
        report.write_json(tmp / "results.json", data)
        report.write_csv(tmp / "results.csv", table, columns)
        (tmp / "results.md").write_text("\n".join(md))
        for f in fronts:
            name = "pareto.png" if f.name == MEASURED else f"pareto@{f.name}.png"
            plot(tmp / name, result.points, metric, f, title if f.name == MEASURED else f"{title}; FLOPs on {f.name}")
    return table


def _defaults(args: argparse.Namespace, kind: str) -> tuple[int, int, int]:
    q = int(args.quick)
    num = args.num_prompts or NUM_PROMPTS[kind][q]
    return num, args.steps or STEPS[kind][q], args.rounds or ROUNDS[q]


def run(args: argparse.Namespace) -> int:
    """Check everything, build the settings, sweep, write, print the table."""
    from tokenmerge.api import view_of
    from tokenmerge.harness import metrics, models
    from tokenmerge.harness.pareto import (
        FlopAxis,
        check_targets,
        front,
        measured_speedup,
        run_sweep,
        scene_metrics,
        standard_metrics,
    )
    from tokenmerge.harness.projection import project
    from tokenmerge.harness.prompts import load_prompts
    from tokenmerge.harness.runners import REFERENCE, open_runner
    from tokenmerge.harness.stacks import build_cache_settings
    from tokenmerge.harness.sweep import SweepPlan, build_settings, layout_of
    from tokenmerge.harness.timing import Schedule

    for name in ("rounds", "num_prompts", "steps", "height", "width", "warmup"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise HarnessError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.margin < 0 or args.bucket <= 0:
        raise HarnessError("--margin must be >= 0 and --bucket > 0")
    sel = selection(args)
    if args.metric == "lpips" and not args.lpips_backbone:
        raise HarnessError("--metric lpips needs --lpips-backbone")
    if args.metric == "dino_delta" and not args.dino:
        raise HarnessError("--metric dino_delta needs --dino")
    if args.lpips_linear and not args.lpips_backbone:
        raise HarnessError("--lpips-linear needs --lpips-backbone")
    if args.metric in SCENE_METRICS and args.model not in REFERENCE:
        raise HarnessError(f"--metric {args.metric} needs a reference model ({', '.join(REFERENCE)})")
    try:
        specs = list(dict.fromkeys(CostSpec.parse(text) for text in args.cost))
        for spec in specs:
            spec.shape()
    except ValueError as exc:
        raise HarnessError(f"--cost: {exc}") from None
    if not args.dry_run:
        report.check_output(args.out, args.overwrite)
    kind = "reference" if args.model in REFERENCE else "pipeline"
    num_prompts, steps, rounds = _defaults(args, kind)
    schedule = Schedule(rounds, args.warmup, args.shuffle_seed)
    prompts = load_prompts(args.prompts) if args.prompts else None
    lpips = dino = None
    if args.lpips_backbone:
        from tokenmerge.harness.lpips import LPIPS

        lpips = LPIPS(args.lpips_backbone, args.lpips_linear)
    if args.dino:
        dino = metrics.DinoFeatures(args.dino)
    device = models.resolve_device(args.device)
    options = dict(steps=steps, guidance_scale=args.guidance_scale, height=args.height, width=args.width)
    runner = open_runner(args.model, prompts, args.seeds, num_prompts, device, models.DTYPES[args.dtype], **options)
    projections = [(spec.label, spec.view()) for spec in specs]
    plan = build_settings(view_of(runner.target), sel, runner.method_defaults, projections)
    if args.caches or args.stack:
        caches = [c.strip().lower() for c in (args.caches or "").split(",") if c.strip()]
        layout = layout_of(runner.target)
        extra, skipped = build_cache_settings(
            layout, runner.target, caches, args.stack, args.quick, runner.method_defaults
        )
        plan = SweepPlan([*plan.settings, *extra], [*plan.skipped, *skipped])
    if args.dry_run:
        for setting in plan.settings:
            print(setting.label + (" (default)" if setting.default else ""))
        for skip in plan.skipped:
            print(f"skipped {skip.label}: {skip.reason}")
        return 0
    all_metrics = standard_metrics(lpips, dino) + (scene_metrics() if kind == "reference" else [])
    start = time.perf_counter()
    result = run_sweep(runner, plan.settings, all_metrics, schedule, progress=not args.quiet)
    sweep_s = time.perf_counter() - start
    project(result.points, specs, steps)
    metric = result.metric(args.metric)
    families = list(dict.fromkeys(p.setting.family for p in result.points[1:]))
    fronts = []
    for name, axis in [(MEASURED, measured_speedup), *((s.label, FlopAxis(s.label)) for s in specs)]:
        reports = [
            check_targets(result.points, metric, f, args.margin, args.min_speedup, args.bucket, axis) for f in families
        ]
        fronts.append(Front(name, axis, front(result.points, metric, axis), reports))
    meta = dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.processor() or platform.machine(),
        device=str(runner.device),
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        model=args.model,
        dtype=args.dtype,
        images=len(runner.images.prompts),
        prompts=list(runner.images.prompts),
        seeds=list(runner.images.seeds),
        steps=steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        quick=args.quick,
        schedule=dataclasses.asdict(schedule),
        settings={s.label: repr(getattr(s, "method", None)) for s in plan.settings},
        sweep_s=round(sweep_s, 1),
        cost=[s.label for s in specs],
    )
    table = write_outputs(args.out, args.overwrite, result, metric, fronts, plan.skipped, meta)
    columns = [*COLUMNS, *(f"flops@{s.label}" for s in specs), metric.name]
    print(report.markdown_table(table, columns), end="")
    for f in fronts:
        for r in f.reports:
            verdict = "ok" if r.ok else "MISSED"
            worst = f"{r.worst.gap:.3g} at >= {r.worst.min_speedup:.3g}x" if r.worst else "-"
            print(f"targets {r.family} ({f.name}): {verdict} (default ok: {r.default_ok}; worst gap {worst})")
    print(f"wrote {args.out}/results.{{json,csv,md}}, pareto.png")
    return 0
