"""Does ``tm.tune`` find (nearly) the best setting for a speed target, much faster than an exhaustive sweep?

For a model, the exhaustive sweep is ``tokenmerge pareto``'s full one (every method x preset x knob value of
``SWEEPS``, 1 warm-up + ``--rounds`` interleaved rounds) on the evaluation image set (``--images`` captions of the
reference grammar, seeds 1000 + i). For each target speed-up, ``tm.tune`` then calibrates on *other* images
(as many captions, drawn with another seed, seeds 2000 + i; same steps: the same workload) and its pick is judged on the
evaluation set: its PSNR there against the best PSNR among the exhaustive sweep's settings at least that fast
(target: within ``--margin`` dB), its speed-up re-timed there against the baseline (``check_speedup``), and the
tuning's wall time against the exhaustive sweep's (target: at most ``--max-time-ratio`` of it).

    python benchmarks/tune.py --model reference-unet --out docs/results/tune_unet.json
    python benchmarks/tune.py --model reference-flux --out docs/results/tune_flux.json
    python benchmarks/tune.py --model reference-unet --steps 6 --images 4 --out /tmp/t.json  # smaller
    python benchmarks/tune.py --model reference-unet --images 4 --steps 10 \
        --exhaustive docs/results/pareto_unet --out docs/results/tune_unet.json  # reuse a pareto run

``--exhaustive DIR`` takes the exhaustive sweep from a ``tokenmerge pareto`` output on the same model, images and
steps (its settings, speed-ups, PSNR and ``sweep_s``, the wall time of its sweep) instead of running it again.

Prints a table and writes JSON (meta, the exhaustive sweep's rows, one row per target with the pick's trials).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import print_table, write_results

import tokenmerge as tm
from tokenmerge.api import view_of
from tokenmerge.harness import tune
from tokenmerge.harness.pareto import run_sweep, standard_metrics
from tokenmerge.harness.runners import ImageSet, open_runner, reference_captions
from tokenmerge.harness.sweep import MethodSetting, build_settings
from tokenmerge.harness.timing import Schedule


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="reference-unet", choices=["reference-unet", "reference-flux"])
    p.add_argument("--targets", type=float, nargs="+", default=[1.3, 1.6])
    p.add_argument("--images", type=int, default=8, help="evaluation images = the exhaustive sweep's (default 8)")
    p.add_argument(
        "--tune-images",
        type=int,
        help="calibration images of tm.tune (default: as many as --images: the reference pipelines generate them in "
        "one batched call, and a smaller batch is a different workload with smaller speed-ups)",
    )
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of the exhaustive sweep and the check")
    p.add_argument("--margin", type=float, default=0.5, help="target: PSNR within this many dB of the best")
    p.add_argument("--max-time-ratio", type=float, default=0.2, help="target: tuning time / exhaustive time")
    p.add_argument("--exhaustive", type=Path, help="a tokenmerge pareto output folder to use as the exhaustive sweep")
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args()


def psnr_on(runner: Any, base: torch.Tensor, method: tm.Method) -> float:
    """The PSNR of ``method``'s images on ``runner``'s set against the unaccelerated ``base``."""
    metric = standard_metrics()[0]
    with tm.applied(runner.target, method):
        images = runner.generate()
    return metric.score(images, base, list(runner.images.prompts))


def best_at(rows: list[dict[str, Any]], speed: float) -> dict[str, Any] | None:
    """The exhaustive sweep's row with the highest PSNR among the settings at least ``speed`` fast."""
    fast = [r for r in rows if r["family"] != "baseline" and r["speedup"] >= speed]
    return max(fast, key=lambda r: r["psnr"], default=None)


def run_exhaustive(evaluation: Any, rounds: int) -> tuple[list[dict[str, Any]], float]:
    """Pareto's full sweep on the evaluation set: its rows and its wall time."""
    start = time.perf_counter()
    plan = build_settings(view_of(evaluation.target), None, evaluation.method_defaults)
    sweep = run_sweep(evaluation, plan.settings, standard_metrics(), Schedule(rounds, 1, 0), progress=True)
    return [p.row() for p in sweep.points], time.perf_counter() - start


def load_exhaustive(folder: Path, evaluation: Any, model: str) -> tuple[list[dict[str, Any]], float]:
    """The rows and sweep time of a ``tokenmerge pareto`` output, checked to be of this model and image set."""
    data = json.loads((folder / "results.json").read_text())
    meta, images = data["meta"], evaluation.images
    wanted = dict(model=model, prompts=list(images.prompts), seeds=list(images.seeds), steps=images.steps)
    for key, value in wanted.items():
        if meta.get(key) != value:
            raise SystemExit(f"{folder}: {key} is {meta.get(key)!r}, the evaluation set has {value!r}")
    if "sweep_s" not in meta:
        raise SystemExit(f"{folder}: no sweep_s in its meta (written by an older tokenmerge pareto)")
    return data["settings"], float(meta["sweep_s"])


def main() -> int:
    args = parse_args()
    args.tune_images = args.tune_images or args.images
    device = torch.device("cpu")
    evaluation = open_runner(args.model, None, None, args.images, device, steps=args.steps)
    if args.exhaustive:
        exhaustive, exhaustive_s = load_exhaustive(args.exhaustive, evaluation, args.model)
    else:
        exhaustive, exhaustive_s = run_exhaustive(evaluation, args.rounds)
    print(f"exhaustive sweep: {len(exhaustive)} settings in {exhaustive_s:.0f} s")
    base = evaluation.generate()
    captions = tuple(reference_captions(args.tune_images, seed=1))
    seeds = tuple(2000 + i for i in range(args.tune_images))
    calibration = dataclasses.replace(evaluation, images=ImageSet(captions, seeds, steps=args.steps))
    rows = []
    for target in args.targets:
        goal = tune.Goal(target, None, standard_metrics()[0])
        start = time.perf_counter()
        result = tune.tune_runner(calibration, goal, progress=True)
        tune_s = time.perf_counter() - start
        best = best_at(exhaustive, target)
        row: dict[str, Any] = dict(config=f"{args.model} {target:g}x", target=target, pick=result.label)
        row.update(reached=result.reached, tune_speedup=result.speedup, tune_s=round(tune_s, 1))
        row.update(exhaustive_s=round(exhaustive_s, 1), time_ratio=round(tune_s / exhaustive_s, 3))
        row.update(best=best["config"] if best else None, best_speedup=best["speedup"] if best else None)
        row.update(best_psnr=best["psnr"] if best else None, settings_tried=len({t.label for t in result.trials}))
        if result.reached:
            row["pick_psnr"] = psnr_on(evaluation, base, result.method)
            check = run_sweep(
                evaluation,
                [MethodSetting(result.method, "pick", knob=None)],
                standard_metrics()[:1],
                Schedule(args.rounds, 1, 1),
            )
            row["check_speedup"] = check.points[1].speedup
            row["gap_db"] = row["best_psnr"] - row["pick_psnr"] if best else None
        met_gap = row.get("gap_db") is not None and row["gap_db"] <= args.margin
        row["met"] = bool(met_gap and row["time_ratio"] <= args.max_time_ratio)
        row["reason"] = result.reason
        row["trials"] = [dict(phase=t.phase, label=t.label, speedup=t.speedup, **t.scores) for t in result.trials]
        rows.append(row)
    columns = ["tune_speedup", "check_speedup", "pick_psnr", "best_speedup", "best_psnr", "gap_db", "time_ratio"]
    print_table(rows, columns)
    for row in rows:
        print(f"{row['config']}: pick {row['pick']}, best {row['best']}, met: {row['met']}")
    exhaustive = [
        {k: v if not isinstance(v, float) or math.isfinite(v) else str(v) for k, v in r.items()} for r in exhaustive
    ]
    meta = dict(model=args.model, args={k: str(v) for k, v in vars(args).items()}, exhaustive_s=exhaustive_s)
    meta.update(eval_prompts=list(evaluation.images.prompts), tune_prompts=list(captions), tune_seeds=list(seeds))
    write_results(args.out, rows, dict(exhaustive=exhaustive), **meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
