"""ToDo: token downsampling of self-attention keys and values; every query kept, nothing to unmerge."""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmerge.methods.base import Method
from tokenmerge.ops.downsample import downsample_tokens


@dataclass(frozen=True)
class DownsampledKV:
    """Self-attention keys/values from the ``factor``-downsampled grid:
    ``(B, H*W, C) -> (B, ceil(H/f) * ceil(W/f), C)``."""

    grid: tuple[int, int]
    factor: int

    @property
    def kv_index(self) -> torch.Tensor:
        """``(M,)`` grid positions of the kept tokens, in ``kv`` order."""
        h, w = self.grid
        return (torch.arange(0, h, self.factor).view(-1, 1) * w + torch.arange(0, w, self.factor)).flatten()

    def kv(self, x: torch.Tensor) -> torch.Tensor:
        return downsample_tokens(x, self.grid, self.factor)


@dataclass(frozen=True)
class ToDo(Method):
    """Token Downsampling (Smith et al., 2024): self-attention with all ``N`` queries and ``N / factor^2`` keys/values.

    Attention cost falls by ``factor^2``; projections and the MLP are unchanged, and no token is merged, so there is
    no unmerge. Keys/values are projected from the nearest-neighbour (top-left of each ``factor x factor`` cell)
    samples of the self-attention's image tokens (the normalised block input), so the model's processor runs
    unchanged; on joint attention (SD3, Flux) every text token stays a key, and on Flux the kept keys keep their own
    rotary positions.

    Args:
        factor: downsampling per side (2: a quarter of the keys/values); 1 leaves the model untouched.
        max_downsample: downsample in blocks whose grid is at most this many times smaller than the latent (1: the
            highest-resolution level, the reference setting for SD 1.x; SDXL has attention from level 2 on).
        steps: 0-based denoising steps at which downsampling is active (``None``: all).
        blocks: diffusion transformers: block index ranges per block kind, as :class:`tokenmerge.ToMA`.
    """

    factor: int = 2
    max_downsample: int = 1
    steps: Collection[int] | None = field(default=None)
    blocks: Mapping[str, object] | None = field(default=None)

    keys_values = True

    def __post_init__(self) -> None:
        if int(self.factor) != self.factor or self.factor < 1:
            raise ValueError(f"factor must be a positive integer, got {self.factor!r}")
        self.check_placement()

    @property
    def roles(self) -> frozenset[str]:
        return frozenset({"attn"})

    @property
    def is_identity(self) -> bool:
        return self.factor == 1

    def phase(self, step: int, num_steps: int | None) -> None:
        return None  # plans do not depend on the step

    def plan(self, x: torch.Tensor, grid: tuple[int, int], cache: dict[str, Any], phase: Hashable) -> DownsampledKV:
        return DownsampledKV(grid, int(self.factor))
