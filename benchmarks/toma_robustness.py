"""How much a method's output moves under perturbations that should not matter, on a packaged reference model.

Every figure is a relative L2 change ``||a - b|| / ||b||``:

- ``noise_call``: one denoiser call (the inputs of step 5 of a 15-step generation of 4 held-out captions, CFG batch
  8, fresh merge plans) with 1e-6 Gaussian noise added to its input; ``noise_tiles``: the share of ToMA tiles whose
  destinations changed in the first planned block;
- ``noise_gen``: a whole generation (4 images) with 1e-6 noise added to its initial noise;
- ``batch_call`` / ``batch_gen``: the first sample alone vs in the batch of four;
- ``backend_call`` / ``backend_gen`` (UNet): diffusers' ``AttnProcessor`` (bmm + softmax) vs ``AttnProcessor2_0``
  (SDPA);
- ``compile_call`` (``--compile``): ``torch.compile`` (inductor) vs eager, one call.

Target (issue #12): every relative change below ``TARGET`` (1e-3); the table marks the configurations that miss it.

    python benchmarks/toma_robustness.py --model unet --out robust.json baseline toma "toma:tie_tol=0" todo
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import tokenmerge as tm
from tokenmerge.harness.registry import parse_method
from tokenmerge.harness.runners import reference_captions
from tokenmerge.methods import toma as toma_method
from tokenmerge.reference.data import tokenize
from tokenmerge.reference.pipeline import ReferencePipeline, denoise, load_pipeline

CAPTIONS = tuple(reference_captions(4, seed=1))  # a seeded draw from the scene grammar, not the demo's
SEEDS = (2000, 2001, 2002, 2003)
STEPS, CAPTURE, EPS, TARGET = 15, 5, 1e-6, 1e-3


class DestinationLog:
    """Records the tile-local destinations of every ToMA plan built while installed."""

    def __init__(self) -> None:
        self.dests: list[list[torch.Tensor]] = []
        self.original = toma_method.toma_merge

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.original(*args, **kwargs)
        self.dests.append(out[1])
        return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def sample(pipe: ReferencePipeline, n: int = 4, perturb: float = 0.0, capture: int | None = None) -> Any:
    """The reference pipeline's loop (guidance 3) on the first ``n`` captions; ``perturb``: noise added to the
    initial noise; ``capture``: return the denoiser inputs of that step instead of the images."""
    text, pooled = pipe.text_encoder(tokenize([""] * n + list(CAPTIONS[:n])))
    x = torch.stack([torch.randn(3, pipe.size, pipe.size, generator=torch.Generator().manual_seed(s)) for s in SEEDS])
    x = x[:n] + perturb * torch.randn(x[:n].shape, generator=torch.Generator().manual_seed(99))
    pipe.scheduler.set_timesteps(STEPS)
    for i, t in enumerate(pipe.scheduler.timesteps):
        if capture == i:
            return torch.cat((x, x)), t, text, pooled
        uncond, cond = denoise(pipe.denoiser, torch.cat((x, x)), t, text, pooled).chunk(2)
        x = pipe.scheduler.step(uncond + 3.0 * (cond - uncond), t, x).prev_sample
    return ((x + 1) / 2).clamp(0, 1)


@torch.no_grad()
def call(pipe: ReferencePipeline, inputs: tuple, log: DestinationLog, model: Any = None) -> torch.Tensor:
    """One denoiser call with fresh plans (step 0 of a new generation)."""
    tm.set_step(pipe.denoiser, 0)
    log.dests.clear()
    return denoise(pipe.denoiser if model is None else model, *inputs)


def changed_tiles(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> float | None:
    if not a or not b:
        return None
    total = sum(d.shape[0] * d.shape[1] for d in a[0])
    return sum(int((x != y).any(-1).sum()) for x, y in zip(a[0], b[0], strict=True)) / total


def set_sdpa(pipe: ReferencePipeline, sdpa: bool) -> bool:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if pipe.name != "unet":
        return False
    pipe.unet.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())
    return True


def measure(pipe: ReferencePipeline, inputs: tuple, log: DestinationLog, compile_: bool) -> dict[str, Any]:
    x, t, text, pooled = inputs
    noisy = (x + EPS * torch.randn(x.shape, generator=torch.Generator().manual_seed(5)), t, text, pooled)
    first = [0, x.shape[0] // 2]  # the first sample's unconditional and conditional rows
    row: dict[str, Any] = {}
    ref = call(pipe, inputs, log)
    before = list(log.dests)
    row["noise_call"] = rel(call(pipe, noisy, log), ref)
    row["noise_tiles"] = changed_tiles(before, log.dests)
    row["batch_call"] = rel(call(pipe, (x[first], t, text[first], pooled[first]), log), ref[first])
    if set_sdpa(pipe, False):
        row["backend_call"] = rel(call(pipe, inputs, log), ref)
        set_sdpa(pipe, True)
    images = sample(pipe)
    row["noise_gen"] = rel(sample(pipe, perturb=EPS), images)
    row["batch_gen"] = rel(sample(pipe, n=1), images[:1])
    if set_sdpa(pipe, False):
        row["backend_gen"] = rel(sample(pipe), images)
        set_sdpa(pipe, True)
    if compile_:
        torch._dynamo.reset()
        compiled = torch.compile(pipe.denoiser)
        call(pipe, inputs, log, compiled)  # compile (the first call of a generation), then a warm call
        row["compile_call"] = rel(call(pipe, inputs, log, compiled), ref)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["unet", "flux"], default="unet")
    ap.add_argument("--compile", action="store_true", help="also compare torch.compile (inductor) with eager")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("configs", nargs="+", metavar="SPEC")
    args = ap.parse_args()
    pipe = load_pipeline(args.model)
    inputs = sample(pipe, capture=CAPTURE)
    log = DestinationLog()
    toma_method.toma_merge = log
    rows = []
    for text in args.configs:
        spec = parse_method(text)
        if spec.method is not None:
            tm.apply(pipe, spec.method)
        try:
            rows.append(dict(config=spec.label) | measure(pipe, inputs, log, args.compile))
        finally:
            tm.remove(pipe)
        print(json.dumps(rows[-1]), flush=True)
    columns = [k for k in rows[0] if k != "config"]
    print("| config | " + " | ".join(columns) + " | target |")
    print("|" + " --- |" * (len(columns) + 2))
    for row in rows:
        changes = [row[c] for c in columns if c != "noise_tiles" and row[c] is not None]
        cells = ["-" if row[c] is None else f"{row[c]:.2g}" for c in columns]
        verdict = "ok" if max(changes) < TARGET else "MISSED"
        print(f"| {row['config']} | " + " | ".join(cells) + f" | {verdict} |")
    meta = dict(model=args.model, date=datetime.now(timezone.utc).isoformat(timespec="seconds"), eps=EPS, target=TARGET)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
