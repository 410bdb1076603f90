"""ToDo: token downsampling of self-attention keys and values; every query kept, nothing to unmerge."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from tokenmerge.methods.base import Method, PlanCache, integer
from tokenmerge.ops.downsample import downsample_tokens
from tokenmerge.plans import KVPlan


@dataclass(eq=False)
class DownsampledKV(KVPlan):
    """Self-attention keys/values from the ``factor``-downsampled grid:
    ``(B, H*W, C) -> (B, ceil(H/f) * ceil(W/f), C)``; ``kv_index`` ``(M,)``: the grid positions of the kept tokens,
    in ``kv`` order."""

    grid: tuple[int, int]
    factor: int
    kv_index: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        h, w = self.grid
        self.kv_index = (torch.arange(0, h, self.factor).view(-1, 1) * w + torch.arange(0, w, self.factor)).flatten()

    @property
    def num_kv(self) -> int:
        return self.kv_index.shape[0]

    def kv(self, x: torch.Tensor) -> torch.Tensor:
        return downsample_tokens(x, self.grid, self.factor)


@dataclass(eq=False)
class KVCache(PlanCache):
    """The plan of a reuse group's last grid (plans depend on the grid alone)."""

    plan: DownsampledKV | None = None


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
        max_downsample: (keyword) downsample in blocks whose grid is at most this many times smaller than the latent;
            ``None`` (default): the finest level that has attention (SD 1.x: 1, the reference setting; SDXL: 2).
        steps: (keyword) 0-based denoising steps at which downsampling is active (``None``: all).
        blocks: (keyword) diffusion transformers: block index ranges per block kind, as :class:`tokenmerge.ToMA`.
    """

    factor: int = 2

    keys_values = True
    cache_type = KVCache

    def validate(self) -> None:
        self._set("factor", integer("factor", self.factor, 1))

    @property
    def roles(self) -> frozenset[str]:
        return frozenset({"attn"})

    @property
    def is_identity(self) -> bool:
        return self.factor == 1

    def phase(self, step: int, num_steps: int | None) -> None:
        return None  # plans do not depend on the step

    def plan(self, x: torch.Tensor, grid: tuple[int, int], cache: KVCache, phase: Hashable) -> DownsampledKV:
        if cache.plan is None or cache.plan.grid != grid:
            cache.plan = DownsampledKV(grid, self.factor)
        return cache.plan
