"""What every merge method provides to the patch: a validated configuration that turns block tokens into plans."""

from __future__ import annotations

import dataclasses
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Collection, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from tokenmerge.parallel import Band, ContextParallel
from tokenmerge.plans import KVPlan, MergePlan

#: Sub-modules of a transformer block a method can run on merged tokens.
ROLES = ("attn", "cross", "mlp")
#: An option value meaning "the method's default for the model's family", made concrete by :meth:`Method.resolve`.
AUTO = "auto"


def is_auto(value: Any) -> bool:
    """True for :data:`AUTO` (only a string compares: tensors and arrays never do)."""
    return isinstance(value, str) and value == AUTO


@dataclass(frozen=True)
class Layout:
    """Where a denoiser's mergeable blocks are: ``family`` ``"unet"`` (placed by ``max_downsample`` over its
    ``levels``, the downsampling factors that have transformer blocks) or ``"dit"`` (placed by index ranges per
    block kind; ``kinds``: kind -> number of blocks)."""

    family: str
    levels: tuple[int, ...] = ()
    kinds: Mapping[str, int] = field(default_factory=dict)

    def everywhere(self) -> dict[str, Any]:
        """The options that place a method at every block: every UNet level, every block of every DiT kind."""
        if self.family == "unet":
            return {"max_downsample": max(self.levels, default=1)}
        return {"blocks": {kind: (0, None) for kind in self.kinds}}


class ModelView(Protocol):
    """What :meth:`Method.resolve` may ask about the model a method is applied to (built by ``tm.apply`` from the
    model's adapter)."""

    @property
    def layout(self) -> Layout: ...

    def key_mask_problem(self, method: Method) -> str | None:
        """Why a self-attention that the concrete ``method`` would patch cannot take a key mask, or ``None``."""

    def flop_ratio(self, method: Method) -> float | None:
        """FLOPs of an unpatched denoiser call at the model's native resolution over those of its first merged call
        with the concrete ``method`` (content-adaptive methods: the most they can cut), or ``None`` when they cannot
        be counted."""


@dataclass(frozen=True)
class LayoutView:
    """A :class:`ModelView` of a model known by its layout alone (a sweep planned without the model): every site
    takes a key mask."""

    layout: Layout

    def key_mask_problem(self, method: Method) -> str | None:
        return None

    def flop_ratio(self, method: Method) -> float | None:
        return None


@dataclass(eq=False)
class Generation:
    """What every block shares during one generation (made new at each): the steps it runs (the scheduler's count
    less those an img2img ``strength`` skips; ``None`` for a bare denoiser), a random generator methods draw from
    in block call order (made at the first draw) and, under context parallelism, the band of image rows this rank
    holds (set before its first plan; ``None``: the whole image).

    ``merged_fraction``: set when FLOPs are counted on a weightless twin (meta tensors carry no similarities):
    methods whose merge count depends on the content (CA-ToMe's threshold) merge this fraction of their candidate
    sources instead, so that the count is exact for that fraction.
    """

    num_steps: int | None = None
    rng: torch.Generator | None = None
    band: Band | None = None
    merged_fraction: float | None = None


@dataclass(eq=False)
class PlanCache:
    """What one reuse group (``Method.cache_scope = "group"``) or block (``"block"``) keeps for one generation.

    Methods that keep more subclass it (:attr:`Method.cache_type`). ``fresh`` is cleared at every new step: a method
    that computed the plan for the rest of a step (the first block of a group) sets it.
    """

    generation: Generation
    fresh: bool = False


@dataclass(frozen=True)
class Method(ABC):
    """A token-merging method: a frozen, validated configuration that turns a block's tokens into a plan
    (:class:`tokenmerge.plans.MergePlan`, or :class:`~tokenmerge.plans.KVPlan` for ``keys_values`` methods).

    Options shared by every method (keyword-only):

    - ``max_downsample``: merge in blocks whose grid is at most this many times smaller than the latent (UNets);
      ``None``: the finest level that has attention in the model (SD 1.x: 1, SDXL: 2), resolved at ``apply``;
      :data:`AUTO`: the method's own choice, made by :meth:`resolve` (methods without one: ``None``);
    - ``steps``: the 0-based denoising steps at which merging is active (``None``: all), kept as a ``frozenset``;
    - ``blocks``: diffusion transformers: merged block index ranges per kind (see :func:`parse_blocks`); kinds not
      given keep the adapter's default placement.

    Subclasses validate and normalise their own options in :meth:`validate`; everything is checked at construction,
    what depends on the model at ``apply`` (which first calls :meth:`resolve` with a view of the model).
    """

    max_downsample: int | str | None = field(default=None, kw_only=True)
    steps: Collection[int] | None = field(default=None, kw_only=True)
    blocks: Mapping[str, Any] | None = field(default=None, kw_only=True)

    #: ``"group"``: one cache per reuse group (a level's blocks share plans); ``"block"``: one per block.
    cache_scope: ClassVar[str] = "group"
    #: The cache handed to :meth:`plan`; made new at every generation.
    cache_type: ClassVar[type[PlanCache]] = PlanCache
    #: True for keys/values methods (plans are :class:`~tokenmerge.plans.KVPlan`): hooked at the self-attention's
    #: key and value projections instead of merging sub-module inputs.
    keys_values: ClassVar[bool] = False
    #: True when how many tokens merge depends on the content (a similarity threshold): FLOPs are then counted at a
    #: given fraction of the candidates merged (:attr:`Generation.merged_fraction`).
    content_adaptive: ClassVar[bool] = False
    #: Whether plans made on one rank's band of whole image rows (context parallelism) are the whole image's plans
    #: restricted to the band, up to :meth:`check_band`: methods that decide within tiles or cells at fixed grid
    #: positions (ToMA, ToDo). Methods that match across the whole image (ToMeSD, CA-ToMe) are refused there.
    band_local: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.validate()
        if not self.roles <= set(ROLES):
            raise ValueError(f"roles must be a subset of {ROLES}, got {sorted(self.roles)}")
        if self.max_downsample is not None and not is_auto(self.max_downsample):
            downsample = integer("max_downsample", self.max_downsample, 1)
            if downsample & (downsample - 1):
                raise ValueError(f"max_downsample must be a power of two >= 1 or None, got {downsample}")
            self._set("max_downsample", downsample)
        self._set("steps", step_set(self.steps))
        self._set("blocks", parse_blocks(self.blocks))

    def validate(self) -> None:  # noqa: B027 (optional: methods without options of their own)
        """Check and normalise this method's own options (raise ``TypeError``/``ValueError`` naming the option)."""

    def resolve(self, model: ModelView) -> Method:
        """This configuration on ``model`` with every :data:`AUTO` option made concrete; raises ``ValueError`` if
        the concrete options conflict. Default: ``max_downsample=AUTO`` becomes ``None``."""
        return dataclasses.replace(self, max_downsample=None) if is_auto(self.max_downsample) else self

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def describe(self, layout: Layout | None = None) -> str:
        """The options that differ from their defaults, main knob first: ``ToMeSD(ratio=0.6, max_downsample=2)``;
        on a model of ``layout``, without the options that mean nothing there (``max_downsample`` on a diffusion
        transformer, whose blocks are all at the latent's resolution)."""
        moot = {"max_downsample"} if layout is not None and layout.family != "unet" else set()
        options = sorted(dataclasses.fields(self), key=lambda f: f.kw_only)
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in options
            if f.init
            and f.name not in moot
            and f.default is not dataclasses.MISSING
            and getattr(self, f.name) != f.default
        ]
        return f"{type(self).__name__}({', '.join(changed)})"

    @property
    @abstractmethod
    def roles(self) -> frozenset[str]:
        """The block sub-modules (a subset of :data:`ROLES`) that run on merged tokens."""

    @property
    def is_identity(self) -> bool:
        """True when the configuration changes nothing (e.g. ratio 0): the model is left unpatched."""
        return False

    def mergeable(self, grid: tuple[int, int]) -> int:
        """At most how many of a block's tokens on ``grid`` a plan merges away (a content-adaptive method's merged
        fraction is of these). Default: all of them."""
        return grid[0] * grid[1]

    def cut_more(self, layout: Layout) -> list[Method]:
        """Configurations of this method that run more of a model of ``layout`` on fewer tokens, most faithful first
        (named when this one cuts too little of the model's FLOPs). Default: every block."""
        try:
            return [dataclasses.replace(self, **layout.everywhere())]
        except ValueError:
            return []

    @property
    def key_mask_option(self) -> tuple[str, str] | None:
        """When plans may carry a ``key_bias`` (the patched self-attentions must then take a mask): the option that
        makes them and what to do where no mask can be taken; ``None``: plans never carry one."""
        return None

    @property
    def plan_type(self) -> type:
        """The plan type (:mod:`tokenmerge.plans`) every plan of this method is."""
        return KVPlan if self.keys_values else MergePlan

    def active(self, step: int) -> bool:
        return self.steps is None or step in self.steps

    def first_active(self, limit: int = 1000) -> int | None:
        """The first 0-based step (below ``limit``) at which merging is active, or ``None``."""
        return next((step for step in range(limit) if self.active(step)), None)

    def phase(self, step: int, num_steps: int | None) -> Hashable:
        """What a plan at 0-based ``step`` of a ``num_steps`` generation depends on, handed to :meth:`plan`.

        A compiled model specialises on it (one graph per distinct value), so methods keep few values: ToMA whether
        destinations / weights are due, CA-ToMe whether the step is a checkpoint, ``None`` for methods that do not
        depend on the step. Default: the step itself.
        """
        return step

    def check_parallel(self, setting: ContextParallel) -> None:
        """Raise ``ValueError`` unless this method can run under context parallelism ``setting`` (each rank plans
        on its band of image rows): only :attr:`band_local` methods can."""
        if not self.band_local:
            raise ValueError(
                f"{self.describe()} cannot run under context parallelism ({setting.describe()}): it matches tokens "
                "across the whole image, and each rank holds only a band of its rows, so the result would differ from "
                "a single-device run; use ToMA or ToDo, or run without context parallelism"
            )

    def check_band(self, band: Band) -> str | None:
        """For a :attr:`band_local` method on one rank's ``band`` of whole rows: raise ``ValueError`` (naming
        ``band.setting``) if it cannot run there; else how its result differs from a single-device run (the patch
        warns once), or ``None`` where it equals it."""
        return None

    def new_cache(self, generation: Generation | None = None) -> PlanCache:
        """An empty cache of :attr:`cache_type` for ``generation`` (default: a new one)."""
        return self.cache_type(generation or Generation())

    @abstractmethod
    def plan(self, x: torch.Tensor, grid: tuple[int, int], cache: PlanCache, phase: Hashable) -> Any:
        """Plan the merge of block tokens ``x`` ``(B, H*W, C)`` on an ``H x W`` grid in the current step's ``phase``:
        a plan of :attr:`plan_type`, or ``None`` to run this block call unmerged."""


class FlagRoles:
    """Mixin of methods whose ``merge_attn`` / ``merge_crossattn`` / ``merge_mlp`` flags choose the merged roles."""

    merge_attn: bool
    merge_crossattn: bool
    merge_mlp: bool

    def cut_more(self, layout: Layout) -> list[Method]:
        """Whole blocks (every flag set) where this is placed, then at every block."""
        whole = {"merge_attn": True, "merge_crossattn": True, "merge_mlp": True}
        out = []
        for options in (whole, {**whole, **layout.everywhere()}):
            try:
                out.append(dataclasses.replace(self, **options))  # type: ignore[type-var]
            except ValueError:
                pass
        return out

    @property
    def roles(self) -> frozenset[str]:
        return flag_roles(self.merge_attn, self.merge_crossattn, self.merge_mlp)

    def check_flags(self) -> None:
        """Type-check the flags (``Method.__post_init__`` then checks that at least one is set)."""
        for name in ("merge_attn", "merge_crossattn", "merge_mlp"):
            boolean(name, getattr(self, name))


def flag_roles(merge_attn: bool, merge_crossattn: bool, merge_mlp: bool) -> frozenset[str]:
    """The roles switched on by the ``merge_attn`` / ``merge_crossattn`` / ``merge_mlp`` flags (at least one)."""
    roles = frozenset(role for role, on in zip(ROLES, (merge_attn, merge_crossattn, merge_mlp), strict=True) if on)
    if not roles:
        raise ValueError("at least one of merge_attn, merge_crossattn, merge_mlp must be set")
    return roles


# ---- option checks: one clear TypeError / ValueError naming the option ---------------------------------------------


def integer(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an ``int`` (any integral number but ``bool``), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def real(name: str, value: Any, low: float, high: float, *, high_open: bool = False, low_open: bool = False) -> float:
    """``value`` as a finite ``float`` (any real number but ``bool``) in ``[low, high]`` (ends open as told)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = " (use float(...))" if isinstance(value, torch.Tensor) else ""
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}{hint}")
    value = float(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if not math.isfinite(value) or below or above:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value}")
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def step_set(steps: Any) -> frozenset[int] | None:
    """``steps`` (``None`` or a collection of non-negative integers) as a ``frozenset``; a one-shot iterator is read
    once here, not consumed by validation."""
    if steps is None:
        return None
    if isinstance(steps, str | bytes | numbers.Number | torch.Tensor) or not isinstance(steps, Iterable):
        raise TypeError(
            f"steps must be None or a collection of 0-based step indices (e.g. range(0, 50, 2)), got "
            f"{type(steps).__name__} {steps!r}"
        )
    return frozenset(integer("steps", s, 0) for s in steps)


def parse_blocks(blocks: Mapping[str, Any] | None) -> dict[str, tuple[tuple[int, int | None], ...]] | None:
    """Normalise block placement ``{kind: ranges}`` to half-open ``(start, stop)`` pairs (``stop`` None = to the end).

    A kind's ranges are a ``range`` (step 1), a ``(start, stop)`` pair or a list of them, e.g.
    ``{"double": (5, None), "single": [range(0, 4), (10, 20)]}``; an empty list merges none of that kind. An empty
    mapping names no kind, which would silently mean the default placement: a ``ValueError``.
    """
    if blocks is None:
        return None
    if not isinstance(blocks, Mapping):
        raise TypeError(f"blocks must be a mapping of block kind to index ranges, got {type(blocks).__name__}")
    if not blocks:
        raise ValueError(
            "blocks={} names no block kind: use None for the default placement, or e.g. {'single': []} to merge no "
            "block of a kind"
        )
    out = {}
    for kind, spec in blocks.items():
        items = [spec] if isinstance(spec, range) or _is_pair(spec) else spec
        if not isinstance(items, list | tuple):
            raise ValueError(f"blocks[{kind!r}] must be a range, a (start, stop) pair or a list of them, got {spec!r}")
        pairs = []
        for item in items:
            if isinstance(item, range):
                if item.step != 1:
                    raise ValueError(f"blocks[{kind!r}]: ranges must have step 1, got {item!r}")
                item = (item.start, item.stop)
            if not _is_pair(item):
                raise ValueError(f"blocks[{kind!r}]: expected (start, stop), got {item!r}")
            start, stop = item
            if start < 0 or (stop is not None and stop <= start):
                raise ValueError(f"blocks[{kind!r}]: need 0 <= start < stop, got ({start}, {stop})")
            pairs.append((int(start), None if stop is None else int(stop)))
        out[str(kind)] = tuple(pairs)
    return out


def _is_pair(item: Any) -> bool:
    return (
        isinstance(item, tuple | list)
        and len(item) == 2
        and isinstance(item[0], numbers.Integral)
        and not isinstance(item[0], bool)
        and (item[1] is None or (isinstance(item[1], numbers.Integral) and not isinstance(item[1], bool)))
    )


def check_ratio(ratio: Any) -> float:
    """``ratio``, the fraction of tokens removed, as a float in ``[0, 1)``."""
    return real("ratio", ratio, 0.0, 1.0, high_open=True)


def check_tile(tile: Any) -> tuple[int, int]:
    """``tile`` as ``(tile_h, tile_w)`` positive integers; an integer ``t`` is the square tile ``(t, t)``."""
    if isinstance(tile, numbers.Integral) and not isinstance(tile, bool):
        tile = (tile, tile)
    if not isinstance(tile, tuple | list):
        raise TypeError(f"tile must be (tile_h, tile_w) or an integer, got {type(tile).__name__} {tile!r}")
    if len(tile) != 2:
        raise ValueError(f"tile must be two integers (tile_h, tile_w), got {tile!r}")
    return integer("tile height", tile[0], 1), integer("tile width", tile[1], 1)
