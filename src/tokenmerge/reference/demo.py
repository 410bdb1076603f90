"""``tokenmerge demo``: the same pictures, sooner, on the packaged reference models.

For each reference model, a fixed set of (caption, seed) pairs is generated unaccelerated and with ToMA, CA-ToMe,
ToMeSD and ToDo at their default settings (plus any ``--method``), in interleaved rounds: round 0 is a warm-up whose
images are scored, rounds 1..R are timed, and the speed ratio is the baseline's median over the method's median in
the same process. Fidelity to the unaccelerated images: PSNR and SSIM (``tokenmerge.harness.metrics``) and the
relative L2 distance ``||x - x_base|| / ||x_base||``, per image, averaged. Writes ``grid.png`` (rows = configurations,
columns = images), ``results.json`` and ``results.md`` into ``--out`` atomically and prints the table.

On the small Flux model, every method merges the blocks ``{"double": (1, None), "single": (1, None)}`` (all but the
first of each kind; tokenmerge's Flux default leaves the first five full, meant for the 19 + 38-block model).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import tokenmerge as tm
from tokenmerge.errors import HarnessError
from tokenmerge.harness import metrics, report
from tokenmerge.harness.registry import BASELINE, MethodSpec, parse_method
from tokenmerge.reference import FLUX_BLOCKS, PROMPTS, models
from tokenmerge.reference.pipeline import ReferencePipeline, load_pipeline, to_pil

COLUMNS = ["model", "config", "median_s", "speedup", "psnr_db", "ssim", "rel_l2"]


@dataclass(frozen=True)
class DemoConfig:
    num_images: int = 6
    steps: int = 15
    rounds: int = 3
    guidance_scale: float = 3.0

    def __post_init__(self) -> None:
        for name in ("num_images", "steps", "rounds"):
            if getattr(self, name) < 1:
                raise HarnessError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    @property
    def prompts(self) -> list[str]:
        return [PROMPTS[i % len(PROMPTS)] for i in range(self.num_images)]

    @property
    def seeds(self) -> list[int]:
        return list(range(self.num_images))


def default_specs(model: str) -> list[MethodSpec]:
    """The baseline and every method at its default setting (on Flux with :data:`FLUX_BLOCKS`)."""
    flux = dict(blocks=FLUX_BLOCKS) if model == "flux" else {}
    methods = {"ToMA": tm.ToMA, "CA-ToMe": tm.CAToMe, "ToMeSD": tm.ToMeSD, "ToDo": tm.ToDo}
    return [BASELINE] + [MethodSpec(label, cls(**flux)) for label, cls in methods.items()]


def for_model(spec: MethodSpec, model: str) -> MethodSpec:
    """``spec`` with :data:`FLUX_BLOCKS` on Flux when it names no ``blocks`` of its own."""
    if model != "flux" or spec.method is None or spec.method.blocks is not None:
        return spec
    return MethodSpec(spec.label, dataclasses.replace(spec.method, blocks=FLUX_BLOCKS))


def generate(pipe: ReferencePipeline, spec: MethodSpec, cfg: DemoConfig) -> tuple[torch.Tensor, float]:
    """Images ``(N, 3, S, S)`` of the demo captions and seeds with ``spec`` applied, and the call's wall time.
    Torch's global generator (ToMeSD's and CA-ToMe's random destinations fork it) is seeded with 0 first, so the
    images do not depend on what ran before."""
    torch.manual_seed(0)
    if spec.method is not None:
        tm.apply(pipe, spec.method)
    try:
        start = time.perf_counter()
        images = pipe(cfg.prompts, cfg.seeds, steps=cfg.steps, guidance_scale=cfg.guidance_scale)
        return images, time.perf_counter() - start
    finally:
        tm.remove(pipe)


def fidelity(images: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB), SSIM and relative L2 distance of ``[0, 1]`` images ``(N, 3, H, W)`` to ``reference``."""
    rel = (images - reference).flatten(1).norm(dim=1) / reference.flatten(1).norm(dim=1)
    return dict(
        psnr_db=float(metrics.psnr(images, reference).mean()),
        ssim=float(metrics.ssim(images, reference).mean()),
        rel_l2=float(rel.mean()),
    )


def run_model(
    model: str, specs: Sequence[MethodSpec], cfg: DemoConfig, bar: Any
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Rows of the table and the scored images (label -> ``(N, 3, S, S)``) for reference model ``model``."""
    try:
        pipe = load_pipeline(model)
    except ValueError as exc:
        raise HarnessError(str(exc)) from None
    images: dict[str, torch.Tensor] = {}
    times: dict[str, list[float]] = {s.label: [] for s in specs}
    for r in range(cfg.rounds + 1):
        for spec in specs:
            bar.set_description(f"{model} {spec.label} {'warm-up' if r == 0 else f'round {r}'}")
            try:
                out, seconds = generate(pipe, spec, cfg)
            except ValueError as exc:
                raise HarnessError(f"{model}, {spec.label}: {exc}") from None
            if r == 0:
                images[spec.label] = out
            else:
                times[spec.label].append(seconds)
            bar.update()
    base = statistics.median(times[BASELINE.label])
    rows = []
    for spec in specs:
        median = statistics.median(times[spec.label])
        row = dict(model=model, config=spec.label, median_s=median, speedup=base / median)
        rows.append(row | fidelity(images[spec.label], images[BASELINE.label]))
    return rows, images


def grid(sections: dict[str, tuple[list[dict[str, Any]], dict[str, torch.Tensor]]], scale: int = 3) -> Image.Image:
    """Rows = (model, configuration), columns = images; a label column gives the speed-up and PSNR."""
    rows, labels = [], []
    for model, (table, images) in sections.items():
        for row in table:
            rows.append(to_pil(images[row["config"]], scale))
            psnr = "" if row["config"] == BASELINE.label else f", {row['psnr_db']:.1f} dB"
            name = "\n".join(textwrap.wrap(f"{model}: {row['config']}", 26))
            labels.append(f"{name}\n{row['speedup']:.2f}x{psnr}")
    body = report.image_grid(rows)
    height = rows[0][0].height
    label_w = 170
    canvas = Image.new("RGB", (label_w + body.width, body.height), "white")
    canvas.paste(body, (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(labels):
        draw.multiline_text((6, i * (height + 2) + height // 2 - 12), text, fill="black", spacing=4)
    return canvas


def run_demo(
    model_names: Sequence[str],
    cfg: DemoConfig,
    out: Path,
    overwrite: bool = False,
    extra: Sequence[str] = (),
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Generate, time and score every configuration on each reference model; write the outputs; return the rows."""
    report.check_output(out, overwrite)
    extra_specs = [parse_method(s) for s in extra]
    specs = {m: default_specs(m) + [for_model(s, m) for s in extra_specs if s.method is not None] for m in model_names}
    total = sum(len(s) for s in specs.values()) * (cfg.rounds + 1)
    sections = {}
    with tqdm(total=total, disable=not progress, unit="call") as bar:
        for model in model_names:
            sections[model] = run_model(model, specs[model], cfg, bar)
    rows = [row for table, _ in sections.values() for row in table]
    meta = dict(
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.processor() or platform.machine(),
        models={m: str(models.weights_path(m).name) for m in model_names},
        methods={m: {s.label: repr(s.method) for s in specs[m]} for m in model_names},
        prompts=cfg.prompts,
        seeds=cfg.seeds,
        **{k: v for k, v in dataclasses.asdict(cfg).items()},
    )
    table = report.markdown_table(rows, COLUMNS)
    with report.atomic_dir(out, overwrite) as tmp:
        grid(sections).save(tmp / "grid.png")
        report.write_json(tmp / "results.json", dict(meta=meta, results=rows))
        head = (
            f"# tokenmerge demo: {cfg.num_images} images, {cfg.steps} steps, guidance {cfg.guidance_scale}, "
            f"median of {cfg.rounds} interleaved rounds ({meta['threads']} threads, {meta['date']})\n\n"
            "speedup = baseline median / configuration median; psnr_db, ssim, rel_l2: fidelity to the baseline "
            "images of the same caption and seed.\n\n"
        )
        (tmp / "results.md").write_text(head + table)
    return rows


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``demo`` subcommand's parser, added to the command line's subparsers ``sub``."""
    p = sub.add_parser("demo", help="every method on the packaged reference models: grid, speed and fidelity")
    p.add_argument("--out", type=Path, default=Path("results/demo"), help="output folder (default results/demo)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--model", choices=["unet", "flux", "both"], default="both", help="reference model(s)")
    p.add_argument("--num-images", type=int, default=DemoConfig.num_images, help="images per configuration")
    p.add_argument("--steps", type=int, default=DemoConfig.steps, help="denoising steps")
    p.add_argument("--rounds", type=int, default=DemoConfig.rounds, help="timed rounds (median)")
    p.add_argument("--guidance-scale", type=float, default=DemoConfig.guidance_scale)
    p.add_argument("--method", action="append", default=[], metavar="SPEC", help="extra configuration, repeatable")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    cfg = DemoConfig(args.num_images, args.steps, args.rounds, args.guidance_scale)
    names = list(models.MODELS) if args.model == "both" else [args.model]
    rows = run_demo(names, cfg, args.out, args.overwrite, args.method, progress=not args.quiet)
    print(report.markdown_table(rows, COLUMNS), end="")
    print(f"wrote {args.out}/grid.png, results.json, results.md")
    return 0
