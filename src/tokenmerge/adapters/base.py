"""Merge sites: where a model's transformer blocks, their sub-modules and their token grids are."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from torch import nn
from torch.utils.hooks import RemovableHandle


@dataclass(eq=False)
class GridSlot:
    """The ``(H, W)`` token grid of the blocks it is shared by, written by a hook before they run."""

    hw: tuple[int, int] | None = None


@dataclass(eq=False)
class Site:
    """One transformer block that can run on merged tokens.

    ``modules`` maps a role (``attn``, ``cross``, ``mlp``) to the sub-module whose first input is the block's
    ``(B, N, C)`` image tokens and whose output is added back to the residual stream. ``group`` names the reuse group
    (blocks that share one plan per step); ``downsample`` is how many times smaller than the latent its grid is.
    """

    name: str
    block: nn.Module
    modules: dict[str, nn.Module]
    group: str
    downsample: int
    grid: GridSlot = field(default_factory=GridSlot)


class Adapter(ABC):
    """Knows where a denoiser's blocks, grids and call arguments are; one subclass per model family."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @abstractmethod
    def sites(self) -> list[Site]:
        """Every block that can be merged, in call order."""

    @abstractmethod
    def install_grid_hooks(self, sites: list[Site]) -> list[RemovableHandle]:
        """Hooks that fill each site's :class:`GridSlot` before its blocks run."""

    @abstractmethod
    def call_key(self, args: tuple, kwargs: dict) -> tuple[tuple[int, ...], float]:
        """``(input shape, timestep)`` of a denoiser call, from its forward arguments."""
