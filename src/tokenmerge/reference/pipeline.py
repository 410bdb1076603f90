"""A small text-to-image pipeline over a reference model, shaped like a diffusers pipeline for ``tokenmerge``.

``pipe.unet`` or ``pipe.transformer`` is the denoiser and ``pipe.scheduler`` a stock diffusers scheduler;
``pipe(prompts, seeds, steps, guidance_scale)`` calls ``scheduler.set_timesteps`` and then loops over
``self.progress_bar(timesteps)``, as diffusers pipelines do, so ``tm.apply(pipe, method)`` works exactly as on a
diffusers pipeline (the patch wraps ``set_timesteps`` to start a new generation and ``progress_bar`` to end it,
however the loop ends). Classifier-free guidance runs the null prompt and the prompts as one batch ``[null, cond]``.
Step caches enabled on a denoiser that has diffusers' ``CacheMixin`` (``pipe.transformer.enable_cache(...)``) work as
in diffusers pipelines: each denoiser call runs in ``cache_context("cond")`` and a call ends with the cache reset.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from tokenmerge.adapters.base import CallShape
from tokenmerge.caches import reset_caches
from tokenmerge.reference import models
from tokenmerge.reference.data import MAX_TOKENS, tokenize


def unet_scheduler(prediction_type: str = "v_prediction") -> Any:
    """DDIM (eta 0) over the cosine noise schedule the UNet was trained with, trailing timesteps."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing="trailing",
    )


def flux_scheduler() -> Any:
    """Flow-matching Euler from sigma 1 (noise) to 0, no shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=1.0)


def pack(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H/2 * W/2, 4C)``: 2x2 patches as row-major tokens (channel-major within a patch)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack`."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """Flux position ids ``(h*w, 3)`` of a row-major ``h x w`` token grid: ``[0, row, column]``."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack((torch.zeros_like(rows), rows, cols), -1).reshape(-1, 3).float()


def denoise(
    denoiser: nn.Module, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor
) -> torch.Tensor:
    """The denoiser's prediction for images ``x`` ``(B, 3, S, S)`` at scheduler timestep ``t`` (a scalar or ``(B,)``;
    UNet: ``[0, 1000)``, Flux: ``1000 * sigma``) with text states ``(B, L, D)`` and pooled text ``(B, D)``."""
    if not hasattr(denoiser.config, "joint_attention_dim"):  # UNet
        return denoiser(x, t, encoder_hidden_states=text).sample
    h, w = x.shape[-2:]
    tokens = denoiser(
        hidden_states=pack(x),
        encoder_hidden_states=text,
        pooled_projections=pooled,
        timestep=(t / 1000).expand(x.shape[0]).to(x.dtype),
        img_ids=image_ids(h // 2, w // 2).to(x.device),
        txt_ids=torch.zeros(text.shape[1], 3, device=x.device),
    ).sample
    return unpack(tokens, h, w)


class ReferencePipeline:
    """Text-to-image sampling with reference model ``name`` (``unet`` or ``flux``)."""

    def __init__(self, name: str, denoiser: nn.Module, text_encoder: nn.Module, size: int = models.IMAGE_SIZE):
        self.name = name
        self.text_encoder = text_encoder
        self.size = size
        if name == "unet":
            self.unet = denoiser
            self.scheduler = unet_scheduler()
        else:
            self.transformer = denoiser
            self.scheduler = flux_scheduler()

    @property
    def denoiser(self) -> nn.Module:
        return self.unet if self.name == "unet" else self.transformer

    @property
    def default_call_shape(self) -> CallShape:
        """One denoiser call of a default generation (batch 1): the pixel grid (UNet) or its 2x2-packed token grid
        (Flux), with the longest caption's text tokens; ``tm.apply`` decides its ``"auto"`` options for it."""
        side = self.size if self.name == "unet" else self.size // 2
        return CallShape(1, (side, side), MAX_TOKENS)

    def progress_bar(self, iterable: Any) -> Any:
        """The denoising loop's iterable (diffusers' convention; no bar is drawn)."""
        return iterable

    def to(self, device: torch.device | str) -> ReferencePipeline:
        self.denoiser.to(device)
        self.text_encoder.to(device)
        return self

    @torch.no_grad()
    def __call__(
        self, prompts: Sequence[str], seeds: Sequence[int], steps: int = 20, guidance_scale: float = 3.0
    ) -> torch.Tensor:
        """Images ``(B, 3, S, S)`` in ``[0, 1]`` for ``prompts`` and ``seeds`` (one each); guidance 1 = no CFG."""
        if len(prompts) != len(seeds) or not prompts:
            raise ValueError(f"give one seed per prompt (got {len(prompts)} prompts, {len(seeds)} seeds)")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        device = next(self.denoiser.parameters()).device
        cfg = guidance_scale != 1.0
        ids = tokenize([""] * len(prompts) + list(prompts) if cfg else list(prompts)).to(device)
        text, pooled = self.text_encoder(ids)
        noise = [torch.randn(3, self.size, self.size, generator=torch.Generator().manual_seed(s)) for s in seeds]
        x = torch.stack(noise).to(device)
        self.scheduler.set_timesteps(steps)
        context = getattr(self.denoiser, "cache_context", None)  # diffusers' CacheMixin (step caches)
        try:
            for t in self.progress_bar(self.scheduler.timesteps):
                with context("cond") if context is not None else nullcontext():
                    out = denoise(self.denoiser, torch.cat((x, x)) if cfg else x, t.to(device), text, pooled)
                if cfg:
                    uncond, cond = out.chunk(2)
                    out = uncond + guidance_scale * (cond - uncond)
                x = self.scheduler.step(out, t, x).prev_sample
        finally:
            reset_caches(self.denoiser)
        return ((x + 1) / 2).clamp(0, 1)


def load_pipeline(name: str, path: Path | None = None) -> ReferencePipeline:
    """The pipeline of reference model ``name`` from its packaged weights (or ``path``), float32, eval mode."""
    denoiser, text_encoder, _ = models.load(name, path)
    return ReferencePipeline(name, denoiser, text_encoder)


def to_pil(images: torch.Tensor, scale: int = 1) -> list[Image.Image]:
    """``[0, 1]`` images ``(B, 3, H, W)`` as PIL images, enlarged ``scale`` times (nearest neighbour)."""
    arrays = (images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    out = [Image.fromarray(a) for a in arrays]
    return [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in out] if scale > 1 else out
