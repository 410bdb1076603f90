"""What every merge method provides to the shared adapters."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from typing import Any, Protocol

import torch

#: Sub-modules of a transformer block a method can run on merged tokens.
ROLES = ("attn", "cross", "mlp")


class Plan(Protocol):
    """A merge for one block call: ``merge`` ``(B, N, C) -> (B, K, C)``, ``unmerge`` ``(B, K, C) -> (B, N, C)``."""

    def merge(self, x: torch.Tensor) -> torch.Tensor: ...

    def unmerge(self, y: torch.Tensor) -> torch.Tensor: ...


class Method(ABC):
    """A token-merging method: a configuration that turns a block's tokens into a :class:`Plan`.

    Subclasses are frozen dataclasses (configuration only); state that lives across blocks and steps is kept in the
    ``cache`` dict the adapter hands to :meth:`plan` (one per reuse group, emptied at every new generation).
    """

    #: Downsampling levels (1 = full latent resolution) this method patches; blocks at larger ones run unmerged.
    max_downsample: int
    #: Step indices (0-based, per generation) on which merging is active; ``None``: every step.
    steps: Collection[int] | None

    @property
    @abstractmethod
    def roles(self) -> frozenset[str]:
        """The block sub-modules (a subset of :data:`ROLES`) that run on merged tokens."""

    @property
    def is_identity(self) -> bool:
        """True when the configuration changes nothing (e.g. ratio 0): the model is left unpatched."""
        return False

    def active(self, step: int) -> bool:
        return self.steps is None or step in self.steps

    @abstractmethod
    def plan(self, x: torch.Tensor, grid: tuple[int, int], cache: dict[str, Any], step: int) -> Plan | None:
        """Plan the merge of block tokens ``x`` ``(B, H*W, C)`` on an ``H x W`` grid at denoising ``step``."""


def check_common(max_downsample: int, steps: Collection[int] | None) -> None:
    """Validate the options all methods share."""
    if max_downsample < 1 or max_downsample & (max_downsample - 1):
        raise ValueError(f"max_downsample must be a power of two >= 1, got {max_downsample}")
    if steps is not None and any(int(s) != s or s < 0 for s in steps):
        raise ValueError(f"steps must be non-negative integers, got {steps!r}")
