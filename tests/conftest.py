from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from tokenmerge.archs import tiny_pipeline

warnings.filterwarnings("ignore", message=".*should be kept in float32.*")


@pytest.fixture(params=["tiny-sd15", "tiny-sdxl"])
def pipe(request: pytest.FixtureRequest):
    """A tiny SD1.5-like (attention at full latent resolution) or SDXL-like (none there) pipeline."""
    p = tiny_pipeline(request.param)
    p.set_progress_bar_config(disable=True)
    return p


def generate(pipe, prompt: str | list[str] = "a red cube", steps: int = 3, seed: int = 0, **kwargs) -> torch.Tensor:
    """The stock pipeline call, returning latents (exact comparisons need no VAE rounding)."""
    kwargs.setdefault("height", 32)
    kwargs.setdefault("width", 32)
    out = pipe(
        prompt,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **kwargs,
    )
    return out.images


@pytest.fixture
def attention_lengths(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """(query length, key length) of every scaled_dot_product_attention call made while the test runs."""
    seen: list[tuple[int, int]] = []
    original = F.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        if not query.is_meta:  # apply counts FLOPs on the model's weightless twin
            seen.append((query.shape[-2], key.shape[-2]))
        return original(query, key, value, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    yield seen
