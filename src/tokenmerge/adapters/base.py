"""Merge sites: where a model's transformer blocks, their sub-modules and their token grids are."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn
from torch.utils.hooks import RemovableHandle

#: Block placement: kind -> half-open index ranges ``((start, stop), ...)``, ``stop`` None = to the end.
Blocks = Mapping[str, tuple[tuple[int, int | None], ...]]


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

    Diffusion transformers add (all optional, empty for UNet blocks):

    - ``kind`` / ``index``: block kind (``double``, ``single``, ``joint``, ...) and index within it, for placement
      by index ranges;
    - ``extra_modules``: more sub-modules per role, hooked like ``modules`` (SD3.5's second self-attention);
    - ``spans``: role -> ``(entry, exit)`` for joint sequences ``[text, image]``: the image suffix (the last ``H*W``
      tokens) of ``entry``'s output is merged and that of ``exit``'s output unmerged, the text prefix passing through
      (Flux single-stream blocks: norm -> attention and parallel MLP -> ``proj_out``);
    - ``kwarg_maps`` / ``output_maps``: role -> ``[(module, fn)]``: while the role runs merged, ``module``'s keyword
      arguments become ``fn(kwargs, plan)`` / its output ``fn(output, plan)`` (rotary positions of merged tokens);
    - ``masks_keys``: the ``attn`` kwarg maps pass a plan's ``key_bias`` to the attention themselves (joint attention
      that takes a mask); otherwise only a plain self-attention processor can take one.

    ``self_attention``: the attention modules whose keys and values a keys/values plan (ToDo) projects from the
    downsampled image tokens, the last ``H*W`` tokens of their ``to_k``/``to_v`` inputs (all of them for a plain
    self-attention, the image part of Flux's single-stream joint sequence).

    A module output that is a tuple carries the image tokens in its first element (joint attention).
    """

    name: str
    block: nn.Module
    modules: dict[str, nn.Module]
    group: str
    downsample: int
    grid: GridSlot = field(default_factory=GridSlot)
    kind: str | None = None
    index: int = 0
    extra_modules: dict[str, list[nn.Module]] = field(default_factory=dict)
    spans: dict[str, tuple[nn.Module, nn.Module]] = field(default_factory=dict)
    kwarg_maps: dict[str, list[tuple[nn.Module, Callable[[dict, Any], dict]]]] = field(default_factory=dict)
    output_maps: dict[str, list[tuple[nn.Module, Callable[[Any, Any], Any]]]] = field(default_factory=dict)
    masks_keys: bool = False
    self_attention: list[nn.Module] = field(default_factory=list)


class Adapter(ABC):
    """Knows where a denoiser's blocks, grids and call arguments are; one subclass per model family."""

    #: Block kind -> index ranges ``((start, stop), ...)`` (half-open, ``stop`` None = to the end) merged when a
    #: method sets no ``blocks``; kinds absent here cannot be placed by index (UNet: placement by ``max_downsample``).
    default_blocks: ClassVar[Blocks] = {}

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def select(self, sites: list[Site], blocks: Blocks | None) -> list[Site]:
        """The sites to patch: those whose ``index`` lies in a range of their ``kind`` (``blocks`` overrides
        :attr:`default_blocks` per kind); sites without a kind are always kept. Raises ``ValueError`` on unknown
        kinds and on ranges past a kind's block count."""
        blocks = dict(blocks or {})
        unknown = blocks.keys() - self.default_blocks.keys()
        if unknown:
            known = ", ".join(sorted(self.default_blocks)) or "none: this model is placed by max_downsample"
            raise ValueError(f"unknown block kinds {sorted(unknown)} for {type(self.model).__name__}; kinds: {known}")
        ranges = {**self.default_blocks, **blocks}
        counts: dict[str, int] = {}
        for site in sites:
            if site.kind is not None:
                counts[site.kind] = max(counts.get(site.kind, 0), site.index + 1)
        for kind, spans in blocks.items():
            for start, stop in spans:
                if start >= counts.get(kind, 0) or (stop is not None and stop > counts.get(kind, 0)):
                    raise ValueError(
                        f"{kind} block range ({start}, {stop}) is out of bounds: the model has {counts.get(kind, 0)}"
                    )
        return [
            s
            for s in sites
            if s.kind is None
            or any(start <= s.index and (stop is None or s.index < stop) for start, stop in ranges.get(s.kind, ()))
        ]

    @abstractmethod
    def sites(self) -> list[Site]:
        """Every block that can be merged, in call order."""

    @abstractmethod
    def install_grid_hooks(self, sites: list[Site]) -> list[RemovableHandle]:
        """Hooks that fill each site's :class:`GridSlot` before its blocks run."""

    def start_generation(self) -> None:  # noqa: B027 (optional hook: most adapters keep nothing per generation)
        """Forget what the adapter read for the previous generation (called at every new generation or shape)."""

    @abstractmethod
    def call_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple[int, ...], Any]:
        """``(input shape, timestep)`` of a denoiser call, from its forward arguments; the timestep as given (a
        tensor or a number), so that nothing is read from the device unless the caller needs its value."""
