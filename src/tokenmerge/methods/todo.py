"""ToDo: token downsampling of self-attention keys and values; every query kept, nothing to unmerge."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from tokenmerge.methods.base import Method, PlanCache, integer
from tokenmerge.ops.downsample import downsample_tokens
from tokenmerge.parallel import Band
from tokenmerge.plans import KVPlan


@dataclass(eq=False)
class DownsampledKV(KVPlan):
    """Self-attention keys/values from the ``factor``-downsampled grid:
    ``(B, H*W, C) -> (B, ceil(H/f) * ceil(W/f), C)``; ``kv_index`` ``(M,)``: the grid positions of the kept tokens,
    in ``kv`` order. On a band of a larger grid (context parallelism) the kept rows start at ``first_row``, so that
    the band keeps the rows the whole grid keeps."""

    grid: tuple[int, int]
    factor: int
    first_row: int = 0
    kv_index: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        h, w = self.grid
        rows = torch.arange(self.first_row, h, self.factor)
        self.kv_index = (rows.view(-1, 1) * w + torch.arange(0, w, self.factor)).flatten()

    @property
    def num_kv(self) -> int:
        return self.kv_index.shape[0]

    def kv(self, x: torch.Tensor) -> torch.Tensor:
        return downsample_tokens(x, self.grid, self.factor, self.first_row)


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
    band_local = True

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

    def check_band(self, band: Band) -> str | None:
        """Every band keeps the rows the whole grid keeps (every ``factor``-th from its first row), so the keys are
        a single-device run's; raises ``ValueError`` where the ranks then keep different numbers of rows and the
        attention needs equal lengths (all but ``*_anything``)."""
        f, rows = self.factor, band.rows
        kept = sorted({len(range(-r * rows % f, rows, f)) for r in range(band.setting.world)})
        if len(kept) > 1 and band.setting.equal_lengths:
            raise ValueError(
                f"{self.describe()} under context parallelism ({band.setting.describe()}): the ranks' {rows}-row bands "
                f"of the {band.height}x{band.width} grid keep {' or '.join(map(str, kept))} rows of keys (every "
                f"{f}-th row), but the attention needs equal lengths on every rank: use a factor that divides {rows}, "
                "another resolution, or ulysses_anything=True / ring_anything=True"
            )
        return None

    def plan(self, x: torch.Tensor, grid: tuple[int, int], cache: KVCache, phase: Hashable) -> DownsampledKV:
        band = cache.generation.band
        first = 0 if band is None else -band.row % self.factor
        if cache.plan is None or cache.plan.grid != grid or cache.plan.first_row != first:
            cache.plan = DownsampledKV(grid, self.factor, first)
        return cache.plan
