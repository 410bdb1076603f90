"""ToMA: tile-local submodular destination selection, merge/unmerge as attention-like matmuls."""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmerge.methods.base import FlagRoles, Method, check_ratio
from tokenmerge.ops.tiles import TileGrid
from tokenmerge.ops.toma import TileMerge, toma_merge


@dataclass(frozen=True)
class ToMA(FlagRoles, Method):
    """Token Merge with Attention.

    Args:
        ratio: fraction of tokens removed in each tile, in ``[0, 1)``; 0 leaves the model untouched.
        tile: ``(tile_h, tile_w)`` of the local windows in which destinations are chosen and tokens merged.
        tau: softmax temperature of the merge assignment (large = nearly hard assignment).
        merge_attn / merge_crossattn / merge_mlp: run self-attention / cross-attention queries / the MLP on merged
            tokens (the whole block by default; attention alone is more faithful and slower, see docs/benchmarks.md).
        max_downsample: merge in blocks whose grid is at most this many times smaller than the latent
            (4: the 64x64, 32x32 and 16x16-token levels of SD 1.5 at 512px, and both attention levels of SDXL).
        dest_every: recompute destinations every this many steps (reused in between).
        weight_every: recompute merge weights every this many steps. Within a step, the first patched block of a
            reuse group (a UNet level on the down, mid or up path) computes them and the later blocks reuse them.
        steps: 0-based denoising steps at which merging is active (``None``: all); the others run the full model.
        blocks: diffusion transformers: merged block index ranges per block kind, half-open, e.g.
            ``{"double": (0, None), "single": range(5, 38)}`` (Flux kinds ``double``/``single``, SD3 ``joint``,
            PixArt ``blocks``); kinds not given keep the model's default (Flux: all but the first five of each kind;
            SD3, PixArt: every block). Reuse groups there are one per kind (stream).
    """

    ratio: float = 0.5
    tile: tuple[int, int] = (4, 4)
    tau: float = 1000.0
    merge_attn: bool = True
    merge_crossattn: bool = True
    merge_mlp: bool = True
    max_downsample: int = 4
    dest_every: int = 5
    weight_every: int = 1
    steps: Collection[int] | None = field(default=None)
    blocks: Mapping[str, object] | None = field(default=None)

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        if len(self.tile) != 2 or any(int(t) != t or t < 1 for t in self.tile):
            raise ValueError(f"tile must be two positive integers (tile_h, tile_w), got {self.tile!r}")
        if self.tau <= 0:
            raise ValueError(f"tau must be positive, got {self.tau}")
        if self.dest_every < 1 or self.weight_every < 1:
            raise ValueError("dest_every and weight_every must be >= 1")
        self.check_placement()

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

    def plan(self, x: torch.Tensor, grid: tuple[int, int], cache: dict[str, Any], phase: Hashable) -> TileMerge:
        """The group's merge: computed by its first block in a step where weights are due (with new destinations if
        those are due too) or when nothing is cached for this batch size, grid, device and dtype; else reused."""
        dest_due, weights_due = phase
        key = (x.shape[0], *grid, x.device, x.dtype)
        if cache.get("key") != key:
            for name in ("merge", "dest", "fresh"):
                cache.pop(name, None)
            cache["key"] = key
        if "merge" not in cache or (weights_due and "fresh" not in cache):
            dest = None if dest_due else cache.get("dest")
            cache["merge"], cache["dest"] = toma_merge(x, TileGrid(*grid, *self.tile), self.ratio, self.tau, dest)
            cache["fresh"] = True
        return cache["merge"]
