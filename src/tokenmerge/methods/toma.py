"""ToMA: tile-local submodular destination selection, merge/unmerge as attention-like matmuls."""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from tokenmerge.methods.base import FlagRoles, Method, PlanCache, check_ratio, check_tile, integer, real
from tokenmerge.ops.select import TIE_TOL
from tokenmerge.ops.tiles import TileGrid
from tokenmerge.ops.toma import TileMerge, toma_merge


@dataclass(eq=False)
class ToMACache(PlanCache):
    """A reuse group's merge for the current generation: for which batch size, grid, device and dtype (``key``), the
    merge and the tile-local destinations it was built from."""

    key: tuple | None = None
    merge: TileMerge | None = None
    dest: list[torch.Tensor] | None = None


@dataclass(frozen=True)
class ToMA(FlagRoles, Method):
    """Token Merge with Attention.

    Args:
        ratio: fraction of tokens removed in each tile, in ``[0, 1)``; 0 leaves the model untouched.
        tile: ``(tile_h, tile_w)`` of the local windows in which destinations are chosen and tokens merged (an
            integer ``t``: ``(t, t)``).
        tau: softmax temperature of the merge assignment (large = nearly hard assignment), positive and finite.
        tie_tol: destination selection treats gains within ``tie_tol`` per tile token of the best as tied and takes
            the lowest index among them, so rounding noise (batch mates, attention backend, compiler) cannot flip
            picks; 0 keeps exact ties only.
        merge_attn / merge_crossattn / merge_mlp: run self-attention / cross-attention queries / the MLP on merged
            tokens (the whole block by default; attention alone is more faithful and slower, see docs/benchmarks.md).
        dest_every: recompute destinations every this many steps (reused in between).
        weight_every: recompute merge weights every this many steps. Within a step, the first patched block of a
            reuse group (a UNet level on the down, mid or up path) computes them and the later blocks reuse them.
        max_downsample: (keyword) merge in blocks whose grid is at most this many times smaller than the latent
            (4: the 64x64, 32x32 and 16x16-token levels of SD 1.5 at 512px, and both attention levels of SDXL).
        steps: (keyword) 0-based denoising steps at which merging is active (``None``: all); the others run the full
            model.
        blocks: (keyword) diffusion transformers: merged block index ranges per block kind, half-open, e.g.
            ``{"double": (0, None), "single": range(5, 38)}`` (Flux kinds ``double``/``single``, SD3 ``joint``,
            PixArt ``blocks``); kinds not given keep the model's default (Flux: all but the first
            ``round(5 * n / 19)`` double-stream and ``round(5 * n / 38)`` single-stream blocks, i.e. five of each on
            Flux.1; SD3, PixArt: every block). Reuse groups there are one per kind (stream).
    """

    ratio: float = 0.5
    tile: tuple[int, int] = (4, 4)
    tau: float = 1000.0
    tie_tol: float = TIE_TOL
    merge_attn: bool = True
    merge_crossattn: bool = True
    merge_mlp: bool = True
    max_downsample: int | None = field(default=4, kw_only=True)
    dest_every: int = 5
    weight_every: int = 1

    cache_type = ToMACache

    def validate(self) -> None:
        self._set("ratio", check_ratio(self.ratio))
        self._set("tile", check_tile(self.tile))
        self._set("tau", real("tau", self.tau, 0.0, math.inf, low_open=True, high_open=True))
        self._set("tie_tol", real("tie_tol", self.tie_tol, 0.0, 1.0, high_open=True))
        self.check_flags()
        self._set("dest_every", integer("dest_every", self.dest_every, 1))
        self._set("weight_every", integer("weight_every", self.weight_every, 1))

    @property
    def is_identity(self) -> bool:
        return self.ratio == 0.0

    def phase(self, step: int, num_steps: int | None) -> tuple[bool, bool]:
        """``(destinations due, weights due)`` at ``step``: weights every ``weight_every`` steps; destinations with
        the first weights at least ``dest_every`` steps after the last destinations (from step 0)."""
        weights_due = step % self.weight_every == 0
        last_dest = 0
        for s in range(self.weight_every, step + 1, self.weight_every):
            if s - last_dest >= self.dest_every:
                last_dest = s
        return weights_due and last_dest == step, weights_due

    def plan(self, x: torch.Tensor, grid: tuple[int, int], cache: ToMACache, phase: Hashable) -> TileMerge:
        """The group's merge: computed by its first block in a step where weights are due (with new destinations if
        those are due too) or when nothing is cached for this batch size, grid, device and dtype; else reused."""
        dest_due, weights_due = phase
        key = (x.shape[0], *grid, x.device, x.dtype)
        if cache.key != key:
            cache.key, cache.merge, cache.dest, cache.fresh = key, None, None, False
        if cache.merge is None or (weights_due and not cache.fresh):
            dest = None if dest_due else cache.dest
            tiles = TileGrid(*grid, *self.tile)
            cache.merge, cache.dest = toma_merge(x, tiles, self.ratio, self.tau, dest, self.tie_tol)
            cache.fresh = True
        return cache.merge
