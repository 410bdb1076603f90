"""Cut an ``H x W`` token grid into rectangular tiles, with reshape/permute only.

A grid that the tile does not divide is covered by up to four *regions* -- the divisible main block, the right
strip, the bottom strip and the corner -- each cut into equal tiles of its own shape, so every region folds into a
dense ``(B, T, s, C)`` tensor (``T`` tiles of ``s`` tokens) without padding, masks or gathers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch


class Region(NamedTuple):
    """Rows ``[row, row + rows)`` x cols ``[col, col + cols)`` of the grid, cut into ``tile_h x tile_w`` tiles."""

    row: int
    col: int
    rows: int
    cols: int
    tile_h: int
    tile_w: int

    @property
    def tile_size(self) -> int:
        return self.tile_h * self.tile_w

    @property
    def num_tiles(self) -> int:
        return (self.rows // self.tile_h) * (self.cols // self.tile_w)

    def sq_distances(self, device: torch.device | None = None) -> torch.Tensor:
        """``(s, s)`` float32 squared grid distances between the (row-major) slots of one tile, in tokens."""
        slot = torch.arange(self.tile_size, device=device)
        rows, cols = (slot // self.tile_w).float(), (slot % self.tile_w).float()
        return (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2


@dataclass
class TileGrid:
    """Tiling of a row-major ``height x width`` token grid by ``tile_h x tile_w`` tiles (edges may be smaller)."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    #: The non-empty regions (main block, right strip, bottom strip, corner), computed once.
    regions: tuple[Region, ...] = field(init=False, repr=False, compare=False)  # read-only after __init__

    def __post_init__(self) -> None:
        if min(self.height, self.width) < 1:
            raise ValueError(f"token grid must be non-empty, got {self.height}x{self.width}")
        if min(self.tile_h, self.tile_w) < 1:
            raise ValueError(f"tile must be at least 1x1, got {self.tile_h}x{self.tile_w}")
        th, tw = min(self.tile_h, self.height), min(self.tile_w, self.width)
        main_h, main_w = self.height - self.height % th, self.width - self.width % tw
        rest_h, rest_w = self.height - main_h, self.width - main_w
        candidates = (
            Region(0, 0, main_h, main_w, th, tw),
            Region(0, main_w, main_h, rest_w, th, rest_w),
            Region(main_h, 0, rest_h, main_w, rest_h, tw),
            Region(main_h, main_w, rest_h, rest_w, rest_h, rest_w),
        )
        self.regions = tuple(r for r in candidates if r.rows and r.cols)

    @property
    def num_tokens(self) -> int:
        return self.height * self.width

    def fold(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, H*W, C)`` -> one ``(B, T_r, s_r, C)`` tensor per region (tokens of a tile are row-major)."""
        b, n, c = x.shape
        if n != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens for a {self.height}x{self.width} grid, got {n}")
        grid = x.view(b, self.height, self.width, c)
        out = []
        for r in self.regions:
            part = grid[:, r.row : r.row + r.rows, r.col : r.col + r.cols]
            part = part.reshape(b, r.rows // r.tile_h, r.tile_h, r.cols // r.tile_w, r.tile_w, c)
            out.append(part.permute(0, 1, 3, 2, 4, 5).reshape(b, r.num_tiles, r.tile_size, c))
        return out

    def unfold(self, tiles: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`fold`: per-region ``(B, T_r, s_r, C)`` -> ``(B, H*W, C)``."""
        b, c = tiles[0].shape[0], tiles[0].shape[-1]

        def grid_of(r: Region, t: torch.Tensor) -> torch.Tensor:
            t = t.view(b, r.rows // r.tile_h, r.cols // r.tile_w, r.tile_h, r.tile_w, c)
            return t.permute(0, 1, 3, 2, 4, 5).reshape(b, r.rows, r.cols, c)

        if len(self.regions) == 1:
            return grid_of(self.regions[0], tiles[0]).reshape(b, self.num_tokens, c)
        out = tiles[0].new_empty(b, self.height, self.width, c)
        for r, t in zip(self.regions, tiles, strict=True):
            out[:, r.row : r.row + r.rows, r.col : r.col + r.cols] = grid_of(r, t)
        return out.view(b, self.num_tokens, c)

    def token_index(self, device: torch.device | None = None) -> list[torch.Tensor]:
        """Grid index of every tile slot: one ``(T_r, s_r)`` long tensor per region (``fold`` of ``arange(N)``)."""
        idx = torch.arange(self.num_tokens, device=device).view(1, -1, 1)
        return [t[0, ..., 0] for t in self.fold(idx)]
