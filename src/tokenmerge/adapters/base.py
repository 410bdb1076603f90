"""Merge sites: where a model's transformer blocks, their sub-modules and their token grids are."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenmerge.parallel import Band

#: Block placement: kind -> half-open index ranges ``((start, stop), ...)``, ``stop`` None = to the end.
Blocks = Mapping[str, tuple[tuple[int, int | None], ...]]
#: diffusers attention processors that run ``F.scaled_dot_product_attention`` with ``attention_mask`` added to the
#: self-attention scores: a plan's ``key_bias`` can go to them as that mask.
PLAIN_PROCESSORS = frozenset(
    {"AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor", "AttnProcessorNPU"}
)
#: diffusers attention backends (``model.set_attention_backend`` / ``attention_backend(...)``) that add a float
#: ``attn_mask`` to the scores; flash, sage, XLA and the rest take none.
MASK_BACKENDS = frozenset({"native", "_native_math", "_native_efficient", "_native_cudnn", "flex", "xformers"})


@dataclass(frozen=True, eq=False)
class Point:
    """A place in a block where tokens are merged or unmerged: the input (``side="input"``: the first argument or
    ``hidden_states``) or the output (``"output"``) of the sub-module ``name`` of ``parent``, looked up when the
    block runs, since a LoRA loaded or unloaded after ``apply`` (peft) replaces a ``Linear`` by a wrapper holding it
    as ``base_layer``, and back."""

    parent: nn.Module
    name: str
    side: str = "output"

    @property
    def module(self) -> nn.Module | None:
        return self.parent._modules.get(self.name)


@dataclass(eq=False)
class GridSlot:
    """The ``(H, W)`` token grid of the blocks it is shared by, written by a hook before they run; under context
    parallelism (adapters that find bands) the grid of this rank's ``band`` of image rows."""

    hw: tuple[int, int] | None = None
    band: Band | None = None


@dataclass(eq=False, kw_only=True)
class Site:
    """One transformer block that can run on merged tokens (keyword-only fields).

    ``modules`` maps a role (``attn``, ``cross``, ``mlp``) to the sub-module whose first input is the block's
    ``(B, N, C)`` image tokens and whose output is added back to the residual stream. ``group`` names the reuse group
    (blocks that share one plan per step); ``downsample`` is how many times smaller than the latent its grid is.

    Diffusion transformers add (all optional, empty for UNet blocks):

    - ``kind`` / ``index``: block kind (``double``, ``single``, ``joint``, ...) and index within it, for placement
      by index ranges;
    - ``extra_modules``: more sub-modules per role, hooked like ``modules`` (SD3.5's second self-attention);
    - ``spans``: a set of roles -> ``(entry, exit)`` :class:`Point` pair for joint sequences ``[text, image]``: the
      image suffix (the last ``H*W`` tokens) is merged at ``entry`` and unmerged at ``exit`` (an output), the text
      prefix passing through; the span whose roles are exactly the method's is used (Flux single-stream blocks,
      where attention and MLP run in parallel: ``{attn, mlp}`` norm output -> ``proj_out`` output, ``{attn}`` the
      attention's input -> output, ``{mlp}`` ``proj_mlp``'s input -> ``act_mlp``'s output);
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
    spans: dict[frozenset[str], tuple[Point, Point]] = field(default_factory=dict)
    kwarg_maps: dict[str, list[tuple[nn.Module, Callable[[dict, Any], dict]]]] = field(default_factory=dict)
    output_maps: dict[str, list[tuple[nn.Module, Callable[[Any, Any], Any]]]] = field(default_factory=dict)
    masks_keys: bool = False
    self_attention: list[nn.Module] = field(default_factory=list)

    def roles(self) -> frozenset[str]:
        """The roles that can run merged here (sub-modules and spans)."""
        return frozenset(self.modules).union(*self.spans)

    def attention_modules(self) -> list[nn.Module]:
        """The modules that compute this block's merged self-attention (the ``attn`` role)."""
        if "attn" in self.modules:
            return [self.modules["attn"], *self.extra_modules.get("attn", ())]
        return list(self.self_attention)

    def key_mask_problem(self) -> str | None:
        """Why this block's self-attention cannot take a key mask (a plan's ``key_bias``), or ``None`` if it can.

        A plain processor (:data:`PLAIN_PROCESSORS`) adds ``attention_mask`` to its scores; so does a site that passes
        the mask itself (``masks_keys``) to a processor on a :data:`MASK_BACKENDS` backend. The backend is the
        processor's own (``model.set_attention_backend``) or else the active one (``attention_backend(...)``).
        """
        for attention in self.attention_modules():
            processor = getattr(attention, "processor", None)
            name, backend = type(processor).__name__, attention_backend(processor)
            if name not in PLAIN_PROCESSORS and not self.masks_keys:
                return f"{self.name}: its {name} attention takes no attention mask"
            if backend is not None and backend not in MASK_BACKENDS:
                return f"{self.name}: the {backend!r} attention backend of its {name} takes no attention mask"
        return None

    def fused_projections(self) -> str | None:
        """The processor of a self-attention here whose query/key/value projections run fused (one ``to_qkv``, which
        keys/values plans cannot hook), or ``None``. diffusers' legacy ``Attention`` fuses by switching to a
        ``Fused*`` processor (``unfuse`` switches back); the newer attention modules (Flux) read their
        ``fused_projections`` flag."""
        from diffusers.models.attention_processor import Attention

        for attention in self.self_attention:
            processor = type(getattr(attention, "processor", None)).__name__
            flag = getattr(attention, "fused_projections", False) and not isinstance(attention, Attention)
            if processor.startswith("Fused") or flag:
                return processor
        return None


def attention_backend(processor: Any) -> str | None:
    """The diffusers attention backend a processor dispatches to (its own, else the active one), or ``None`` for
    processors that call ``F.scaled_dot_product_attention`` themselves."""
    if not hasattr(processor, "_attention_backend"):
        return None
    backend = processor._attention_backend
    if backend is None:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        backend = _AttentionBackendRegistry._active_backend
    return str(getattr(backend, "value", backend))


@dataclass(frozen=True)
class CallShape:
    """The size of one denoiser call: ``batch`` samples on a ``latent`` grid ``(H, W)`` (Flux: the packed token grid)
    with ``text`` text tokens."""

    batch: int
    latent: tuple[int, int]
    text: int


def example_tensor(
    shape: tuple[int, ...], generator: torch.Generator | None, device: Any = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Standard-normal values drawn on the CPU from ``generator`` (``None``: zeros, e.g. on the meta device)."""
    if generator is None:
        return torch.zeros(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


class Adapter(ABC):
    """Knows where a denoiser's blocks, grids and call arguments are; one subclass per model family."""

    #: ``"unet"`` (blocks placed by ``max_downsample``) or ``"dit"`` (a diffusion transformer: placed by ``blocks``).
    family: ClassVar[str] = "dit"
    #: Image pixels per latent cell along each side (the VAE's 8; Flux packs 2x2 latents into a token: 16).
    pixels_per_cell: ClassVar[int] = 8
    #: Text tokens of a call at the pipelines' default prompt length.
    text_tokens: ClassVar[int] = 77
    #: Position of ``encoder_hidden_states`` among the forward's arguments.
    text_index: ClassVar[int] = 1
    #: Whether the adapter finds each rank's band of image rows under diffusers' context parallelism
    #: (:attr:`GridSlot.band`); the patch refuses to run under context parallelism on other models.
    finds_bands: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._sites: list[Site] | None = None

    def default_blocks(self) -> Blocks:
        """Block kind -> index ranges ``((start, stop), ...)`` (half-open, ``stop`` None = to the end) merged when a
        method sets no ``blocks``; kinds absent here cannot be placed by index (UNet: placement by
        ``max_downsample``)."""
        return {}

    def select(self, sites: list[Site], blocks: Blocks | None) -> list[Site]:
        """The sites to patch: those whose ``index`` lies in a range of their ``kind`` (``blocks`` overrides
        :meth:`default_blocks` per kind); sites without a kind are always kept. Raises ``ValueError`` on unknown
        kinds and on ranges past a kind's block count."""
        blocks = dict(blocks or {})
        defaults = self.default_blocks()
        unknown = blocks.keys() - defaults.keys()
        if unknown:
            known = ", ".join(sorted(defaults)) or "none: this model is placed by max_downsample"
            raise ValueError(f"unknown block kinds {sorted(unknown)} for {type(self.model).__name__}; kinds: {known}")
        ranges = {**defaults, **blocks}
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

    def sites(self) -> list[Site]:
        """Every block that can be merged, in call order: found once (:meth:`find_sites`), so that every caller sees
        the same sites and grid slots, the ones the grid hooks fill."""
        if self._sites is None:
            self._sites = self.find_sites()
        return list(self._sites)

    @abstractmethod
    def find_sites(self) -> list[Site]:
        """Every block that can be merged, in call order."""

    @abstractmethod
    def install_grid_hooks(self, sites: list[Site]) -> list[RemovableHandle]:
        """Hooks that fill each site's :class:`GridSlot` before its blocks run."""

    def start_generation(self) -> None:  # noqa: B027 (optional hook: most adapters keep nothing per generation)
        """Forget what the adapter read for the previous generation (called at every new generation or shape)."""

    def native_shape(self, batch: int = 1) -> CallShape:
        """The call shape at the model's native resolution: its config's ``sample_size`` latent (1024 pixels when it
        has none) with :attr:`text_tokens`."""
        side = getattr(self.model.config, "sample_size", None) or 1024 // self.pixels_per_cell
        side = side[0] if isinstance(side, list | tuple) else int(side)
        return CallShape(batch, (side, side), self.text_tokens)

    def shape_at(self, height: int, width: int, batch: int = 1) -> CallShape:
        """The call shape of a ``height x width`` pixel image (sides a multiple of :attr:`pixels_per_cell`)."""
        cell = self.pixels_per_cell
        if height % cell or width % cell:
            raise ValueError(f"{type(self.model).__name__} takes images whose sides are multiples of {cell} pixels")
        return CallShape(batch, (height // cell, width // cell), self.text_tokens)

    @abstractmethod
    def example_inputs(
        self, shape: CallShape, generator: torch.Generator | None = None, device: Any = None, dtype: Any = None
    ) -> dict[str, Any]:
        """Keyword inputs of one call of ``shape`` (:func:`example_tensor`: random from ``generator``, else zeros, e.g.
        on the meta device; float tensors in ``dtype``)."""

    def call_shape(self, args: tuple, kwargs: dict) -> CallShape | None:
        """The :class:`CallShape` of a call from its arguments' shapes (no values read), or ``None``. Default: a
        ``(B, C, H, W)`` latent ``hidden_states`` (or ``sample``) with ``encoder_hidden_states`` ``(B, T, D)``."""
        x = kwargs.get("hidden_states", kwargs.get("sample", args[0] if args else None))
        text = call_arg(args, kwargs, "encoder_hidden_states", self.text_index)
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            return None
        tokens = text.shape[1] if isinstance(text, torch.Tensor) and text.ndim == 3 else 0
        return CallShape(x.shape[0], (x.shape[-2], x.shape[-1]), tokens)

    @abstractmethod
    def call_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple[int, ...], Any]:
        """``(input shape, timestep)`` of a denoiser call, from its forward arguments; the timestep as given (a
        tensor or a number), so that nothing is read from the device unless the caller needs its value."""


def call_arg(args: tuple, kwargs: dict, name: str, index: int) -> Any:
    """Forward argument ``name`` (keyword) or at position ``index``, or ``None``."""
    return kwargs[name] if name in kwargs else (args[index] if len(args) > index else None)
