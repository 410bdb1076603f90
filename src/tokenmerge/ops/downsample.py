"""Spatial token downsampling (ToDo): keys/values from a coarser grid, queries untouched."""

from __future__ import annotations

import torch


def downsample_tokens(x: torch.Tensor, grid: tuple[int, int], factor: int, first_row: int = 0) -> torch.Tensor:
    """Nearest-neighbour downsampling of ``(B, H*W, C)`` tokens by ``factor`` per side: ``(B, ceil(H/f)*ceil(W/f), C)``.

    Keeps the top-left token of every ``factor x factor`` cell (``x[:, ::f, ::f]`` on the grid), which is what
    nearest interpolation to ``(H/f, W/f)`` picks when ``f`` divides the grid; edge cells may be smaller. A band of
    a larger grid whose cells start ``first_row`` rows into it keeps rows ``first_row, first_row + f, ...``
    (``(B, ceil((H - first_row)/f)*ceil(W/f), C)``).
    """
    b, n, c = x.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"expected {h * w} tokens for a {h}x{w} grid, got {n}")
    return x.view(b, h, w, c)[:, first_row::factor, ::factor].reshape(b, -1, c)
