"""ToMeSD: random destination per 2x2 cell, bipartite soft matching, the ``ratio * N`` most similar sources merged."""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmerge.methods.base import FlagRoles, Method, check_ratio
from tokenmerge.ops.bipartite import SlotMerge, bipartite_match, cell_destinations, slot_merge, top_sources


def generation_rng(cache: dict[str, Any], seed: int | None) -> torch.Generator:
    """The CPU generator of the current generation (shared by all blocks, drawn from in block call order).

    ``seed`` given: seeded with it at every generation (the same seed gives the same image). ``None``: a fork of torch's
    global CPU generator, taken at the first draw of each generation (``torch.manual_seed(s)`` before the call then
    reproduces ``tomesd``'s draws, which fork the global state once, at their first use).
    """
    generation = cache["generation"]
    rng = generation.get("rng")
    if rng is None:
        rng = torch.Generator()
        if seed is None:
            rng.set_state(torch.get_rng_state())
        else:
            rng.manual_seed(seed)
        generation["rng"] = rng
    return rng


def check_cells(sx: int, sy: int) -> None:
    if any(int(s) != s or s < 1 for s in (sx, sy)) or sx * sy < 2:
        raise ValueError(f"sx and sy must be positive integers with sx * sy >= 2, got sx={sx}, sy={sy}")


@dataclass(frozen=True)
class ToMeSD(FlagRoles, Method):
    """Token Merging for Stable Diffusion (Bolya & Hoffman), same options and semantics as the ``tomesd`` package.

    Per block call on an ``H x W`` grid: one destination per full ``sy x sx`` cell (random with a generator, else
    top-left), every other token a source; each source's best destination by cosine similarity; the
    ``r = int(ratio * N)`` sources with the highest similarity are merged (mean) into their destinations; unmerge copies
    each merged output back to its sources. Plans are recomputed in every block (no reuse), as in ``tomesd``.

    Args:
        ratio: fraction of the block's tokens removed, in ``[0, 1)`` (at most ``1 - 1/(sx*sy)`` takes effect).
        max_downsample: merge in blocks whose grid is at most this many times smaller than the latent (``tomesd``
            default 1: nothing on SDXL, which has no attention there; use 2 or 4 for SDXL).
        sx, sy: cell width and height.
        use_rand: random destination per cell; as in ``tomesd`` it is turned off for odd batch sizes.
        merge_attn / merge_crossattn / merge_mlp: which sub-modules run on merged tokens (``tomesd`` defaults).
        seed: seed of the destination draws, re-seeded at every generation; ``None`` forks torch's global generator
            at the start of each generation (see :func:`generation_rng`).
        steps: 0-based denoising steps at which merging is active (``None``: all).
        blocks: diffusion transformers: block index ranges per block kind, as :class:`tokenmerge.ToMA`.
    """

    ratio: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    seed: int | None = None
    steps: Collection[int] | None = field(default=None)
    blocks: Mapping[str, object] | None = field(default=None)

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        check_cells(self.sx, self.sy)
        self.check_placement()

    @property
    def is_identity(self) -> bool:
        return self.ratio == 0.0

    def phase(self, step: int, num_steps: int | None) -> None:
        return None  # plans do not depend on the step

    def plan(self, x: torch.Tensor, grid: tuple[int, int], cache: dict[str, Any], phase: Hashable) -> SlotMerge | None:
        h, w = grid
        r = int(h * w * self.ratio)
        if r <= 0 or h < self.sy or w < self.sx:
            return None
        rng = generation_rng(cache, self.seed) if self.use_rand and x.shape[0] % 2 == 0 else None
        dst = cell_destinations(h, w, self.sx, self.sy, rng, x.device)
        src, best, match = bipartite_match(x, dst)
        return slot_merge(h * w, dst, src, match, top_sources(best, min(r, src.numel())), x.dtype, key_bias=False)
