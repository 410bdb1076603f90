"""What ``tokenmerge pareto`` sweeps: settings (configurations that apply themselves to a pipeline), and the table of
per-method placement presets x knob values they are built from.

A :class:`Setting` is anything with a label, a family (one colour per family on the plot), a preset name, a knob
and its value, a ``default`` flag, and ``apply(target)`` / ``remove(target)``: today a tokenmerge method
(:class:`MethodSetting`), later a step-cache configuration or a stack of both. :data:`SWEEPS` holds, per method,
its main knob, the values swept (full and ``--quick``) and named :class:`Preset` s: fixed options plus a named
placement (:data:`PLACEMENTS`) resolved against the model's :class:`Layout` (UNet levels or DiT block kinds). A
placement that does not exist on the model (a UNet level on a DiT), an option the method does not take, or a setting
identical to one already in the sweep is skipped with its reason, before anything runs. Adding a preset is one line
in :data:`SWEEPS`, e.g. ``Preset("stable", {"stable": True})``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import tokenmerge as tm
from tokenmerge.api import view_of
from tokenmerge.errors import HarnessError
from tokenmerge.harness.registry import methods
from tokenmerge.methods.base import Layout, LayoutView, ModelView, is_auto

logger = logging.getLogger(__name__)

Options = Mapping[str, Any]


class Setting(Protocol):
    """One configuration of a sweep: what it is (for tables, colours and the targets) and how to put it on a
    pipeline (or denoiser) and take it off again, leaving the model exactly as it was."""

    @property
    def label(self) -> str: ...

    @property
    def family(self) -> str: ...

    @property
    def preset(self) -> str: ...

    @property
    def knob(self) -> str | None: ...

    @property
    def value(self) -> float | None: ...

    @property
    def default(self) -> bool: ...

    def apply(self, target: Any) -> None: ...

    def remove(self, target: Any) -> None: ...


@dataclass(frozen=True)
class MethodSetting:
    """A tokenmerge method as a sweep setting (``method=None``: the unaccelerated baseline). ``projected``: the same
    setting made concrete for other architectures (a label such as ``sdxl@1024`` -> the method there), whose FLOPs a
    projected front counts (:mod:`tokenmerge.harness.projection`)."""

    method: tm.Method | None
    family: str = "baseline"
    preset: str = "default"
    knob: str | None = None
    value: float | None = None
    default: bool = False
    projected: Mapping[str, tm.Method] = field(default_factory=dict, compare=False, hash=False)

    @property
    def label(self) -> str:
        if self.family == "baseline":
            return "baseline"
        name = f"{self.family}:{self.knob}={self.value:g}" if self.knob is not None else self.family
        return name if self.preset == "default" else f"{name}@{self.preset}"

    def apply(self, target: Any) -> None:
        if self.method is not None:
            tm.apply(target, self.method)

    def remove(self, target: Any) -> None:
        if self.method is not None:
            tm.remove(target)


BASELINE = MethodSetting(None)


def layout_of(target: Any) -> Layout:
    """The :class:`Layout` of a pipeline's (or a denoiser's) blocks, from its tokenmerge adapter."""
    return view_of(target).layout


#: Named placements: layout -> the options that place a method there, or ``None`` where the layout has no such place.
PLACEMENTS: dict[str, Callable[[Layout], Options | None]] = {
    "model": lambda layout: {},  # the method's own default placement (plus the model's method defaults)
    "top": lambda layout: {"max_downsample": 1} if layout.family == "unet" else None,
    "two": lambda layout: (
        {"max_downsample": 2} if layout.family == "unet" and max(layout.levels, default=1) > 1 else None
    ),
    "every": Layout.everywhere,
    "late": lambda layout: (
        {"blocks": {kind: (n // 2, None) for kind, n in layout.kinds.items()}} if layout.family == "dit" else None
    ),
}


@dataclass(frozen=True)
class Preset:
    """Fixed ``options`` of a method and a named ``placement`` (a key of :data:`PLACEMENTS`); ``values`` /
    ``quick_values``: knob values swept for this preset instead of the method's (full / ``--quick`` sweeps), e.g. the
    larger ratios of a keys/values mode; ``explore=False``: an ablation kept to document a mechanism, left out of
    ``tm.tune``'s search."""

    name: str
    options: Options = field(default_factory=dict)
    placement: str = "model"
    doc: str = ""
    values: tuple[Any, ...] | None = None
    quick_values: tuple[Any, ...] | None = None
    explore: bool = True

    def grid(self, sweep: MethodSweep, quick: bool) -> tuple[Any, ...]:
        """The knob values swept for this preset of ``sweep``."""
        if quick:
            return self.quick_values or self.values or sweep.quick_values
        return self.values or sweep.values


@dataclass(frozen=True)
class MethodSweep:
    """A method's main ``knob``, the ``values`` swept (``quick_values`` with ``--quick``) and its ``presets`` (those
    named in ``quick_presets`` with ``--quick``). The method's default value is always added to the default preset."""

    knob: str
    values: tuple[Any, ...]
    quick_values: tuple[Any, ...]
    presets: tuple[Preset, ...]
    quick_presets: tuple[str, ...] = ("default",)

    def preset(self, name: str) -> Preset:
        return next(p for p in self.presets if p.name == name)


ATTN_ONLY: Options = {"merge_crossattn": False, "merge_mlp": False}
TOKENS: Options = {"mode": "tokens"}
#: ToMA's keys/values mode as measured best on the 32x32 reference UNet (docs/benchmarks.md, "ToMA variants").
KV: Options = {"mode": "kv", "locality": 0.05}
KV_GRID: Options = {"values": (0.5, 0.625, 0.75, 0.875, 0.9375), "quick_values": (0.5, 0.75, 0.9375)}
ABLATION: Options = {**KV_GRID, "explore": False}
WHOLE_BLOCK: Options = {"merge_attn": True, "merge_crossattn": True, "merge_mlp": True}

#: Registry name (``tokenmerge list``) -> its sweep.
SWEEPS: dict[str, MethodSweep] = {
    "toma": MethodSweep(
        knob="ratio",
        values=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75),
        quick_values=(0.25, 0.5, 0.75),
        presets=(
            Preset("default", doc="mode and placement auto: chosen per model from its FLOPs (ToMA.resolve)"),
            Preset("tokens", TOKENS, doc="tokens mode: whole blocks (self-attention, cross-attention, MLP), <= 4x"),
            Preset("attn", {**TOKENS, **ATTN_ONLY}, doc="tokens mode, self-attention only, same levels / blocks"),
            Preset("top", {**TOKENS, **ATTN_ONLY}, "top", doc="UNet: tokens mode, self-attention at the top level"),
            Preset("kv", KV, doc="keys/values mode, locality 0.05, finest UNet level", **KV_GRID),
            Preset("kvnolocal", {"mode": "kv"}, doc="the kv preset without the prior", **ABLATION),
            Preset("kvmerged", {**KV, "kv_tokens": "merged"}, doc="kv with averaged keys/values", **ABLATION),
            Preset(
                "authors",
                {**TOKENS, "merge_every": 3, "dest_every": 1, "weight_every": 1},
                doc="the authors' schedule: tokens mode, merge every third step, fresh destinations at each",
            ),
            Preset("every", TOKENS, placement="every", doc="tokens mode at every UNet level / every DiT block"),
            Preset("late", TOKENS, placement="late", doc="DiT: tokens mode in the second half of each block kind"),
        ),
        quick_presets=("default", "tokens", "kv"),
    ),
    "tomesd": MethodSweep(
        knob="ratio",
        values=(0.25, 0.375, 0.5, 0.625, 0.75),
        quick_values=(0.25, 0.5, 0.75),
        presets=(
            Preset("default", doc="tomesd's default: self-attention at the top level"),
            Preset(
                "toma", {**WHOLE_BLOCK, "max_downsample": 4}, doc="ToMA's tokens mode placement: whole blocks, <= 4x"
            ),
            Preset("every", placement="every", doc="every UNet level / every DiT block"),
        ),
    ),
    "catome": MethodSweep(
        knob="threshold",
        values=(0.9, 0.8, 0.7, 0.6, 0.5),
        quick_values=(0.9, 0.7, 0.5),
        presets=(Preset("default", doc="self-attention at the top level, config3 checkpoints"),),
    ),
    "todo": MethodSweep(
        knob="factor",
        values=(2, 3, 4),
        quick_values=(2, 4),
        presets=(
            Preset("default", doc="keys/values of the top level's self-attention"),
            Preset("two", placement="two", doc="UNet: levels <= 2x"),
            Preset("every", placement="every", doc="every UNet level / every DiT block"),
        ),
    ),
}


@dataclass(frozen=True)
class Skipped:
    """A setting left out of the sweep, and why."""

    label: str
    reason: str


@dataclass(frozen=True)
class SweepPlan:
    """The settings to measure (baseline first) and those skipped."""

    settings: list[Setting]
    skipped: list[Skipped]


@dataclass(frozen=True)
class Selection:
    """Which methods, presets and values to sweep; ``None`` entries mean every method / the table's presets /
    its values (the quick ones when ``quick``)."""

    methods: Sequence[str] | None = None
    presets: Mapping[str, Sequence[str]] = field(default_factory=dict)
    values: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    quick: bool = False

    def check(self) -> None:
        """Raise :class:`HarnessError` for unknown methods or presets and impossible knob values."""
        known = methods()
        for name in [*(self.methods or ()), *self.presets, *self.values]:
            if name not in SWEEPS:
                have = "no sweep is defined for it" if name in known else "unknown method"
                raise HarnessError(f"{name!r}: {have}; sweepable methods: {', '.join(SWEEPS)}")
        for name in [*self.presets, *self.values]:
            if self.methods is not None and name not in self.methods:
                raise HarnessError(f"presets or values given for {name!r}, which is not among the swept methods")
        for name, presets in self.presets.items():
            names = [p.name for p in SWEEPS[name].presets]
            for preset in presets:
                if preset not in names:
                    raise HarnessError(f"{name} has no preset {preset!r}; presets: {', '.join(names)}")
        for name, values in self.values.items():
            knob = SWEEPS[name].knob
            for value in values:
                try:
                    known[name](**{knob: value})
                except (ValueError, TypeError) as exc:
                    raise HarnessError(f"{name} {knob}={value!r}: {exc}") from None

    def chosen(self) -> list[str]:
        return list(self.methods) if self.methods is not None else list(SWEEPS)


def _project(
    cls: type[tm.Method], recipe: Options, placement: str, projections: Sequence[tuple[str, ModelView]]
) -> dict[str, tm.Method]:
    """``cls(**recipe)`` placed by ``placement`` and made concrete on each projection's model (those where the
    placement exists and the options fit)."""
    out = {}
    for label, view in projections:
        placed = PLACEMENTS[placement](view.layout)
        if placed is not None:
            with contextlib.suppress(ValueError, TypeError):
                out[label] = cls(**recipe, **placed).resolve(view)
    return out


def _follow(method: tm.Method, concrete: tm.Method) -> tm.Method:
    """``method`` with every option it leaves ``"auto"`` set to ``concrete``'s value of it."""
    auto = {f.name: getattr(concrete, f.name) for f in dataclasses.fields(method) if is_auto(getattr(method, f.name))}
    return dataclasses.replace(method, **auto) if auto else method


def _knob_default(cls: type, knob: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == knob)


def build_settings(
    model: Layout | ModelView,
    selection: Selection | None = None,
    method_defaults: Options | None = None,
    projections: Sequence[tuple[str, ModelView]] = (),
) -> SweepPlan:
    """The baseline, then for every chosen method, preset and value the :class:`MethodSetting`, placed on ``model``
    (a model's view, :func:`~tokenmerge.api.view_of`, or a bare :class:`Layout`) and resolved against it.

    ``method_defaults``: options every method gets unless its preset sets them (a model whose library default
    placement does not fit, e.g. the reference Flux model's blocks). The default setting of a method is its default
    preset at the knob's default value; it is always included and marked ``default``.

    ``projections``: other architectures ``(label, view)`` the settings are also made concrete for, each placed on
    its own layout (:attr:`MethodSetting.projected`); options left ``"auto"`` then take the values they resolve to on
    the first of them, so that the swept model runs what a setting is there (e.g. ``ToMA()`` as it resolves on the
    real-size SDXL UNet) and its fidelity goes with those FLOPs.
    """
    view = LayoutView(model) if isinstance(model, Layout) else model
    layout = view.layout
    selection = selection or Selection()
    selection.check()
    registry = methods()
    settings: list[Setting] = [BASELINE]
    skipped: list[Skipped] = []
    seen: list[tuple[tm.Method, str]] = []  # methods hold dicts (blocks): compared, not hashed
    for name in selection.chosen():
        sweep, cls = SWEEPS[name], registry[name]
        default_value = _knob_default(cls, sweep.knob)
        names = selection.presets.get(name) or (sweep.quick_presets if selection.quick else None)
        names = ["default", *(n for n in (names or [p.name for p in sweep.presets]) if n != "default")]
        for preset in map(sweep.preset, names):
            own = list(selection.values.get(name) or preset.grid(sweep, selection.quick))
            chosen = {*own, default_value} if preset.name == "default" else set(own)
            for value in sorted(chosen):
                label = MethodSetting(None, name, preset.name, sweep.knob, value).label
                placed = PLACEMENTS[preset.placement](layout)
                if placed is None:
                    skipped.append(
                        Skipped(label, f"placement {preset.placement!r} does not exist on a {layout.family}")
                    )
                    continue
                try:
                    recipe = {**preset.options, sweep.knob: value}
                    projected = _project(cls, recipe, preset.placement, projections)
                    method = cls(**{**(method_defaults or {}), **recipe, **placed})
                    if projections and projections[0][0] in projected:
                        method = _follow(method, projected[projections[0][0]])
                    method = method.resolve(view)
                except (ValueError, TypeError) as exc:
                    skipped.append(Skipped(label, f"invalid options: {exc}"))
                    continue
                same = next((other for m, other in seen if m == method), None)
                if same is not None:
                    skipped.append(Skipped(label, f"same configuration as {same}"))
                    continue
                seen.append((method, label))
                is_default = preset.name == "default" and value == default_value
                settings.append(MethodSetting(method, name, preset.name, sweep.knob, value, is_default, projected))
    for item in skipped:
        logger.info("skipped %s: %s", item.label, item.reason)
    return SweepPlan(settings, skipped)
