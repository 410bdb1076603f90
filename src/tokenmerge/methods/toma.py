"""ToMA: tile-local submodular destination selection, merge/unmerge as attention-like matmuls."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmerge.methods.base import Method, check_common, flag_roles, parse_blocks
from tokenmerge.ops.tiles import TileGrid
from tokenmerge.ops.toma import TileMerge, toma_merge


@dataclass(frozen=True)
class ToMA(Method):
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
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if len(self.tile) != 2 or any(int(t) != t or t < 1 for t in self.tile):
            raise ValueError(f"tile must be two positive integers (tile_h, tile_w), got {self.tile!r}")
        if self.tau <= 0:
            raise ValueError(f"tau must be positive, got {self.tau}")
        if self.dest_every < 1 or self.weight_every < 1:
            raise ValueError("dest_every and weight_every must be >= 1")
        flag_roles(self.merge_attn, self.merge_crossattn, self.merge_mlp)
        check_common(self.max_downsample, self.steps)
        object.__setattr__(self, "blocks", parse_blocks(self.blocks))

    @property
    def roles(self) -> frozenset[str]:
        return flag_roles(self.merge_attn, self.merge_crossattn, self.merge_mlp)

    @property
    def is_identity(self) -> bool:
        return self.ratio == 0.0

    def plan(self, x: torch.Tensor, grid: tuple[int, int], cache: dict[str, Any], step: int) -> TileMerge | None:
        tiles = TileGrid(*grid, *self.tile)
        key = (x.shape[0], *grid, x.device, x.dtype)
        if cache.get("key") != key:
            cache.clear()
            cache["key"] = key
        merge = cache.get("merge")
        if merge is None or step - cache["merge_step"] >= self.weight_every:
            dest = cache.get("dest")
            if dest is not None and step - cache["dest_step"] >= self.dest_every:
                dest = None
            merge, new_dest = toma_merge(x, tiles, self.ratio, self.tau, dest)
            if dest is None:
                cache.update(dest=new_dest, dest_step=step)
            cache.update(merge=merge, merge_step=step)
        return merge
