"""What ToMeSD and CA-ToMe share: destinations in ``sy x sx`` cells, drawn per generation, and their options."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenmerge.methods.base import FlagRoles, Generation, Method, boolean, integer
from tokenmerge.ops.bipartite import cell_destinations

#: Seeds a ``torch.Generator`` takes: ``[0, 2**64)``.
SEED_RANGE = 2**64


def check_cells(sx: object, sy: object) -> tuple[int, int]:
    sx, sy = integer("sx", sx, 1), integer("sy", sy, 1)
    if sx * sy < 2:
        raise ValueError(f"sx and sy must make cells of at least 2 tokens, got sx={sx}, sy={sy}")
    return sx, sy


def generation_rng(generation: Generation, seed: int | None) -> torch.Generator:
    """The CPU generator of the current generation (shared by all blocks, drawn from in block call order).

    ``seed`` given: seeded with it at every generation (the same seed gives the same image). ``None``: a fork of torch's
    global CPU generator, taken at the first draw of each generation (``torch.manual_seed(s)`` before the call then
    reproduces ``tomesd``'s draws, which fork the global state once, at their first use).
    """
    if generation.rng is None:
        generation.rng = torch.Generator()
        if seed is None:
            generation.rng.set_state(torch.get_rng_state())
        else:
            generation.rng.manual_seed(seed)
    return generation.rng


@dataclass(frozen=True)
class CellMethod(FlagRoles, Method):
    """Base of the 2x2-cell bipartite methods (:class:`~tokenmerge.ToMeSD`, :class:`~tokenmerge.CAToMe`): their
    shared options, keyword-only (the main knob stays positional: ``ToMeSD(0.5)``, ``CAToMe(0.7)``).

    Args:
        max_downsample: merge in blocks whose grid is at most this many times smaller than the latent; ``None``
            (default): the finest level that has attention in the model (SD 1.x: 1 as in ``tomesd``; SDXL: 2).
        sx, sy: cell width and height; one destination per full cell, every other token a source.
        use_rand: random destination per cell (else the top-left one), one draw shared by the batch; as in
            ``tomesd`` it is turned off for odd batch sizes (so a sample's merge depends on its batch size), except
            in CA-ToMe's ``batch="sample"``, which must not depend on it.
        merge_attn / merge_crossattn / merge_mlp: which sub-modules run on merged tokens (``tomesd`` defaults).
        seed: seed of the destination draws, re-seeded at every generation, in ``[0, 2**64)``; ``None`` forks torch's
            global generator at the start of each generation (see :func:`generation_rng`).
        steps, blocks: as every method (:class:`~tokenmerge.Method`).
    """

    sx: int = field(default=2, kw_only=True)
    sy: int = field(default=2, kw_only=True)
    use_rand: bool = field(default=True, kw_only=True)
    merge_attn: bool = field(default=True, kw_only=True)
    merge_crossattn: bool = field(default=False, kw_only=True)
    merge_mlp: bool = field(default=False, kw_only=True)
    seed: int | None = field(default=None, kw_only=True)

    def validate(self) -> None:
        sx, sy = check_cells(self.sx, self.sy)
        self._set("sx", sx)
        self._set("sy", sy)
        boolean("use_rand", self.use_rand)
        self.check_flags()
        if self.seed is not None:
            seed = integer("seed", self.seed, 0)
            if seed >= SEED_RANGE:
                raise ValueError(f"seed must be below 2**64 (a torch.Generator seed), got {seed}")
            self._set("seed", seed)

    @property
    def random_any_batch(self) -> bool:
        """Whether random destinations are drawn whatever the batch size (else, as in ``tomesd``, for even batches
        only)."""
        return False

    def mergeable(self, grid: tuple[int, int]) -> int:
        """The sources: every token but one destination per full cell."""
        h, w = grid
        return h * w - (h // self.sy) * (w // self.sx)

    def destinations(self, x: torch.Tensor, grid: tuple[int, int], generation: Generation) -> torch.Tensor:
        """``(D,)`` grid indices of one destination per full cell of ``grid``, shared by the batch (random per
        generation unless ``use_rand`` is off or, see :attr:`random_any_batch`, the batch is odd)."""
        random = self.use_rand and (self.random_any_batch or x.shape[0] % 2 == 0)
        rng = generation_rng(generation, self.seed) if random else None
        return cell_destinations(*grid, self.sx, self.sy, rng, x.device)
