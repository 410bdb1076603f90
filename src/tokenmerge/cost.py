"""Exact FLOPs of denoiser calls, unpatched or with a method applied, counted on weightless twins.

A :class:`Twin` is a denoiser's architecture rebuilt from its config on the meta device: every tensor has its real
shape and no storage, so a call is counted (:mod:`tokenmerge.flops`: matmuls, convolutions and attention, a
multiply-add is 2 FLOPs) in well under a second for an SD 1.5 UNet and about a second for Flux.1-dev, without
weights. A method runs on the twin through the same :class:`~tokenmerge.patch.Patch` as on the model — the same
hooks and plans, merge overheads included — so the count is what the patched model computes. Two things need a
value the twin does not have: merge counts that depend on the content (CA-ToMe's threshold) are counted at a given
``merged_fraction`` of the candidate sources, and step caches are not counted (they skip whole calls or blocks
depending on the content). A generation's FLOPs add up its steps' calls: steps where merging is inactive run the
full model, and plans computed at some steps are reused at others.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tokenmerge.adapters.base import Adapter, CallShape
from tokenmerge.archs import DIT_CONFIGS, REAL_SIZE, UNET_CONFIGS, build_dit, build_unet
from tokenmerge.errors import describe
from tokenmerge.flops import count_flops
from tokenmerge.methods.base import Layout, Method
from tokenmerge.patch import Patch, adapter_for, find_denoiser, layout_of, place

logger = logging.getLogger("tokenmerge")

_TWINS: dict[tuple[str, str], Twin] = {}  # (class, config) -> its twin
_ARCHS: dict[str, nn.Module] = {}  # built-in architecture -> its model on the meta device


def forget_twins() -> None:
    """Drop every twin and what was counted on it (to measure the cost model from scratch, or free its memory)."""
    _TWINS.clear()
    _ARCHS.clear()


@dataclass(eq=False)
class Twin:
    """A weightless copy of a denoiser (its architecture on the meta device), its adapter, and the FLOPs counted on
    it so far (memoised per method, call shape, steps and merged fraction)."""

    model: nn.Module
    adapter: Adapter
    _memo: dict[tuple, tuple[int, ...]] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, obj: Any) -> Twin:
        """The twin of a pipeline's (or a denoiser's) model, shared by every model of the same class and config (a
        model already on the meta device is its own twin)."""
        model = find_denoiser(obj)
        config = dict(model.config)
        key = (type(model).__qualname__, json.dumps(config, sort_keys=True, default=str))
        if key not in _TWINS:
            if not all(p.is_meta for p in model.parameters()):
                with torch.device("meta"):
                    model = type(model).from_config(config).eval()
            _TWINS[key] = cls(model, adapter_for(model))
        return _TWINS[key]

    @classmethod
    def build(cls, arch: str) -> Twin:
        """The twin of a built-in architecture (:mod:`tokenmerge.archs`), e.g. ``"sdxl"`` or ``"flux-dev"``."""
        if arch not in _ARCHS:
            if arch not in UNET_CONFIGS and arch not in DIT_CONFIGS:
                known = ", ".join([*UNET_CONFIGS, *DIT_CONFIGS])
                raise ValueError(f"unknown architecture {arch!r}; choose from {known}")
            with torch.device("meta"):
                _ARCHS[arch] = (build_unet if arch in UNET_CONFIGS else build_dit)(arch)
        return cls.of(_ARCHS[arch])

    def generation(
        self, method: Method | None, shape: CallShape, steps: int = 1, merged_fraction: float | None = None
    ) -> tuple[int, ...]:
        """FLOPs of each call of a ``steps``-step generation (one denoiser call per step) of ``shape``, with
        ``method`` applied (made concrete for the twin at ``shape``; ``None``: unpatched). Calls whose step state
        repeats an earlier one (merging active or not, the method's phase, whether a plan was made before) are
        counted once."""
        if method is not None:
            method = method.resolve(View(self.adapter, shape))
        key = (repr(method), shape, steps, merged_fraction)
        if key not in self._memo:
            self._memo[key] = self._count(method, shape, steps, merged_fraction)
        return self._memo[key]

    def call(self, method: Method | None, shape: CallShape, merged_fraction: float | None = None) -> int:
        """FLOPs of the first call of a generation (plans made from scratch) of ``shape`` with ``method``."""
        return self.generation(method, shape, 1, merged_fraction)[0]

    def _count(
        self, method: Method | None, shape: CallShape, steps: int, merged_fraction: float | None
    ) -> tuple[int, ...]:
        inputs = self.adapter.example_inputs(shape, device="meta")

        def run() -> None:
            with torch.no_grad():
                self.model(**inputs, return_dict=False)

        if method is None or method.is_identity:
            return (count_flops(run),) * steps
        patch = Patch(method, self.adapter)
        patch.merged_fraction = merged_fraction
        patch.install(None, explain=False)
        try:
            patch.scheduled(torch.arange(steps, 0, -1, dtype=torch.float32), can_step=True)
            counts: list[int] = []
            seen: dict[tuple, int] = {}
            merged_before = False
            for step in range(steps):
                if step:
                    patch.stepped(step)
                active = method.active(step)
                state = (active, method.phase(step, steps) if active else None, merged_before)
                if state not in seen:
                    seen[state] = count_flops(run)
                counts.append(seen[state])
                merged_before |= active
        finally:
            patch.uninstall()
        return tuple(counts)


@dataclass(frozen=True)
class View:
    """A model as :meth:`Method.resolve` sees it (:class:`~tokenmerge.methods.base.ModelView`): its layout, what its
    sites can take, and the FLOPs of its calls of ``shape`` (the pipeline's default call)."""

    adapter: Adapter
    shape: CallShape

    @property
    def layout(self) -> Layout:
        return layout_of(self.adapter)

    def key_mask_problem(self, method: Method) -> str | None:
        return next(filter(None, (s.key_mask_problem() for s in place(method, self.adapter))), None)

    def flop_ratio(self, method: Method) -> float | None:
        """See :meth:`ModelView.flop_ratio`: counted on the model's weightless twin (:class:`~tokenmerge.cost.Twin`);
        ``None`` (logged) when the twin cannot be built or run."""
        step, shape = method.first_active(), self.shape
        try:
            twin = Twin.of(self.adapter.model)
            full = twin.call(None, shape)
            if step is None:
                return 1.0
            fraction = 1.0 if method.content_adaptive else None
            return full / twin.generation(method, shape, step + 1, fraction)[-1]
        except Exception as error:  # a model its config cannot rebuild on the meta device: no count, no decision
            logger.info("FLOPs of %s not counted: %s", type(self.adapter.model).__name__, describe(error))
            return None


@dataclass(frozen=True)
class CostSpec:
    """A real-size architecture at a resolution, ``ARCH@PIXELS`` (``sdxl@1024``, ``flux-dev@1024x768``)."""

    arch: str
    height: int
    width: int

    @classmethod
    def parse(cls, text: str) -> CostSpec:
        """``ARCH`` (its native resolution, :data:`~tokenmerge.archs.REAL_SIZE`), ``ARCH@SIDE`` or ``ARCH@HxW``."""
        arch, _, size = text.strip().partition("@")
        if arch not in REAL_SIZE:
            raise ValueError(f"unknown real-size architecture {arch!r} in {text!r}; choose from {', '.join(REAL_SIZE)}")
        if not size:
            return cls(arch, REAL_SIZE[arch], REAL_SIZE[arch])
        h, _, w = size.lower().partition("x")
        if not (h.isdigit() and (w or h).isdigit()):
            raise ValueError(f"resolution in {text!r} must be SIDE or HEIGHTxWIDTH pixels, e.g. {arch}@1024")
        return cls(arch, int(h), int(w or h))

    @property
    def label(self) -> str:
        size = str(self.height) if self.height == self.width else f"{self.height}x{self.width}"
        return f"{self.arch}@{size}"

    def twin(self) -> Twin:
        return Twin.build(self.arch)

    def shape(self, batch: int = 1) -> CallShape:
        return self.twin().adapter.shape_at(self.height, self.width, batch)

    def view(self) -> View:
        """The architecture as :meth:`Method.resolve` sees it at this resolution."""
        return View(self.twin().adapter, self.shape())
