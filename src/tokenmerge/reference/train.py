"""Deterministic training of the reference models on the procedural scenes (:mod:`tokenmerge.reference.data`).

    python -m tokenmerge.reference.train --model unet --out DIR --steps 2400 --batch 8   # the packaged weights
    python -m tokenmerge.reference.train --model flux --out DIR --steps 900 --batch 24

Fixed seeds and data order: step ``s`` reads batch ``s`` of the dataset, and the noise, timesteps and condition
dropout come from one generator seeded once; with the same thread count a run is bit-reproducible.

- ``unet``: v-prediction on the cosine schedule (``x_t = sqrt(a) x0 + sqrt(1-a) e``, target ``sqrt(a) e -
  sqrt(1-a) x0``), timesteps uniform in ``[0, 1000)``.
- ``flux``: flow matching (``x_t = (1-t) x0 + t e``, target ``e - x0``), ``t`` logit-normal.

Both: pixels in ``[-1, 1]``, MSE, AdamW with linear warm-up and cosine decay to 10%, the caption replaced by the null
prompt with probability 0.1 (classifier-free guidance), and an exponential moving average of the weights, which is
what is saved. Writes ``<model>.safetensors`` (fp16), ``<model>_train.json`` (the loss of every step),
``<model>_loss.png`` and ``<model>_samples.png`` (dataset images above samples for the same captions).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from tokenmerge.reference import models
from tokenmerge.reference.data import make_batch, tokenize
from tokenmerge.reference.pipeline import ReferencePipeline, denoise, load_pipeline, to_pil, unet_scheduler


@dataclass(frozen=True)
class TrainConfig:
    model: str
    steps: int
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 20
    ema: float = 0.995
    cond_drop: float = 0.1
    seed: int = 0
    size: int = models.IMAGE_SIZE
    low_res_steps: int = 0  # progressive training: the first steps on the same scenes at half the size ...
    low_res_batch: int | None = None  # ... with this batch (default: ``batch``)
    bf16: bool = False  # bfloat16 autocast (float32 weights, optimizer and EMA)
    init: str | None = None  # continue from these weights (a reference-model file) instead of a fresh start
    stop: int | None = None  # end after this many steps (the schedules still span ``steps``)
    overrides: dict[str, Any] = field(default_factory=dict)  # denoiser config changes (tests use tiny ones)

    def shape_at(self, step: int) -> tuple[int, int]:
        """Batch and image size of training step ``step``."""
        if step < self.low_res_steps:
            return self.low_res_batch or self.batch, self.size // 2
        return self.batch, self.size


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to 0.1 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))


def diffusion_loss(
    name: str,
    denoiser: nn.Module,
    text_encoder: nn.Module,
    images: torch.Tensor,
    prompts: list[str],
    g: torch.Generator,
    cond_drop: float = 0.0,
    bf16: bool = False,
) -> torch.Tensor:
    """Mean squared error of the model's v (UNet) or flow (Flux) prediction on ``images`` in ``[0, 1]`` (the
    denoiser under bfloat16 autocast if ``bf16``)."""
    b = images.shape[0]
    x0 = images * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    drop = torch.rand(b, generator=g) < cond_drop
    text, pooled = text_encoder(tokenize(["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]))
    if name == "unet":
        t = torch.randint(0, 1000, (b,), generator=g)
        timestep = t
        a = unet_scheduler().alphas_cumprod[t].view(b, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
    else:
        t = torch.sigmoid(torch.randn(b, generator=g))
        timestep = 1000 * t
        s = t.view(b, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        target = noise - x0
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        prediction = denoise(denoiser, xt, timestep, text, pooled)
    return (prediction.float() - target).pow(2).mean()


@torch.no_grad()
def validation_loss(
    name: str, denoiser: nn.Module, text_encoder: nn.Module, batch: int = 32, size: int = models.IMAGE_SIZE
) -> float:
    """The loss on a fixed held-out batch (dataset seed 1) with fixed noise and timesteps, in eval mode."""
    images, prompts = make_batch(1, 0, batch, size)
    modes = denoiser.training, text_encoder.training
    denoiser.eval(), text_encoder.eval()
    loss = diffusion_loss(name, denoiser, text_encoder, images, prompts, torch.Generator().manual_seed(1234))
    denoiser.train(modes[0]), text_encoder.train(modes[1])
    return float(loss)


def zero_init(denoiser: nn.Module) -> nn.Module:
    """Make every residual branch start as the identity, as latent diffusion and DiT initialise (``zero_module``,
    adaLN-Zero): UNet: each ResNet's second convolution, each transformer's output projection and the output
    convolution; Flux: each block's adaptive-norm modulation (shift, scale, gate = 0), the final modulation and
    projection. Returns ``denoiser``."""
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    zero: list[nn.Module] = []
    for module in denoiser.modules():
        if isinstance(module, ResnetBlock2D):
            zero.append(module.conv2)
        elif isinstance(module, Transformer2DModel):
            zero.append(module.proj_out)
        elif isinstance(module, AdaLayerNormZero | AdaLayerNormZeroSingle | AdaLayerNormContinuous):
            zero.append(module.linear)
    zero.append(denoiser.conv_out if hasattr(denoiser, "conv_out") else denoiser.proj_out)
    with torch.no_grad():
        for module in zero:
            for p in module.parameters():
                p.zero_()
    return denoiser


def train(
    cfg: TrainConfig, progress: bool = True, callback: Callable[[int, nn.Module, nn.Module], None] | None = None
) -> tuple[nn.Module, nn.Module, list[float]]:
    """Train from a seeded initialisation (:func:`zero_init`) or from the weights ``cfg.init``; returns the EMA
    denoiser and text encoder (eval mode) and the loss of every step. ``callback(step, ema_denoiser,
    ema_text_encoder)`` runs after every step."""
    if cfg.init is not None:
        denoiser, text_encoder, _ = models.load(cfg.model, Path(cfg.init))
    else:
        denoiser, text_encoder = models.build(cfg.model, seed=cfg.seed, **cfg.overrides)
        zero_init(denoiser)
    denoiser.train(), text_encoder.train()
    params = [*denoiser.parameters(), *text_encoder.parameters()]
    ema = [
        copy.deepcopy(denoiser).eval().requires_grad_(False),
        copy.deepcopy(text_encoder).eval().requires_grad_(False),
    ]
    ema_params = [*ema[0].parameters(), *ema[1].parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps, cfg.warmup))
    g = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    bar = tqdm(range(cfg.stop or cfg.steps), desc=f"train {cfg.model}", disable=not progress)
    for step in bar:
        images, prompts = make_batch(cfg.seed, step, *cfg.shape_at(step))
        loss = diffusion_loss(cfg.model, denoiser, text_encoder, images, prompts, g, cfg.cond_drop, cfg.bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        losses.append(float(loss.detach()))
        if callback is not None:
            callback(step, *ema)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    return ema[0], ema[1], losses


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values (fewer at the start) at every index."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_loss(path: Path, name: str, losses: list[float], what: str = "MSE loss") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(losses, color="tab:blue", alpha=0.3, lw=0.8, label="step")
    ax.plot(moving_average(losses, 50), color="tab:blue", label="mean of 50")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(what)
    ax.set_title(f"reference {name}: training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sample_grid(pipe: ReferencePipeline, count: int = 8, steps: int = 20, scale: int = 3) -> Any:
    """Held-out dataset images (top row) above two samples per caption (seeds 0 and 1), enlarged ``scale`` times."""
    from tokenmerge.harness.report import image_grid

    images, prompts = make_batch(2, 0, count, pipe.size)
    rows = [to_pil(images, scale)]
    for seed in (0, 1):
        rows.append(to_pil(pipe(prompts, [seed] * count, steps=steps), scale))
    return image_grid(rows), prompts


def run_info(start: tuple[float, float]) -> dict[str, Any]:
    """Wall and process CPU time since ``start`` (``(perf_counter, process_time)``) and the machine."""
    return dict(
        wall_s=round(time.perf_counter() - start[0], 1),
        cpu_s=round(time.process_time() - start[1], 1),  # the compute used, whatever else shared the machine
        threads=torch.get_num_threads(),
        machine=platform.processor() or platform.machine(),
        torch=torch.__version__,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def main_classifier(args: argparse.Namespace) -> int:
    """Train the scene classifier (:mod:`tokenmerge.reference.scenes`) and write ``classifier.safetensors``,
    ``classifier_train.json`` and ``classifier_loss.png``."""
    from tokenmerge.reference import scenes

    start = (time.perf_counter(), time.process_time())
    lr = args.lr or 2e-3
    model, losses = scenes.train_classifier(args.steps, args.batch, lr=lr, seed=args.seed or scenes.TRAIN_SEED)
    info = dict(
        train=dict(steps=args.steps, batch=args.batch, lr=lr, seed=args.seed or scenes.TRAIN_SEED, width=32),
        width=32,
        **run_info(start),
        held_out=scenes.held_out_accuracy(model),
    )
    scenes.save(args.out / "classifier.safetensors", model, info)
    (args.out / "classifier_train.json").write_text(json.dumps(dict(info, losses=losses), indent=1) + "\n")
    plot_loss(args.out / "classifier_loss.png", "classifier", losses, "cross-entropy")
    print(json.dumps(info, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmerge.reference.train", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, choices=[*models.MODELS, "classifier"])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, help="peak learning rate (default 1e-3; classifier 2e-3)")
    parser.add_argument("--low-res-steps", type=int, default=0, help="first steps at half the image size")
    parser.add_argument("--low-res-batch", type=int, help="batch of those steps (default --batch)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (float32 weights)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init", type=Path, help="continue from this weights file (e.g. an earlier run's)")
    parser.add_argument("--stop", type=int, help="end after N steps (learning-rate and size schedules span --steps)")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="also save the EMA weights every N steps")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or not 0 <= args.low_res_steps <= args.steps:
        parser.error("--steps and --batch must be >= 1, --low-res-steps between 0 and --steps")
    if args.stop is not None and not 1 <= args.stop <= args.steps:
        parser.error("--stop must be between 1 and --steps")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.model == "classifier":
        return main_classifier(args)
    cfg = TrainConfig(
        args.model,
        args.steps,
        batch=args.batch,
        lr=args.lr or 1e-3,
        seed=args.seed,
        low_res_steps=args.low_res_steps,
        low_res_batch=args.low_res_batch,
        bf16=args.bf16,
        init=str(args.init) if args.init else None,
        stop=args.stop,
    )
    clock: list[tuple[float, float]] = [(time.perf_counter(), time.process_time())]

    def on_step(step: int, denoiser: nn.Module, text_encoder: nn.Module) -> None:
        clock.append((time.perf_counter(), time.process_time()))
        if args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 and step + 1 < (cfg.stop or cfg.steps):
            models.save(args.out / f"{cfg.model}_step{step + 1}.safetensors", cfg.model, denoiser, text_encoder, {})

    denoiser, text_encoder, losses = train(cfg, progress=not args.quiet, callback=on_step)
    info = dict(
        train={k: v for k, v in asdict(cfg).items() if k != "overrides"},
        **run_info(clock[0]),
        final_loss_mean50=sum(losses[-50:]) / len(losses[-50:]),
        validation_loss=validation_loss(cfg.model, denoiser, text_encoder),
    )
    path = args.out / f"{cfg.model}.safetensors"
    models.save(path, cfg.model, denoiser, text_encoder, info)
    step_s = [round(b[0] - a[0], 3) for a, b in itertools.pairwise(clock)]  # wall time of every step
    step_cpu_s = [round(b[1] - a[1], 3) for a, b in itertools.pairwise(clock)]
    record = dict(info, losses=losses, step_s=step_s, step_cpu_s=step_cpu_s)
    (args.out / f"{cfg.model}_train.json").write_text(json.dumps(record, indent=1) + "\n")
    plot_loss(args.out / f"{cfg.model}_loss.png", cfg.model, losses)
    grid, prompts = sample_grid(load_pipeline(cfg.model, path))  # read back from fp16, as users get it
    grid.save(args.out / f"{cfg.model}_samples.png")
    (args.out / f"{cfg.model}_samples.txt").write_text("\n".join(prompts) + "\n")
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
