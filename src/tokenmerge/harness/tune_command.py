"""``tokenmerge tune``: the most faithful setting for a speed target on one model (see
:mod:`tokenmerge.harness.tune`).

    tokenmerge tune --model reference-unet --speedup 1.3
    tokenmerge tune --model path/to/pipeline --speedup 1.5 --height 768 --width 768 --cache tuned/ --budget-s 600
    tokenmerge tune --model path/to/pipeline --speedup none --min-fidelity 30   # the fastest at PSNR >= 30 dB

Prints the front found, the pick and why; ``--cache`` stores the result (and reuses a matching one), ``--out`` also
writes it to a JSON file. When no setting meets the goal, the report is printed and the command fails with one line
naming the fastest setting measured.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tokenmerge.errors import HarnessError
from tokenmerge.harness.sweep import SWEEPS


def _speedup(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise HarnessError(f"--speedup: {text!r} is not a number (or none)") from None


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``tune`` to the ``tokenmerge`` subcommands."""
    p = sub.add_parser("tune", help="the most faithful setting that reaches a speed-up, measured on this machine")
    p.add_argument("--model", required=True, help="reference-unet / reference-flux, a tiny-* pipeline, a folder or id")
    p.add_argument("--speedup", default="1.3", help="target speed-up (default 1.3; none: only --min-fidelity)")
    p.add_argument("--min-fidelity", type=float, help="the fastest setting with the metric at least this good")
    p.add_argument("--metric", default="psnr", choices=["psnr", "ssim", "rel_l2"], help="fidelity (default psnr)")
    p.add_argument("--methods", help=f"comma-separated methods to search (default: {','.join(SWEEPS)})")
    p.add_argument("--budget-s", type=float, help="cap on the estimated measuring time in seconds")
    p.add_argument("--cache", type=Path, help="folder (or .json file) of tuned results: reused when the setup matches")
    p.add_argument("--out", type=Path, help="also write the result to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--prompts", help="built-in set or prompt file (default: a few of general / the reference grammar)")
    p.add_argument("--num-prompts", type=int, help="first N prompts (default: reference 4, pipelines 2)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds for every prompt (default: 1000 + index)")
    p.add_argument("--steps", type=int, help="denoising steps (default: reference 15, pipelines 20)")
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    """Check the arguments, open the model, tune, print the report."""
    from tokenmerge.harness import models, report, tune, tune_cache
    from tokenmerge.harness.prompts import load_prompts
    from tokenmerge.harness.runners import REFERENCE, open_runner
    from tokenmerge.harness.sweep import Selection

    for name in ("num_prompts", "steps", "height", "width"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise HarnessError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.budget_s is not None and args.budget_s <= 0:
        raise HarnessError(f"--budget-s must be > 0, got {args.budget_s}")
    if args.out is not None:
        if args.out.suffix != ".json":
            raise HarnessError(f"--out must name a .json file, got {args.out}")
        report.check_output(args.out, args.overwrite)
    if args.cache is not None:
        tune_cache.check_cache(args.cache)
    goal = tune.Goal(_speedup(args.speedup), args.min_fidelity, tune._metric(args.metric))
    selection = None
    if args.methods is not None:
        chosen = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
        if not chosen:
            raise HarnessError("--methods: give at least one method, e.g. --methods toma,todo")
        selection = Selection(chosen)
        selection.check()
    kind = "reference" if args.model in REFERENCE else "pipeline"
    num, steps = tune.DEFAULT_IMAGES[kind]
    prompts = load_prompts(args.prompts) if args.prompts else None
    device = models.resolve_device(args.device)
    options = dict(steps=args.steps or steps, guidance_scale=args.guidance_scale, height=args.height, width=args.width)
    runner = open_runner(
        args.model, prompts, args.seeds, args.num_prompts or num, device, models.DTYPES[args.dtype], **options
    )
    result = tune.tune_runner(runner, goal, selection, args.budget_s, cache=args.cache, progress=not args.quiet)
    if args.out is not None:
        tune_cache.write(args.out, result)
    print(result.report())
    for line in tune_cache.describe_key(result.key):
        print(f"  {line}")
    if result.from_cache:
        print(f"(from the cache: measured {result.elapsed_s:.1f} s when tuned)")
    where = [str(p) for p in (args.out, args.cache) if p is not None]
    if where:
        print(f"wrote {', '.join(where)}" if not result.from_cache else f"cache: {args.cache}")
    if not result.reached:
        raise HarnessError(result.reason)
    return 0
