"""Step caches and stacks (a step cache plus a tokenmerge method) as ``tokenmerge pareto`` settings, measured on the
same front as the methods alone.

:data:`CACHE_SWEEPS` holds, per step cache, its main knob and the values swept: diffusers' FirstBlockCache (knob
``threshold``: the relative change of the first block's residual under which the other blocks are skipped) and
TaylorSeer on whole blocks (``interval``: blocks run every ``interval`` steps, the others predicted by a first-order
Taylor expansion) on models with diffusers' ``CacheMixin`` (Flux), and DeepCache (``interval``: the UNet's deep
branch runs every ``interval`` steps) on UNet pipelines. All of them cache whole blocks, so they stack with every
method (:mod:`tokenmerge.caches`). A :class:`StackSetting` enables its cache first, then applies its method, and takes
them off in the reverse order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import tokenmerge as tm
from tokenmerge.errors import HarnessError
from tokenmerge.harness.registry import methods
from tokenmerge.harness.sweep import PLACEMENTS, SWEEPS, Layout, MethodSetting, Options, Skipped
from tokenmerge.patch import find_denoiser

# TaylorSeer on whole transformer blocks (its default hooks attention modules, which cannot hold merged tokens)
TAYLORSEER_BLOCKS = (r"transformer_blocks\.\d+", r"single_transformer_blocks\.\d+")


def _diffusers_cache(make: Callable[[float], Any]) -> tuple[Callable, Callable]:
    def enable(target: Any, value: float) -> Any:
        find_denoiser(target).enable_cache(make(value))
        return None

    def disable(target: Any, handle: Any) -> None:
        find_denoiser(target).disable_cache()

    return enable, disable


def _fbc(value: float) -> Any:
    from diffusers.hooks import FirstBlockCacheConfig

    return FirstBlockCacheConfig(threshold=value)


def _taylorseer(value: float) -> Any:
    from diffusers.hooks import TaylorSeerCacheConfig

    return TaylorSeerCacheConfig(
        cache_interval=int(value), disable_cache_before_step=1, cache_identifiers=list(TAYLORSEER_BLOCKS)
    )


def _deepcache_enable(target: Any, value: float) -> Any:
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError:
        raise HarnessError("the deepcache setting needs the DeepCache package: pip install DeepCache==0.1.1") from None
    helper = DeepCacheSDHelper(pipe=target)
    helper.set_params(cache_interval=int(value), cache_branch_id=0)
    helper.enable()
    return helper


def _deepcache_disable(target: Any, helper: Any) -> None:
    helper.disable()


@dataclass(frozen=True)
class CacheSweep:
    """A step cache's main ``knob``, its ``values`` (``quick_values`` with ``--quick``), its ``default``, the layout
    ``family`` it runs on (``"dit"``: a ``CacheMixin`` transformer; ``"unet"``: a pipeline with a ``unet``), and how
    to ``enable(target, value) -> handle`` and ``disable(target, handle)`` it."""

    knob: str
    values: tuple[float, ...]
    quick_values: tuple[float, ...]
    default: float
    family: str
    enable: Callable[[Any, float], Any]
    disable: Callable[[Any, Any], None]


#: Cache name -> its sweep.
CACHE_SWEEPS: dict[str, CacheSweep] = {
    "fbc": CacheSweep("threshold", (0.05, 0.1, 0.2, 0.3), (0.1, 0.3), 0.05, "dit", *_diffusers_cache(_fbc)),
    "taylorseer": CacheSweep("interval", (2, 3, 4), (2, 4), 2, "dit", *_diffusers_cache(_taylorseer)),
    "deepcache": CacheSweep("interval", (2, 3, 5), (2, 5), 3, "unet", _deepcache_enable, _deepcache_disable),
}


@dataclass(frozen=True)
class CacheSetting:
    """A step cache at one knob value as a sweep setting."""

    name: str
    value: float
    default: bool = False
    handle: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # what enable returned

    @property
    def family(self) -> str:
        return self.name

    @property
    def preset(self) -> str:
        return "default"

    @property
    def knob(self) -> str:
        return CACHE_SWEEPS[self.name].knob

    @property
    def label(self) -> str:
        return f"{self.name}:{self.knob}={self.value:g}"

    def apply(self, target: Any) -> None:
        self.handle["on"] = CACHE_SWEEPS[self.name].enable(target, self.value)

    def remove(self, target: Any) -> None:
        if "on" in self.handle:
            CACHE_SWEEPS[self.name].disable(target, self.handle.pop("on"))


@dataclass(frozen=True)
class StackSetting:
    """A step cache and a tokenmerge method together: the cache is enabled first, the method applied on top."""

    cache: CacheSetting
    merge: MethodSetting
    default: bool = False

    @property
    def method(self) -> tm.Method | None:
        return self.merge.method

    @property
    def family(self) -> str:
        return f"{self.cache.name}+{self.merge.family}"

    @property
    def preset(self) -> str:
        return self.merge.preset

    @property
    def knob(self) -> str | None:
        return self.merge.knob

    @property
    def value(self) -> float | None:
        return self.merge.value

    @property
    def label(self) -> str:
        return f"{self.cache.label}+{self.merge.label}"

    def apply(self, target: Any) -> None:
        self.cache.apply(target)
        try:
            self.merge.apply(target)
        except Exception:
            self.cache.remove(target)
            raise

    def remove(self, target: Any) -> None:
        self.merge.remove(target)
        self.cache.remove(target)


def _supports(name: str, layout: Layout, target: Any) -> str | None:
    """Why cache ``name`` cannot run on ``target`` (``None``: it can)."""
    sweep = CACHE_SWEEPS[name]
    if sweep.family != layout.family:
        return f"{name} runs on {sweep.family} models, not on a {layout.family}"
    if sweep.family == "dit" and not callable(getattr(find_denoiser(target), "enable_cache", None)):
        return f"{type(find_denoiser(target)).__name__} has no diffusers enable_cache (CacheMixin)"
    if sweep.family == "unet" and not hasattr(target, "unet"):
        return f"{name} needs a pipeline with a unet"
    return None


def _number(text: str) -> int | float:
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else float(text)


@dataclass(frozen=True)
class StackSpec:
    """A parsed ``--stack``: a cache and its values, a method at a preset and its values."""

    cache: str
    cache_values: list[float]
    method: str
    preset: str
    method_values: list[float]


def parse_stack(text: str) -> StackSpec:
    """``CACHE[=V,..]+METHOD[@PRESET][=V,..]`` (values optional: the quick values; preset: ``default``)."""
    parts = text.split("+")
    if len(parts) != 2:
        raise HarnessError(
            f"--stack {text!r}: expected CACHE[=V,...]+METHOD[@PRESET][=V,...], e.g. fbc=0.1+toma=0.5,0.75"
        )
    out: list[Any] = []
    for part, table in zip(parts, (CACHE_SWEEPS, SWEEPS), strict=True):
        name, _, rest = part.partition("=")
        name, _, preset = name.strip().lower().partition("@")
        if name not in table:
            raise HarnessError(f"--stack {text!r}: unknown {name!r}; choose from {', '.join(table)}")
        if preset and table is CACHE_SWEEPS:
            raise HarnessError(f"--stack {text!r}: a cache has no presets ({name}@{preset})")
        if table is SWEEPS and preset and preset not in (names := [p.name for p in SWEEPS[name].presets]):
            raise HarnessError(f"--stack {text!r}: {name} has no preset {preset!r}; presets: {', '.join(names)}")
        preset = preset or "default"
        quick = (
            table[name].quick_values if table is CACHE_SWEEPS else SWEEPS[name].preset(preset).grid(SWEEPS[name], True)
        )
        try:
            values = [_number(v) for v in rest.split(",") if v.strip()] or list(quick)
        except ValueError:
            raise HarnessError(f"--stack {text!r}: values must be numbers") from None
        out += [name, values, preset]
    return StackSpec(out[0], out[1], out[3], out[5], out[4])


def build_cache_settings(
    layout: Layout,
    target: Any,
    caches: Sequence[str],
    stacks: Sequence[str],
    quick: bool = False,
    method_defaults: Options | None = None,
) -> tuple[list[Any], list[Skipped]]:
    """The settings of ``caches`` (each over its values) and ``stacks`` (``--stack`` texts: every cache value with
    every method value, the method at its default preset and ``method_defaults``), and those skipped (a cache the
    model does not support)."""
    settings: list[Any] = []
    skipped: list[Skipped] = []
    for name in caches:
        if name not in CACHE_SWEEPS:
            raise HarnessError(f"--caches: unknown cache {name!r}; choose from {', '.join(CACHE_SWEEPS)}")
        sweep = CACHE_SWEEPS[name]
        values = sorted({*(sweep.quick_values if quick else sweep.values), sweep.default})
        why = _supports(name, layout, target)
        for value in values:
            setting = CacheSetting(name, value, value == sweep.default)
            if why is not None:
                skipped.append(Skipped(setting.label, why))
            else:
                settings.append(setting)
    registry = methods()
    for text in stacks:
        spec = parse_stack(text)
        why = _supports(spec.cache, layout, target)
        knob, preset = SWEEPS[spec.method].knob, SWEEPS[spec.method].preset(spec.preset)
        placed = PLACEMENTS[preset.placement](layout)
        if placed is None:
            raise HarnessError(f"--stack {text!r}: placement {preset.placement!r} does not exist on a {layout.family}")
        for cv in spec.cache_values:
            for mv in spec.method_values:
                try:
                    built = registry[spec.method](**{**(method_defaults or {}), **preset.options, **placed, knob: mv})
                except (ValueError, TypeError) as exc:
                    raise HarnessError(f"--stack {text!r}: {spec.method} {knob}={mv!r}: {exc}") from None
                merge = MethodSetting(built, spec.method, spec.preset, knob, mv)
                stack = StackSetting(CacheSetting(spec.cache, cv), merge)
                if why is not None:
                    skipped.append(Skipped(stack.label, why))
                else:
                    settings.append(stack)
    return settings, skipped
