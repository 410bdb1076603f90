"""Runners: generate one fixed image set with whatever configuration is applied to the runner's pipeline.

A :class:`Runner` has a ``target`` (what settings apply themselves to), a ``device``, the :class:`ImageSet` it
generates and ``generate()``, which returns the set's images ``(N, 3, H, W)`` in ``[0, 1]`` (float32, on the CPU).
Every call gives the same images for the same configuration: the noise of image ``i`` comes from a CPU generator
seeded with its seed, and torch's global generator (which ToMeSD's and CA-ToMe's random destinations fork) is
seeded before each call.

- :class:`ReferenceRunner`: a packaged reference pipeline (:class:`tokenmerge.reference.pipeline.ReferencePipeline`),
  the whole set in one batched call.
- :class:`PipelineRunner`: a diffusers pipeline, one stock call per image (``output_type="pt"``), as ``eval`` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from tokenmerge.errors import HarnessError
from tokenmerge.harness.registry import architectures

#: ``--model`` names of the packaged reference pipelines -> reference model.
REFERENCE = {"reference-unet": "unet", "reference-flux": "flux"}
#: First seed of the default image sets (image ``i`` gets ``SEED + i``): not the demo's seeds.
SEED = 1000


@dataclass(frozen=True)
class ImageSet:
    """Image ``i`` is ``prompts[i]`` with noise seed ``seeds[i]``, ``steps`` denoising steps; ``None`` options
    take the pipeline's defaults."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int = 20
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        if not self.prompts or len(self.prompts) != len(self.seeds):
            raise HarnessError(f"an image set needs one seed per prompt ({len(self.prompts)} vs {len(self.seeds)})")
        if self.steps < 1:
            raise HarnessError(f"--steps must be >= 1, got {self.steps}")

    @classmethod
    def cross(cls, prompts: Sequence[str], seeds: Sequence[int] | None, **options: Any) -> ImageSet:
        """Every prompt with every seed (prompt-major), or with ``seeds=None`` prompt ``i`` with seed ``SEED + i``."""
        if seeds is None:
            return cls(tuple(prompts), tuple(SEED + i for i in range(len(prompts))), **options)
        if len(set(seeds)) != len(seeds):
            raise HarnessError("--seeds must be distinct")
        pairs = [(p, s) for p in prompts for s in seeds]
        return cls(tuple(p for p, _ in pairs), tuple(s for _, s in pairs), **options)


class Runner(Protocol):
    """Generates a fixed image set with the current configuration of ``target`` applied."""

    name: str
    target: Any
    device: torch.device
    images: ImageSet
    #: Options every method gets unless a preset sets them (see :func:`tokenmerge.harness.sweep.build_settings`).
    method_defaults: Mapping[str, Any]

    def generate(self) -> torch.Tensor: ...


@dataclass
class ReferenceRunner:
    """A packaged reference pipeline; the image set is one batched call (guidance 3 unless set)."""

    name: str
    target: Any
    images: ImageSet
    method_defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.target.denoiser.parameters()).device

    def generate(self) -> torch.Tensor:
        torch.manual_seed(0)
        guidance = 3.0 if self.images.guidance_scale is None else self.images.guidance_scale
        out = self.target(list(self.images.prompts), list(self.images.seeds), self.images.steps, guidance)
        return out.float().cpu()


@dataclass
class PipelineRunner:
    """A diffusers text-to-image pipeline: one stock call per image, fixed CPU generator per seed."""

    name: str
    target: Any
    images: ImageSet
    method_defaults: Mapping[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return torch.device(self.target.device)

    def generate(self) -> torch.Tensor:
        extra: dict[str, Any] = dict(height=self.images.height, width=self.images.width)
        extra["guidance_scale"] = self.images.guidance_scale
        extra = {k: v for k, v in extra.items() if v is not None}
        out = []
        for prompt, seed in zip(self.images.prompts, self.images.seeds, strict=True):
            torch.manual_seed(seed)
            generator = torch.Generator(device="cpu").manual_seed(seed)
            with torch.inference_mode():
                result = self.target(
                    prompt, num_inference_steps=self.images.steps, generator=generator, output_type="pt", **extra
                )
            out.append(torch.as_tensor(result.images).float().cpu())
        return torch.cat(out)


def reference_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct captions drawn from the reference models' scene grammar (a seeded draw, not the demo's)."""
    from tokenmerge.reference.data import sample_captions

    return sample_captions(n, seed)


def open_runner(
    model: str,
    prompts: Sequence[str] | None,
    seeds: Sequence[int] | None,
    num_prompts: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    **options: Any,
) -> Runner:
    """The runner of ``model``: ``reference-unet`` / ``reference-flux``, a ``tiny-*`` built-in pipeline, a local
    pipeline folder or a hub id. ``prompts=None``: the default prompts (reference models: :func:`reference_captions`;
    pipelines: the ``general`` set), the first ``num_prompts`` of them; ``options``: :class:`ImageSet` options."""
    from tokenmerge.harness import models
    from tokenmerge.harness.prompts import load_prompts

    if model in REFERENCE:
        from tokenmerge.reference.data import tokenize
        from tokenmerge.reference.pipeline import load_pipeline

        chosen = list(prompts)[:num_prompts] if prompts is not None else reference_captions(num_prompts)
        try:
            tokenize(chosen)
        except ValueError as exc:
            raise HarnessError(f"{model}: {exc}") from None
        if options.get("height") or options.get("width"):
            raise HarnessError(f"{model} generates 64x64 images only: drop --height / --width")
        if dtype != torch.float32:
            raise HarnessError(f"{model} runs in float32 only")
        pipe = load_pipeline(REFERENCE[model]).to(device)
        return ReferenceRunner(model, pipe, ImageSet.cross(chosen, seeds, **options))
    chosen = list(prompts if prompts is not None else load_prompts("general"))[:num_prompts]
    images = ImageSet.cross(chosen, seeds, **options)
    if model in architectures():
        if not model.startswith("tiny-"):
            raise HarnessError(f"{model!r} is a denoiser architecture; pareto needs a pipeline (hub id or folder)")
        from tokenmerge.archs import tiny_pipeline

        pipe = tiny_pipeline(model)
        pipe = pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    elif models.saved_denoiser_class(model):
        raise HarnessError(f"{model!r} holds a bare denoiser; pareto needs a whole pipeline")
    else:
        if models.looks_like_path(model) and not Path(model).expanduser().exists():
            raise HarnessError(f"model path {model!r} does not exist")
        pipe = models.load_pipeline(model, dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return PipelineRunner(model, pipe, images)
