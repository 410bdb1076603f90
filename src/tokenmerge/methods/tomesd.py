"""ToMeSD: random destination per 2x2 cell, bipartite soft matching, the ``ratio * N`` most similar sources merged."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch

from tokenmerge.methods.base import PlanCache, check_ratio
from tokenmerge.methods.cells import CellMethod
from tokenmerge.ops.bipartite import SlotMerge, bipartite_match, slot_merge, top_sources


@dataclass(frozen=True)
class ToMeSD(CellMethod):
    """Token Merging for Stable Diffusion (Bolya & Hoffman), same options and semantics as the ``tomesd`` package.

    Per block call on an ``H x W`` grid: one destination per full ``sy x sx`` cell (random with a generator, else
    top-left), every other token a source; each source's best destination by cosine similarity; the
    ``r = int(ratio * N)`` sources with the highest similarity are merged (mean) into their destinations; unmerge copies
    each merged output back to its sources. Plans are recomputed in every block (no reuse), as in ``tomesd``.

    Args:
        ratio: fraction of the block's tokens removed, in ``[0, 1)`` (at most ``1 - 1/(sx*sy)`` takes effect).
        max_downsample, sx, sy, use_rand, merge_attn, merge_crossattn, merge_mlp, seed, steps, blocks: keyword-only,
            see :class:`~tokenmerge.methods.cells.CellMethod` (``max_downsample=None``: the finest level with
            attention, which is ``tomesd``'s default 1 on SD 1.x and 2 on SDXL, where ``tomesd``'s merges nothing).
    """

    ratio: float = 0.5

    def validate(self) -> None:
        super().validate()
        self._set("ratio", check_ratio(self.ratio))

    @property
    def is_identity(self) -> bool:
        return self.ratio == 0.0

    def phase(self, step: int, num_steps: int | None) -> None:
        return None  # plans do not depend on the step

    def plan(self, x: torch.Tensor, grid: tuple[int, int], cache: PlanCache, phase: Hashable) -> SlotMerge | None:
        h, w = grid
        r = int(h * w * self.ratio)
        if r <= 0 or h < self.sy or w < self.sx:
            return None
        dst = self.destinations(x, grid, cache.generation)
        src, best, match = bipartite_match(x, dst)
        r = min(r, src.numel())
        return slot_merge(h * w, dst, src, match, top_sources(best, r), x.dtype, key_bias=False, rows=h * w - r)
