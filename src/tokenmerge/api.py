"""The user API: ``apply`` / ``remove`` a method on a pipeline or denoiser, ``summary``, step control.

Hooks, not subclasses or processor swaps: the model's own attention processor (and so diffusers' attention
backend dispatch) runs unchanged, on fewer tokens. ``apply`` makes the method's ``"auto"`` options concrete for the
model (:class:`View`), checks it against the model, then installs a :class:`~tokenmerge.patch.Patch`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from tokenmerge.adapters.base import CallShape
from tokenmerge.caches import reset_caches
from tokenmerge.cost import Twin, View
from tokenmerge.errors import describe
from tokenmerge.methods.base import Method
from tokenmerge.patch import PATCH_ATTR, Patch, adapter_for, find_denoiser, warn
from tokenmerge.summary import FlopCut, Summary

logger = logging.getLogger("tokenmerge")

#: The smallest FLOP cut (of a merged call at the pipeline's default resolution) ``apply`` accepts without a warning.
MIN_CUT = 0.10


def _patch(obj: Any) -> Patch | None:
    return vars(find_denoiser(obj)).get(PATCH_ATTR)


def view_of(obj: Any) -> View:
    """The :class:`View` of a pipeline's (or a denoiser's) model at its default call: the pipeline's
    ``default_call_shape`` if it has one (a :class:`~tokenmerge.adapters.base.CallShape`), else the model's native
    resolution (:meth:`~tokenmerge.adapters.base.Adapter.native_shape`)."""
    adapter = adapter_for(find_denoiser(obj))
    shape = getattr(obj, "default_call_shape", None)
    return View(adapter, shape if isinstance(shape, CallShape) else adapter.native_shape())


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
    view = view_of(obj)
    model, adapter = view.adapter.model, view.adapter
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
    if patch.sites and concrete.roles:  # a method that merges nothing by design (an observer) has no cut
        report_cut(concrete, view)
    return obj


def report_cut(method: Method, view: View) -> None:
    """Log the FLOP cut of the concrete ``method``'s first merged call at the view's call shape; warn when it is
    under :data:`MIN_CUT`, naming the configuration of :meth:`Method.cut_more` that cuts the most."""
    ratio = view.flop_ratio(method)
    if ratio is None:
        return
    layout = view.layout
    model, (h, w) = type(view.adapter.model).__name__, view.shape.latent
    bound = "at most " if method.content_adaptive else ""
    where = f"a {model} call on a {h}x{w} latent"
    if 1 - 1 / ratio >= MIN_CUT:
        logger.info("%s cuts %s%.1f%% of the FLOPs of %s", method.describe(layout), bound, 100 * (1 - 1 / ratio), where)
        return
    found = [(r, m) for m in method.cut_more(layout) if (r := view.flop_ratio(m)) is not None and r > ratio]
    hint = ""
    if found:
        best_ratio, best = max(found, key=lambda item: item[0])
        hint = f"; {best.describe(layout)} would cut {bound}{100 * (1 - 1 / best_ratio):.1f}%"
    cut = f"{bound or 'only '}{100 * (1 - 1 / ratio):.1f}%"
    warn(f"{method.describe(layout)} cuts {cut} of the FLOPs of {where}{hint}")


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
    return dataclasses.replace(patch.summary(), flops=last_call_flops(patch))


def last_call_flops(patch: Patch) -> FlopCut | None:
    """The :class:`~tokenmerge.summary.FlopCut` of the patch's last call (eager mode), or ``None``: counted on the
    model's twin with the patch's method (content-adaptive methods: at the fraction its blocks merged), or unpatched
    if the call merged nothing."""
    shape, method = patch.last_shape, patch.method
    if shape is None:
        return None
    fraction = None
    if method.content_adaptive:
        planned = [r for r in patch.runs if r.tokens_in is not None and r.tokens_out is not None and r.site.grid.hw]
        mergeable = sum(method.mergeable(r.site.grid.hw) for r in planned)
        fraction = round(sum(r.tokens_in - r.tokens_out for r in planned) / mergeable, 3) if mergeable else 0.0
    try:
        twin = Twin.of(patch.adapter.model)
        full = twin.call(None, shape)
        merged = twin.call(method, shape, fraction) if patch.counters.call_merged else full
    except Exception as error:  # a model its config cannot rebuild on the meta device: no count
        logger.info("FLOPs of %s not counted: %s", patch.name, describe(error))
        return None
    return FlopCut(shape, full, merged)


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
