"""Context parallelism (diffusers' ``enable_parallelism``): the setting of a model and the band of image rows a rank
holds.

Under ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` (or ``ring_degree=N``)
every rank runs the whole model on ``1/N`` of the tokens: the model's input hook splits the image and text tokens
(and their position ids) along the sequence, the attention exchanges them (Ulysses: all-to-all of queries, keys and
values; ring: all-gather of keys and values), and the output projection gathers the sequence back. A rank's image
tokens are one contiguous run of the row-major ``H x W`` grid: a *band*, ideally of whole rows. Token merging runs
on each rank's band, so what the attention exchanges is the merged sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ContextParallel:
    """diffusers' context-parallel setting of a model, as one rank sees it.

    ``ulysses`` / ``ring``: the degrees; ``anything``: ``ulysses_anything`` or ``ring_anything`` (ranks may hold
    sequences of different lengths); ``rank`` of ``world`` ranks (``ulysses * ring``) in the sequence split.
    """

    ulysses: int
    ring: int
    anything: bool
    rank: int
    world: int

    @property
    def equal_lengths(self) -> bool:
        """Whether the attention's collectives need the same sequence length on every rank (all but the
        ``*_anything`` modes)."""
        return not self.anything

    def member(self) -> str:
        """Which rank of which group: ``rank 0 of 2 (ulysses_degree=2)``."""
        return f"rank {self.rank} of {self.world} ({self.describe()})"

    def describe(self) -> str:
        """The options as given to ``ContextParallelConfig``, e.g. ``ulysses_degree=2, ulysses_anything=True``."""
        parts = [f"{name}_degree={n}" for name, n in (("ulysses", self.ulysses), ("ring", self.ring)) if n > 1]
        if self.anything:
            parts.append(f"{'ulysses' if self.ulysses > 1 else 'ring'}_anything=True")
        return ", ".join(parts)


def context_parallel(model: Any) -> ContextParallel | None:
    """The context-parallel setting of a diffusers model after ``enable_parallelism``, or ``None``."""
    config = getattr(getattr(model, "_parallel_config", None), "context_parallel_config", None)
    mesh = getattr(config, "_flattened_mesh", None)
    if mesh is None:
        return None
    return ContextParallel(
        ulysses=config.ulysses_degree,
        ring=config.ring_degree,
        anything=bool(config.ulysses_anything or config.ring_anything),
        rank=torch.distributed.get_rank(mesh.get_group()),
        world=mesh.size(),
    )


@dataclass(frozen=True)
class Band:
    """The image tokens of one rank: tokens ``[start, start + count)`` of the row-major ``height x width`` grid.

    Whole rows when ``start`` and ``count`` are multiples of ``width``: rows ``[row, row + rows)``. Sequence splits
    give every rank of ``setting`` an equal band (``ulysses_anything`` / ``ring_anything``: sizes differing by one
    token), ranks in order: whole-row bands of a grid wider than one token are all ``rows`` high, rank ``r``'s
    starting at row ``r * rows``.
    """

    start: int
    count: int
    height: int
    width: int
    setting: ContextParallel

    @property
    def whole_rows(self) -> bool:
        return self.start % self.width == 0 and self.count % self.width == 0

    @property
    def row(self) -> int:
        return self.start // self.width

    @property
    def rows(self) -> int:
        return self.count // self.width

    @property
    def grid(self) -> tuple[int, int]:
        """The band's own ``(rows, width)`` grid (whole-row bands)."""
        return self.rows, self.width

    def describe(self) -> str:
        where = (
            f"image rows {self.row}-{self.row + self.rows - 1}"
            if self.whole_rows
            else f"image tokens {self.start}-{self.start + self.count - 1}"
        )
        return f"{self.setting.member()}: {where} of the {self.height}x{self.width} grid"
