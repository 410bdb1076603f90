"""``tokenmerge analyze``: the subcommand's arguments and its run (observe, derive schedules, write the report)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from tokenmerge.errors import HarnessError

#: ``--model`` names of the packaged reference pipelines (``tokenmerge.reference``) -> reference model.
REFERENCE = {"reference-unet": "unet", "reference-flux": "flux"}


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``analyze`` to the ``tokenmerge`` subcommands."""
    p = sub.add_parser("analyze", help="token similarity and merge stability per block and step; derived schedules")
    p.add_argument(
        "--model",
        required=True,
        help="local pipeline folder or hub id, a tiny-* built-in pipeline, or reference-unet / reference-flux "
        "(the packaged trained reference models)",
    )
    p.add_argument(
        "--prompts",
        help="built-in set (general, imagenet) or a prompt file (default general; reference models: the demo's "
        "captions, or a file of captions in their vocabulary)",
    )
    p.add_argument("--num-prompts", type=int, default=4, help="use the first N prompts (default 4)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per prompt (default 0)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--height", type=int, help="default: the pipeline's (reference models: 64, square only)")
    p.add_argument("--width", type=int)
    p.add_argument("--guidance-scale", type=float, help="default: the pipeline's (reference models: 3)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.9], help="similarity thresholds")
    p.add_argument("--pair-threshold", type=float, default=0.7, help="CA-ToMe threshold of the pair sets")
    p.add_argument("--ratio", type=float, default=0.5, help="ToMeSD pairs and ToMA destinations: removed fraction")
    p.add_argument("--tile", type=int, nargs=2, default=[4, 4], metavar=("H", "W"), help="ToMA tile")
    p.add_argument("--tolerance", type=float, default=0.2, help="largest expected drift of reused sets (default 0.2)")
    p.add_argument(
        "--reference-schedule", default="config3", help="CA-ToMe schedule to compare with: a name or N (every N steps)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def load(
    name: str, dtype: torch.dtype, device: torch.device, height: int | None = None, width: int | None = None
) -> Any:
    """A ``tiny-*`` built-in pipeline or a pipeline folder / hub id, on ``device`` in ``dtype``; a
    :class:`HarnessError` when it cannot make ``height x width`` images."""
    from tokenmerge.harness import models
    from tokenmerge.harness.registry import architectures

    if name in architectures():
        if not name.startswith("tiny-"):
            raise HarnessError(f"{name!r} is a denoiser architecture; analyze needs a pipeline (hub id or folder)")
        from tokenmerge.archs import tiny_pipeline

        pipe = tiny_pipeline(name)
        pipe.set_progress_bar_config(disable=True)
    elif models.saved_denoiser_class(name):
        raise HarnessError(f"{name!r} holds a bare denoiser; analyze needs a whole pipeline")
    else:
        pipe = models.load_pipeline(name, dtype)
    models.check_image_size(pipe, height, width)
    pipe = pipe.to(device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def load_reference(name: str, args: argparse.Namespace, device: torch.device) -> tuple[Any, list[str]]:
    """The packaged reference pipeline ``REFERENCE[name]`` on ``device`` at the requested square size, and its
    prompts: the first ``--num-prompts`` demo captions, or ``--prompts`` (a file) checked against its vocabulary."""
    from tokenmerge.harness.prompts import BUILTIN, load_prompts
    from tokenmerge.reference import PROMPTS
    from tokenmerge.reference.data import tokenize
    from tokenmerge.reference.models import IMAGE_SIZE
    from tokenmerge.reference.pipeline import load_pipeline

    if args.dtype != "float32":
        raise HarnessError(f"{name} runs in float32 only, got --dtype {args.dtype}")
    size = args.height or args.width or IMAGE_SIZE
    if (args.height or size) != (args.width or size) or size % 4:
        raise HarnessError(f"{name} generates square images of a multiple of 4 pixels: give equal --height/--width")
    if args.prompts in BUILTIN:
        raise HarnessError(f"{name} knows only its captions, not the {args.prompts!r} set: pass a file or no --prompts")
    prompts = (
        list(PROMPTS[: args.num_prompts]) if args.prompts is None else load_prompts(args.prompts, args.num_prompts)
    )
    try:
        tokenize(prompts)
        pipe = load_pipeline(REFERENCE[name])
    except ValueError as exc:
        raise HarnessError(f"{name}: {exc}") from None
    pipe.size = size
    return pipe.to(device), prompts


def run(args: argparse.Namespace) -> int:
    from tokenmerge.analysis import Observe, analyze, derive, reference_call, write_report
    from tokenmerge.analysis.run import diffusers_call
    from tokenmerge.harness import models, report
    from tokenmerge.harness.prompts import load_prompts
    from tokenmerge.methods.catome import CAToMe

    for name in ("num_prompts", "steps", "height", "width"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise HarnessError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if len(set(args.seeds)) != len(args.seeds):
        raise HarnessError("--seeds must be distinct")
    if not args.tolerance > 0:
        raise HarnessError(f"--tolerance must be positive, got {args.tolerance}")
    schedule = int(args.reference_schedule) if args.reference_schedule.isdigit() else args.reference_schedule
    try:
        CAToMe(schedule=schedule)
        observe = Observe(
            thresholds=tuple(args.thresholds),
            pair_threshold=args.pair_threshold,
            ratio=args.ratio,
            tile=tuple(args.tile),
        )
    except ValueError as exc:
        raise HarnessError(str(exc)) from None
    report.check_output(args.out, args.overwrite)
    device = models.resolve_device(args.device)
    extra = dict(height=args.height, width=args.width, guidance_scale=args.guidance_scale)
    if args.model in REFERENCE:
        pipe, prompts = load_reference(args.model, args, device)
        call, extra = reference_call, dict(guidance_scale=args.guidance_scale)
    else:
        prompts = load_prompts(args.prompts or "general", args.num_prompts)
        pipe = load(args.model, models.DTYPES[args.dtype], device, args.height, args.width)
        call = diffusers_call
    try:
        stats = analyze(
            pipe,
            prompts,
            args.seeds,
            args.steps,
            observe,
            progress=not args.quiet,
            call=call,
            **{k: v for k, v in extra.items() if v is not None},
        )
    except ValueError as exc:
        raise HarnessError(str(exc).splitlines()[0]) from None
    derived = derive(stats, args.tolerance, schedule)
    meta = dict(model=args.model, prompt_set=args.prompts, seeds=args.seeds, steps=args.steps, device=str(device))
    meta.update(dtype=args.dtype, height=args.height, width=args.width, guidance_scale=args.guidance_scale)
    if args.model in REFERENCE:
        meta.update(prompt_set=args.prompts or "demo", height=pipe.size, width=pipe.size, demo=REFERENCE[args.model])
        meta.update(guidance_scale=args.guidance_scale or 3.0)
    with report.atomic_dir(args.out, args.overwrite) as tmp:
        files = write_report(stats, derived, tmp, meta)
    catome, toma = derived["catome"], derived["toma"]
    print(f"CA-ToMe schedule: {catome['schedule']}")
    print(f"ToMA: dest_every={toma['dest_every']}, weight_every={toma['weight_every']}")
    print(f"wrote {args.out}/{{{','.join(files)}}}")
    return 0
