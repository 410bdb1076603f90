"""The user API: ``apply`` / ``remove`` a method on a pipeline or denoiser, ``summary``, step control.

Hooks, not subclasses or processor swaps: the model's own attention processor (and so diffusers' attention
backend dispatch) runs unchanged, on fewer tokens. ``apply`` makes the method's ``"auto"`` options concrete for the
model (:class:`View`), checks it against the model, then installs a :class:`~tokenmerge.patch.Patch`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

from tokenmerge.adapters.base import Adapter
from tokenmerge.caches import reset_caches
from tokenmerge.methods.base import Layout, Method
from tokenmerge.patch import PATCH_ATTR, Patch, adapter_for, find_denoiser, layout_of, place
from tokenmerge.summary import Summary

logger = logging.getLogger("tokenmerge")


def _patch(obj: Any) -> Patch | None:
    return vars(find_denoiser(obj)).get(PATCH_ATTR)


@dataclass(frozen=True)
class View:
    """A model as :meth:`Method.resolve` sees it (:class:`~tokenmerge.methods.base.ModelView`): its layout and
    what its sites can take."""

    adapter: Adapter

    @property
    def layout(self) -> Layout:
        return layout_of(self.adapter)

    def key_mask_problem(self, method: Method) -> str | None:
        return next(filter(None, (s.key_mask_problem() for s in place(method, self.adapter))), None)


def view_of(obj: Any) -> View:
    """The :class:`View` of a pipeline's (or a denoiser's) model."""
    return View(adapter_for(find_denoiser(obj)))


def apply(obj: Any, method: Method) -> Any:
    """Patch a diffusers pipeline (or its denoiser module) in place with ``method``; returns ``obj``.

    Options left ``"auto"`` are first made concrete for the model (:meth:`Method.resolve`; ``tm.summary``
    shows the result), and again at every pipeline call's start (what one becomes can depend on the attention
    backend). Applying again replaces the previous patch. A method that changes nothing (ratio 0) leaves
    the model unpatched.
    Raises ``ValueError`` when the method cannot run on this model or its attention backend (e.g. a key mask where
    the attention takes none), before anything changes (a previous patch stays); warns when its options patch no
    block.
    """
    if not isinstance(method, Method):
        raise TypeError(f"expected a tokenmerge method such as tm.ToMA(...), got {type(method).__name__}")
    model = find_denoiser(obj)
    adapter = adapter_for(model)
    view = View(adapter)
    concrete = method.resolve(view)
    layout = view.layout
    if concrete != method:
        logger.info("%s on %s is %s", method.describe(layout), type(model).__name__, concrete.describe(layout))
    patch = None if concrete.is_identity else Patch(concrete, adapter, method, view)
    if patch is not None:
        patch.check()
    remove(obj)
    if patch is None:
        logger.info("%s changes nothing: %s left unpatched", concrete.describe(layout), type(model).__name__)
        return obj
    patch.install(None if isinstance(obj, nn.Module) else obj)
    setattr(model, PATCH_ATTR, patch)
    return obj


def remove(obj: Any) -> Any:
    """Undo :func:`apply`: every hook and wrapper removed, the model exactly as it was. No-op if not patched."""
    model = find_denoiser(obj)
    patch = vars(model).get(PATCH_ATTR)
    if patch is not None:
        patch.uninstall()
        delattr(model, PATCH_ATTR)
    return obj


def is_applied(obj: Any) -> bool:
    """Whether ``obj``'s denoiser is patched by :func:`apply`."""
    return _patch(obj) is not None


@contextmanager
def applied(obj: Any, method: Method) -> Iterator[Any]:
    """``with tm.applied(pipe, method):`` — patched inside the block; on leaving it, however, the patch is removed
    and a method applied before is applied again."""
    before = _patch(obj)
    apply(obj, method)  # raises before anything changes
    try:
        yield obj
    finally:
        remove(obj)
        if before is not None:
            apply(obj, before.requested)


def summary(obj: Any) -> Summary:
    """What is patched on ``obj``'s denoiser and what it did: blocks per group, tokens in and out of every patched
    block at its last call, denoiser calls merged and unmerged (with why), steps merged of the steps run. ``print``
    it for a table. Counters are plain Python ints kept by the hooks (no device reads), in eager mode."""
    patch = _patch(obj)
    if patch is None:
        return Summary(model=type(find_denoiser(obj)).__name__, method=None)
    return patch.summary()


def set_step(obj: Any, step: int) -> None:
    """Drive the step yourself: the denoiser calls that follow belong to denoising ``step`` (0 starts a new
    generation) until the next ``set_step`` or :func:`reset`. No timestep is read from the device, so a compiled
    denoiser in a custom loop sees Python constants only. Pipelines do this by themselves (through their scheduler)."""
    if isinstance(step, bool) or int(step) != step or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    patch = _patch(obj)
    if patch is not None:
        patch.set_step(int(step))


def reset(obj: Any) -> None:
    """Start a new generation at the next call (pipelines do this themselves; for direct denoiser loops), and reset
    the diffusers step caches of the denoiser (FirstBlockCache, ...) with it, as a pipeline call's end does."""
    patch = _patch(obj)
    if patch is not None:
        patch.finish_generation()
    reset_caches(find_denoiser(obj))
