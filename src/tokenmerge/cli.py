"""The ``tokenmerge`` command line: ``demo``, ``bench``, ``eval``, ``pareto``, ``tune``, ``analyze`` and
``list``.

    tokenmerge demo --out results/demo   # every method on the packaged reference models: grid, speed, fidelity
    tokenmerge bench --arch sd15 --method toma:ratio=0.5 --method tomesd:ratio=0.5 --out results/bench
    tokenmerge eval --model path/to/pipeline --method toma:ratio=0.5 --prompts general --dino path/to/dinov2 \\
        --out results/eval
    tokenmerge eval ... --lpips-backbone alexnet.pth [--lpips-linear lpips_v0.1_alex.pth]   # + LPIPS
    accelerate launch --num_processes 8 -m tokenmerge.cli eval ...   # data parallel over prompts and seeds
    tokenmerge pareto --model reference-unet --quick --out results/pareto   # speed-fidelity front of every method
    tokenmerge tune --model path/to/pipeline --speedup 1.3 --cache tuned/   # the most faithful setting at 1.3x
    tokenmerge analyze --model path/to/pipeline --seeds 0 1 --steps 20 --tolerance 0.2 --out results/analysis

Bad input prints one line, ``tokenmerge: error: ...``, on stderr and exits with status 2: arguments, method options,
models that cannot be loaded, image sizes a pipeline cannot take, output folders that cannot be written (checked
before any work), I/O errors, GPU out-of-memory errors, and a missing ``tokenmerge[harness]`` extra. ``--debug`` (or
``TOKENMERGE_DEBUG=1``) raises them with their traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import platform
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

import torch

from tokenmerge.analysis import command as analyze_command
from tokenmerge.errors import HarnessError, describe
from tokenmerge.harness import pareto_command, tune_command
from tokenmerge.harness.registry import (
    MethodSpec,
    architectures,
    build_architecture,
    methods,
    parse_method,
)
from tokenmerge.reference import demo as demo_command

#: Modules of the ``harness`` extra (pyproject.toml): what every command but ``list`` needs beyond the core.
HARNESS_MODULES = (
    "transformers",
    "accelerate",
    "torchmetrics",
    "matplotlib",
    "psutil",
    "tqdm",
    "numpy",
    "PIL",
    "safetensors",
)
INSTALL_HARNESS = 'pip install "tokenmerge[harness]"'


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        raise HarnessError(f"{self.prog}: {message}")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="SPEC",
        help="NAME[:OPTION=VALUE,...], repeatable, e.g. toma:ratio=0.5 tomesd:ratio=0.5 todo:factor=2 "
        "(the unaccelerated baseline is always included)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--out", type=Path, required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


BENCH_PROMPT = "a lighthouse on a rocky coast at dawn"
#: bench options that only a pipeline takes, and those that only a bare denoiser takes.
PIPELINE_ONLY, DENOISER_ONLY = ("steps", "height", "width", "prompt"), ("latent", "batch")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tokenmerge", description="Benchmark and evaluate token merging on diffusers pipelines.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    bench = sub.add_parser("bench", help="latency, peak memory and FLOP ratio")
    source = bench.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="hub id or local folder: a pipeline (model_index.json) or a saved denoiser")
    source.add_argument("--arch", help="built-in architecture with random weights (see `tokenmerge list`)")
    _common(bench)
    bench.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported; default 5)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed calls per configuration first (default 1)")
    bench.add_argument("--batch", type=int, help="denoiser batch (default 2 = classifier-free guidance)")
    bench.add_argument("--latent", type=int, help="denoiser latent height = width (default: the model's size)")
    bench.add_argument("--steps", type=int, help="pipeline: denoising steps per call (default 20)")
    bench.add_argument("--height", type=int, help="pipeline: image height")
    bench.add_argument("--width", type=int, help="pipeline: image width")
    bench.add_argument("--prompt", help=f"pipeline: prompt (default {BENCH_PROMPT!r})")
    bench.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory call")

    ev = sub.add_parser("eval", help="images with and without acceleration, metrics, grids, Pareto plot, report")
    ev.add_argument("--model", required=True, help="hub id or local pipeline folder, or a tiny-* built-in pipeline")
    _common(ev)
    ev.add_argument("--prompts", default="general", help="built-in set (general, imagenet) or a prompt file")
    ev.add_argument("--num-prompts", type=int, help="use the first N prompts")
    ev.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per prompt (default 0)")
    ev.add_argument("--steps", type=int, default=20)
    ev.add_argument("--height", type=int)
    ev.add_argument("--width", type=int)
    ev.add_argument("--guidance-scale", type=float)
    ev.add_argument("--dino", help="DINOv2 model (local folder or hub id): DINO delta and FD-DINOv2")
    ev.add_argument("--clip", help="CLIP model (local folder or hub id): CLIP-T")
    ev.add_argument(
        "--lpips-backbone",
        metavar="PATH",
        help="torchvision AlexNet state dict (.pth, features.* keys): LPIPS (AlexNet, v0.1) vs the baseline",
    )
    ev.add_argument(
        "--lpips-linear",
        metavar="PATH",
        help="LPIPS v0.1 linear weights (alex.pth, lin0.model.1.weight ...); default: the lpips package's copy",
    )
    ev.add_argument("--grid-images", type=int, default=8, help="images per configuration in grid.png")
    ev.add_argument(
        "--warmup", type=int, default=1, help="untimed calls per configuration before the timed ones (default 1)"
    )

    sub.add_parser("list", help="methods and their options, architectures, prompt sets")
    analyze_command.add_parser(sub)
    demo_command.add_parser(sub)
    pareto_command.add_parser(sub)
    tune_command.add_parser(sub)
    debug = "raise errors with their traceback instead of one line (also: environment TOKENMERGE_DEBUG=1)"
    parser.add_argument("--debug", action="store_true", help=debug)
    for command in sub.choices.values():  # also after the subcommand; SUPPRESS keeps a --debug given before it
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
    return parser


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise HarnessError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _specs(args: argparse.Namespace) -> list[MethodSpec]:
    if not args.method:
        raise HarnessError("give at least one --method, e.g. --method toma:ratio=0.5")
    return [parse_method(s) for s in args.method]


def _meta(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    import tokenmerge

    return dict(
        tokenmerge=tokenmerge.__version__,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.processor() or platform.machine(),
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        dtype=args.dtype,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    )


BENCH_COLUMNS = [
    "config",
    "median_ms",
    "min_ms",
    "speedup",
    "gflops",
    "flop_ratio",
    "peak_mem_mib",
    "mem_kind",
    "rel_l2_deviation",
]


def cmd_bench(args: argparse.Namespace) -> int:
    from tokenmerge.harness import bench, models, report

    _positive(args, "rounds", "batch", "latent", "steps", "height", "width")
    if args.warmup < 0:
        raise HarnessError(f"--warmup must be >= 0, got {args.warmup}")
    specs = _specs(args)
    report.check_output(args.out, args.overwrite)
    device, dtype = models.resolve_device(args.device), models.DTYPES[args.dtype]
    name = args.arch or args.model
    denoiser = bool(args.arch or models.saved_denoiser_class(args.model))
    wrong = next((o for o in (PIPELINE_ONLY if denoiser else DENOISER_ONLY) if getattr(args, o) is not None), None)
    if wrong is not None:
        kind, takes = ("a bare denoiser", DENOISER_ONLY) if denoiser else ("a pipeline", PIPELINE_ONLY)
        raise HarnessError(f"--{wrong} does not apply to {kind}, which takes {', '.join('--' + o for o in takes)}")
    if denoiser:
        model = build_architecture(args.arch, dtype) if args.arch else models.load_denoiser(args.model, dtype)
        size = args.latent or getattr(model.config, "sample_size", None) or 16
        size = size[0] if isinstance(size, list | tuple) else size
        batch = args.batch or 2
        inputs = models.denoiser_inputs(model, batch, size, size)
        target = bench.denoiser_target(name, model, inputs, device)
        target.info = dict(batch=batch, latent=size)
    else:
        pipe = models.load_pipeline(args.model, dtype)
        models.check_image_size(pipe, args.height, args.width)
        prompt, steps = args.prompt or BENCH_PROMPT, args.steps or 20
        target = bench.pipeline_target(name, pipe, prompt, steps, args.height, args.width, device)
    rows = bench.run_bench(
        target,
        specs,
        rounds=args.rounds,
        warmup=args.warmup,
        flops=not args.no_flops,
        memory=not args.no_memory,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    meta = _meta(args, target=name, kind=target.kind, device=str(device), rounds=args.rounds, **target.info)
    with report.atomic_dir(args.out, args.overwrite) as tmp:
        report.write_json(tmp / "results.json", dict(meta=meta, results=rows))
        report.write_csv(tmp / "results.csv", rows, BENCH_COLUMNS)
        head = f"# tokenmerge bench: {name} ({target.kind}, {device}, {args.dtype}, median of {args.rounds})\n\n"
        (tmp / "results.md").write_text(head + report.markdown_table(rows, BENCH_COLUMNS))
    print(report.markdown_table(rows, BENCH_COLUMNS), end="")
    print(f"wrote {args.out}/results.{{json,csv,md}}")
    return 0


def _eval_loader(args: argparse.Namespace) -> Any:
    from tokenmerge.harness import models

    dtype = models.DTYPES[args.dtype]
    if args.model in architectures():
        if not args.model.startswith("tiny-"):
            raise HarnessError(f"{args.model!r} is a denoiser architecture; eval needs a pipeline (hub id or folder)")

        def load_tiny(device: torch.device) -> Any:
            from tokenmerge.archs import tiny_pipeline

            pipe = tiny_pipeline(args.model)
            models.check_image_size(pipe, args.height, args.width)
            pipe = pipe.to(device)
            pipe = pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
            pipe.set_progress_bar_config(disable=True)
            return pipe

        return load_tiny
    if models.saved_denoiser_class(args.model):
        raise HarnessError(f"{args.model!r} holds a bare denoiser; eval needs a whole pipeline")
    if models.looks_like_path(args.model) and not Path(args.model).expanduser().exists():
        raise HarnessError(f"model path {args.model!r} does not exist")

    def load(device: torch.device) -> Any:
        pipe = models.load_pipeline(args.model, dtype)
        models.check_image_size(pipe, args.height, args.width)
        return pipe.to(device)

    return load


def cmd_eval(args: argparse.Namespace) -> int:
    from tokenmerge.harness import eval as ev
    from tokenmerge.harness import models, report
    from tokenmerge.harness.prompts import load_prompts

    _positive(args, "num_prompts", "steps", "height", "width", "grid_images")
    specs = _specs(args)
    report.check_output(args.out, args.overwrite)
    device = models.resolve_device(args.device)
    prompts = load_prompts(args.prompts, args.num_prompts)
    if len(set(args.seeds)) != len(args.seeds):
        raise HarnessError("--seeds must be distinct")
    if args.warmup < 0:
        raise HarnessError(f"--warmup must be >= 0, got {args.warmup}")
    if args.lpips_linear and not args.lpips_backbone:
        raise HarnessError("--lpips-linear needs --lpips-backbone")
    cfg = ev.EvalConfig(
        prompts=prompts,
        seeds=list(args.seeds),
        steps=args.steps,
        height=args.height,
        width=args.width,
        guidance_scale=args.guidance_scale,
        dino=args.dino,
        clip=args.clip,
        lpips_backbone=args.lpips_backbone,
        lpips_linear=args.lpips_linear,
        grid_items=args.grid_images,
        warmup=args.warmup,
    )
    meta = _meta(args, model=args.model, prompt_set=args.prompts, methods=[s.label for s in specs])
    if args.lpips_backbone:
        from tokenmerge.harness.lpips import packaged_linear

        linear = args.lpips_linear or packaged_linear()
        meta.update(lpips_backbone=args.lpips_backbone, lpips_linear=str(linear) if linear else None)
    rows = ev.run_eval(
        _eval_loader(args),
        specs,
        cfg,
        args.out,
        args.overwrite,
        device="cpu" if device.type == "cpu" else None,
        meta=meta,
        progress=not args.quiet,
    )
    if rows is not None:
        print(report.markdown_table(rows, [c for c in ev.COLUMNS if any(r.get(c) is not None for r in rows)]), end="")
        print(f"wrote {args.out}/report.md")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from tokenmerge.harness.prompts import BUILTIN

    print("methods (--method NAME:OPTION=VALUE,...):")
    for name, cls in methods().items():
        opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls) if f.init and f.name != "blocks")
        print(f"  {name}: {opts}")
    print("architectures (--arch; tiny-* also as eval --model):")
    for name, family in architectures().items():
        print(f"  {name} ({family})")
    print(f"prompt sets (--prompts): {', '.join(BUILTIN)}, or a file with one prompt per line")
    return 0


def missing_harness() -> list[str]:
    """The modules of :data:`HARNESS_MODULES` that cannot be found (located without importing them)."""
    missing = []
    for name in HARNESS_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def _harness_error(names: list[str]) -> HarnessError:
    return HarnessError(f"the command line needs the harness extra ({', '.join(names)} missing): {INSTALL_HARNESS}")


@contextlib.contextmanager
def quiet_loading(on: bool) -> Iterator[None]:
    """With ``on`` (``--quiet``), no progress bars from diffusers, transformers or the hub while the command runs
    (loading a pipeline shows them, downloads too); as they were afterwards."""
    if not on:
        yield
        return
    import huggingface_hub.utils as hub
    from diffusers.utils import logging as diffusers_logging

    bars = [
        (
            diffusers_logging.is_progress_bar_enabled,
            diffusers_logging.disable_progress_bar,
            diffusers_logging.enable_progress_bar,
        )
    ]
    bars.append((lambda: not hub.are_progress_bars_disabled(), hub.disable_progress_bars, hub.enable_progress_bars))
    if importlib.util.find_spec("transformers") is not None:
        from transformers.utils import logging as transformers_logging

        t = transformers_logging
        bars.append((t.is_progress_bar_enabled, t.disable_progress_bar, t.enable_progress_bar))
    enabled = [on_now() for on_now, _, _ in bars]
    for _, disable, _ in bars:
        disable()
    try:
        yield
    finally:
        for was, (_, _, enable) in zip(enabled, bars, strict=True):
            if was:
                enable()


def _fail(message: str) -> int:
    print(f"tokenmerge: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tokenmerge`` script; returns the exit status. Errors of bad input (:class:`HarnessError`,
    a missing harness module, ``OSError``, a GPU out of memory) print one line and return 2; with ``--debug``, they
    are raised."""
    debug = os.environ.get("TOKENMERGE_DEBUG", "") not in ("", "0")
    try:
        args = build_parser().parse_args(argv)
        debug = debug or args.debug
        if args.command != "list" and (missing := missing_harness()):  # list reads only the core's registry
            raise _harness_error(missing)
        commands = {"bench": cmd_bench, "eval": cmd_eval, "list": cmd_list, "analyze": analyze_command.run}
        commands["demo"] = demo_command.run
        commands["pareto"] = pareto_command.run
        commands["tune"] = tune_command.run
        with quiet_loading(getattr(args, "quiet", False)):
            return commands[args.command](args)
    except HarnessError as exc:
        if debug:
            raise
        return _fail(str(exc))
    except ModuleNotFoundError as exc:
        if debug or (exc.name or "").partition(".")[0] not in HARNESS_MODULES:
            raise
        return _fail(str(_harness_error([(exc.name or "").partition(".")[0]])))
    except OSError as exc:
        if debug:
            raise
        return _fail(f"{describe(exc)} (--debug shows where)")
    except torch.cuda.OutOfMemoryError as exc:
        if debug:
            raise
        return _fail(f"{describe(exc)} (try a smaller batch, image size or --dtype; --debug shows where)")
    except KeyboardInterrupt:
        print("tokenmerge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
