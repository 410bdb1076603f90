"""The patch ``tm.apply`` installs on one denoiser: a method's hooks, step tracking, plan caches and counters.

Hooks, not subclasses or processor swaps: the model's own attention processor (and so diffusers' attention
backend dispatch) runs unchanged, on fewer tokens. Per denoiser call a pre-hook tracks the denoising step
(:mod:`tokenmerge.steps`); per block a pre-hook plans the merge from the block's input; per merged sub-module a
pre-hook merges its input and a post-hook unmerges its output before the residual add (:mod:`tokenmerge.hooks`).
On a pipeline, wrappers on its scheduler and progress bar (:mod:`tokenmerge.lifecycle`) tell where each call's
steps and loop start and end.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections import Counter
from typing import Any

import torch
from torch import nn

from tokenmerge.adapters.base import Adapter, CallShape, Site
from tokenmerge.adapters.dit import PixArtAdapter, SD3Adapter
from tokenmerge.adapters.flux import FluxAdapter
from tokenmerge.adapters.unet import UNetAdapter
from tokenmerge.caches import check_caches
from tokenmerge.hooks import BlockRun, Removable, install_block
from tokenmerge.lifecycle import PipelineLink
from tokenmerge.methods.base import Generation, Layout, Method, ModelView, PlanCache
from tokenmerge.parallel import Band, context_parallel
from tokenmerge.plans import KVPlan, MergePlan
from tokenmerge.steps import Change, StepTracker
from tokenmerge.summary import Counters, Summary, Unmerged, merged_roles, summarize

logger = logging.getLogger("tokenmerge")

#: The attribute of a patched denoiser that holds its :class:`Patch`.
PATCH_ATTR = "_tokenmerge"
ADAPTERS: dict[str, type[Adapter]] = {
    "UNet2DConditionModel": UNetAdapter,
    "FluxTransformer2DModel": FluxAdapter,
    "SD3Transformer2DModel": SD3Adapter,
    "PixArtTransformer2DModel": PixArtAdapter,
}


def find_denoiser(obj: Any) -> nn.Module:
    """The denoiser of a diffusers pipeline (``unet`` or ``transformer``), or ``obj`` itself if it is a module; the
    module inside a ``torch.compile`` wrapper."""
    if isinstance(obj, nn.Module):
        return getattr(obj, "_orig_mod", obj)  # torch.compile's wrapper: the module it compiles
    for name in ("unet", "transformer"):
        module = getattr(obj, name, None)
        if isinstance(module, nn.Module):
            return getattr(module, "_orig_mod", module)
    raise ValueError(f"{type(obj).__name__} is neither a torch module nor a pipeline with a unet or transformer")


def adapter_for(model: nn.Module) -> Adapter:
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__](model)
    raise ValueError(f"unsupported model {type(model).__name__}; supported: {', '.join(sorted(ADAPTERS))}")


def layout_of(adapter: Adapter) -> Layout:
    """The :class:`Layout` of an adapter's model: its family, UNet levels and DiT block kinds."""
    sites = adapter.sites()
    kinds: dict[str, int] = {}
    for site in sites:
        if site.kind is not None:
            kinds[site.kind] = max(kinds.get(site.kind, 0), site.index + 1)
    return Layout(adapter.family, tuple(sorted({s.downsample for s in sites})), kinds)


def place(method: Method, adapter: Adapter) -> list[Site]:
    """The sites ``method`` patches: at most ``max_downsample`` (``None``: the finest level that has attention),
    then its ``blocks`` (or the adapter's default placement)."""
    sites = adapter.sites()
    finest = min((s.downsample for s in sites), default=1)
    limit = finest if method.max_downsample is None else method.max_downsample
    return adapter.select([s for s in sites if s.downsample <= limit], method.blocks)


class Patch:
    """Everything ``apply`` installed on one denoiser: the method, its blocks at run time, step tracking, the plan
    caches of the current generation, the counters ``summary`` reports, and the hooks and wrappers to remove.

    ``method`` is concrete; ``requested`` is the method as given (``"auto"`` options and all) and ``view`` the model
    it is resolved against (:meth:`Method.resolve`): what an ``"auto"`` option becomes can depend on the attention
    backend, which may change between calls, so :meth:`check` resolves it again (default: ``method`` itself)."""

    def __init__(
        self, method: Method, adapter: Adapter, requested: Method | None = None, view: ModelView | None = None
    ) -> None:
        self.method = method
        self.requested = method if requested is None else requested
        self.view = view
        self.adapter = adapter
        self.layout = layout_of(adapter)
        self.runs = [BlockRun(site) for site in place(method, adapter)]
        self.tracker = StepTracker(method)
        self.generation = Generation()
        self.caches: dict[str, PlanCache] = {}  # reuse group (or block) name -> cache, for this generation
        self.counters = Counters()
        self.warned: set[Unmerged | str] = set()
        self.band: Band | None = None  # this rank's band at the last call under context parallelism
        self.handles: list[Removable] = []
        self.link: PipelineLink | None = None  # the pipeline's scheduler and progress bar, wrapped
        self.merged_fraction: float | None = None  # FLOP counting on a twin: see Generation.merged_fraction
        self.last_shape: CallShape | None = None  # of the last call (eager mode), for its FLOPs in the summary

    @property
    def sites(self) -> list[Site]:
        return [run.site for run in self.runs]

    @property
    def name(self) -> str:
        return type(self.adapter.model).__name__

    # ---- install / uninstall --------------------------------------------------------------------------------------

    def install(self, pipeline: Any | None, explain: bool = True) -> None:
        """Install the hooks (and on a ``pipeline``, the wrappers of its scheduler and progress bar); ``explain``:
        log what is patched (warn if nothing)."""
        model = self.adapter.model
        self.handles.append(model.register_forward_pre_hook(self.on_call, with_kwargs=True))
        self.handles.append(model.register_forward_hook(self.on_return, with_kwargs=True))
        self.handles += self.adapter.install_grid_hooks(self.sites)
        for run in self.runs:
            self.handles += install_block(run, self, self.method.roles, self.method.keys_values)
        if pipeline is not None:
            self.link = PipelineLink(pipeline, self)
        if explain:
            explain_placement(self.method, self.adapter, self.sites)

    def uninstall(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.link is not None:
            self.link.uninstall()
            self.link = None
        self.finish_generation(report=False)

    def check(self) -> None:
        """What depends on the model and its attention backends (at ``apply``, at each pipeline loop's start and a
        bare denoiser's new generation): ``"auto"`` options resolved again, then the concrete method checked."""
        self.follow_resolution()
        check_model(self.method, self.sites, self.layout)
        check_caches(self.method, self.adapter.model, self.sites)
        check_parallel(self.method, self.adapter)

    def follow_resolution(self) -> None:
        """Switch to what the requested method resolves to now (CA-ToMe's ``batch="auto"`` under a backend that takes
        no mask); logged. What depends on the backend changes no placement or hooked sub-module (only CA-ToMe's batch
        mode does), so the installed hooks serve the new method as they are."""
        if self.view is None or self.requested is self.method:
            return
        concrete = self.requested.resolve(self.view)
        if concrete == self.method:
            return
        logger.info(
            "%s on %s is now %s", self.requested.describe(self.layout), self.name, concrete.describe(self.layout)
        )
        self.method = self.tracker.method = concrete
        self.caches = {}

    # ---- step tracking (denoiser hooks and pipeline events) -------------------------------------------------------

    def on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        key, timestep = self.adapter.call_inputs(args, kwargs)
        change = self.tracker.begin_call(key, timestep)
        if change is Change.GENERATION:
            self.start_generation(key)
        elif change is Change.STEP:
            self.new_step()
        if not torch.compiler.is_compiling():
            self.counters.begin_call()

    def on_return(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        for run in self.runs:  # blocks that a step cache skipped were never planned
            run.pending = None
        if not torch.compiler.is_compiling():
            if self.runs and not self.counters.planned:
                self.counters.block(False, Unmerged.SKIPPED)
            self.counters.end_call(self.tracker.step)
            self.last_shape = self.adapter.call_shape(args, kwargs)

    def start_generation(self, key: tuple[int, ...]) -> None:
        """Calls of shape ``key`` start a generation (or a new input shape): every cache starts empty."""
        if not torch.compiler.is_compiling():
            self.report()
            self.check()
            self.counters.start_generation()
        link = self.link
        self.tracker.start_generation(key, link.begin_index() if link else None, link.order() if link else 1)
        self.generation = Generation(num_steps=self.tracker.run_steps, merged_fraction=self.merged_fraction)
        self.caches = {}
        self.adapter.start_generation()

    def new_step(self) -> None:
        for cache in self.caches.values():
            cache.fresh = False

    def finish_generation(self, report: bool = True) -> None:
        """The generation is over (its pipeline loop ended, or ``reset``): report it, drop every plan, and let the
        next call start a new one."""
        if report:
            self.report()
        self.tracker.reset()
        self.caches, self.generation = {}, Generation()
        for run in self.runs:
            run.plan = run.pending = None
            run.running.clear()

    def report(self) -> None:
        """Warn (once per reason) if the generation that just ran merged nothing (unless the method merges nothing by
        design: no roles, e.g. the analysis observer)."""
        reasons = self.counters.take_generation_reasons()
        for reason in reasons if self.method.roles else ():
            if reason not in self.warned:
                self.warned.add(reason)
                what = self.method.describe(self.layout)
                warn(f"{what} merged nothing in a generation of {self.name}: {reason.value}")

    def scheduled(self, timesteps: torch.Tensor | None, can_step: bool) -> None:
        self.finish_generation()
        self.tracker.schedule(timesteps, can_step)

    def stepped(self, step_index: int | None) -> None:
        if self.tracker.stepped(step_index):
            self.new_step()

    def loop_started(self) -> None:
        self.check()

    def loop_ended(self) -> None:
        self.finish_generation()

    def set_step(self, step: int) -> None:
        if step == 0:
            self.finish_generation()
        self.tracker.drive(step)
        self.new_step()

    # ---- planning (the blocks' pre-hooks) -------------------------------------------------------------------------

    def plan_block(self, run: BlockRun, x: torch.Tensor) -> None:
        """Plan ``run``'s block call from its input tokens ``x`` ``(B, N, C)``; record its tokens in and out."""
        if run.site.grid.band != self.generation.band:
            self.enter_band(run.site.grid.band)
        hw, method = run.site.grid.hw, self.method
        plan, reason = None, None
        if not self.tracker.active:
            reason = Unmerged.STEPS
        elif hw is None or x.ndim != 3 or hw[0] * hw[1] != x.shape[1]:
            reason = Unmerged.GRID
        else:
            plan = method.plan(x, hw, self.cache(run.site), self.tracker.phase)
            reason = None if plan is not None else Unmerged.PLAN
            if plan is not None and not isinstance(plan, method.plan_type):
                kind = method.plan_type.__name__
                raise TypeError(f"{type(method).__name__}.plan returned a {type(plan).__name__}, not a {kind}")
            if isinstance(plan, MergePlan) and plan.key_bias is not None and method.key_mask_option is None:
                raise ValueError(f"{type(method).__name__} made a plan with a key_bias but sets no key_mask_option")
        n = x.shape[1] if x.ndim == 3 else None
        out = n if plan is None else plan.num_kv if isinstance(plan, KVPlan) else plan.num_merged
        if plan is not None:
            run.kernel = plan.kernel
            if n is not None and out >= n:  # keeps every token: the block runs as it is (bit-identical)
                plan, out, reason = None, n, Unmerged.KEEPS_ALL
        run.plan, run.tokens_in, run.tokens_out = plan, n, out
        if not torch.compiler.is_compiling():
            self.counters.block(reason is None, reason)
            if reason is None:
                self.counters.merged(n, out, method.mergeable(hw))

    def enter_band(self, band: Band | None) -> None:
        """Plans from now on are made on ``band``, this rank's image rows under context parallelism (first seen in
        this generation, e.g. at the first call after ``enable_parallelism``): raise ``ValueError`` if the method or
        the band cannot be run on, warn once if the result differs from a single-device run."""
        if band is not None:
            check_parallel(self.method, self.adapter)
            setting = band.setting
            if not band.whole_rows:
                raise ValueError(
                    f"{self.method.describe()} under context parallelism ({setting.describe()}): rank {setting.rank} "
                    f"holds image tokens {band.start}-{band.start + band.count - 1} of the {band.height}x{band.width} "
                    f"grid, not whole rows, and merges are planned on rows: use a resolution whose {band.height} token "
                    f"rows split evenly over {setting.world} ranks"
                )
            note = self.method.check_band(band)
            if note is not None and note not in self.warned:
                self.warned.add(note)
                warn(f"{self.method.describe()} under context parallelism ({setting.describe()}): {note}")
            self.band = band
        self.generation.band = band

    def cache(self, site: Site) -> PlanCache:
        key = site.name if self.method.cache_scope == "block" else site.group
        cache = self.caches.get(key)
        if cache is None:
            cache = self.caches[key] = self.method.new_cache(self.generation)
        return cache

    # ---- summary, copies --------------------------------------------------------------------------------------------

    def summary(self) -> Summary:
        setting = context_parallel(self.adapter.model)
        parallel = self.band.describe() if self.band is not None else setting.member() if setting else None
        described = self.method.describe(self.layout)
        return summarize(self.name, described, self.method, self.runs, self.counters, parallel)

    def __deepcopy__(self, memo: dict) -> Patch:
        """A copy for a copied model: hooks and caches of its own. Copied with its pipeline, it follows the copied
        pipeline; the denoiser copied alone tracks its steps as a bare denoiser (the pipeline stays with the
        original)."""
        if self.link is not None and id(self.link.pipeline) not in memo:
            memo[id(self.link)] = None
        new = object.__new__(Patch)
        memo[id(self)] = new
        for name, value in vars(self).items():
            setattr(new, name, copy.deepcopy(value, memo))
        if new.link is None:
            new.finish_generation(report=False)
        return new


def check_model(method: Method, sites: list[Site], layout: Layout | None = None) -> None:
    """What depends on the model and its attention backends: raise ``ValueError`` naming the option (at ``apply``, and
    again when a pipeline loop or a bare denoiser's generation starts: backends can change in between)."""
    option = method.key_mask_option
    what = method.describe(layout)
    if option is not None and "attn" in method.roles:
        for site in sites:
            problem = site.key_mask_problem()
            if problem is not None:
                raise ValueError(f"{what}: {option[0]} needs a key mask, but {problem}: {option[1]}")
    for site in sites if method.keys_values else ():
        processor = site.fused_projections()
        if processor is not None:
            raise ValueError(
                f"{what}: {site.name} runs fused query/key/value projections ({processor}); keys/values "
                "methods need separate to_k/to_v (call unfuse_qkv_projections())"
            )


def check_parallel(method: Method, adapter: Adapter) -> None:
    """Under diffusers' context parallelism (``enable_parallelism``): raise ``ValueError`` naming the method and the
    setting unless the adapter finds each rank's band and the method plans on bands (:meth:`Method.check_parallel`);
    a method that merges nothing by design (no roles) runs anywhere."""
    setting = context_parallel(adapter.model)
    if setting is None or not method.roles:
        return
    if not adapter.finds_bands:
        raise ValueError(
            f"{method.describe()} cannot run under context parallelism ({setting.describe()}) on "
            f"{type(adapter.model).__name__}: tokenmerge finds each rank's band of image rows on "
            "FluxTransformer2DModel only"
        )
    method.check_parallel(setting)


def explain_placement(method: Method, adapter: Adapter, sites: list[Site]) -> None:
    """Log what ``apply`` patched; warn, naming the option, when it patched nothing."""
    model, what = type(adapter.model).__name__, method.describe(layout_of(adapter))
    if sites:
        groups = ", ".join(f"{g} {n}" for g, n in Counter(s.group for s in sites).items())
        roles = Counter(", ".join(merged_roles(s, method)) or "-" for s in sites)
        merged = "; ".join(f"{r} in {n}" for r, n in roles.items())
        logger.info("%s patched %d blocks of %s (%s); merged: %s", what, len(sites), model, groups, merged)
        return
    candidates = adapter.sites()
    limit = method.max_downsample
    if not candidates:
        why = "it has no transformer blocks"
    elif limit is not None and all(s.downsample > limit for s in candidates):
        finest = min(s.downsample for s in candidates)
        why = (
            f"max_downsample={limit} is finer than its finest level with attention (downsample {finest}): set "
            f"max_downsample={finest} or more, or None"
        )
    else:
        kinds = ", ".join(f"{k}: {n} blocks" for k, n in Counter(s.kind for s in candidates).items())
        why = f"blocks={method.blocks!r} selects none of its blocks ({kinds}): change blocks="
    warn(f"{what} patches no block of this {model}: {why}")


def warn(message: str) -> None:
    """Warn through ``warnings`` (a ``UserWarning``) and the ``tokenmerge`` logger."""
    logger.warning("%s", message)
    warnings.warn(f"tokenmerge: {message}", UserWarning, stacklevel=3)
