"""``apply`` / ``remove``: install a method on a pipeline or denoiser with removable torch hooks.

Hooks, not subclasses or processor swaps: the model's own attention processor (and so diffusers' attention
backend dispatch) runs unchanged, on fewer tokens. Per denoiser call a pre-hook tracks the denoising step; per block a
pre-hook plans the merge from the block's input; per merged sub-module a pre-hook merges its input and a post-hook
unmerges its output before the residual add.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenmerge.adapters.base import Adapter, Site
from tokenmerge.adapters.dit import PixArtAdapter, SD3Adapter
from tokenmerge.adapters.flux import FluxAdapter
from tokenmerge.adapters.unet import UNetAdapter
from tokenmerge.methods.base import Method, Plan

_ATTR = "_tokenmerge"
#: diffusers attention processors that add ``attention_mask`` to the self-attention scores: the only ones a plan's
#: ``key_bias`` can go to, unless the site's adapter passes it on itself (``Site.masks_keys``).
PLAIN_PROCESSORS = frozenset(
    {"AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor", "AttnProcessorNPU"}
)
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


class MergeState:
    """Everything ``apply`` installed on one denoiser, and the per-generation state it tracks."""

    def __init__(self, method: Method, adapter: Adapter, scheduler: Any | None) -> None:
        self.method = method
        self.adapter = adapter
        self.scheduler = scheduler
        sites = [s for s in adapter.sites() if s.downsample <= method.max_downsample]
        self.sites = adapter.select(sites, method.blocks)  # DiTs: block index ranges per kind
        self.handles: list[RemovableHandle] = []
        self.num_steps: int | None = None  # steps of the scheduler's last set_timesteps (None for bare denoisers)
        self.step_of_index: list[int] = []  # step of each index into the scheduler's timesteps
        self.reset_state()

    def reset_state(self) -> None:
        """Forget the step count and every cached plan: the next call starts a new generation."""
        self.new_generation = True
        self.driven = False  # steps set by the scheduler's step() or set_step(), not read from timesteps
        self.key: tuple[int, ...] | None = None
        self.timestep = 0.0
        self.run_steps: int | None = None
        self.first_index = 0
        self.index = 0
        self.caches: dict[str, dict[str, Any]] = {}
        self.plans: dict[int, Plan | None] = {}
        self.merging: dict[tuple[int, str], Plan] = {}  # (site, role) -> plan, while that role runs merged
        self.set_step(0)

    def set_step(self, step: int) -> None:
        """Enter denoising ``step``: whether merging is active, the method's phase; nothing cached is fresh."""
        self.step = step
        self.active = self.method.active(step)
        self.phase = self.method.phase(step, self.run_steps)
        for cache in self.caches.values():
            cache.pop("fresh", None)

    def start_generation(self, key: tuple[int, ...]) -> None:
        """Empty the caches for a new generation (or a new input shape) of ``key``-shaped calls."""
        self.caches.clear()
        self.run_steps = self.steps_to_run()
        self.caches[""] = {"num_steps": self.run_steps}  # shared by every cache of this generation
        self.key, self.new_generation = key, False
        self.adapter.start_generation()
        begin = getattr(self.scheduler, "begin_index", None)
        self.first_index = self.index = begin if isinstance(begin, int) else 0

    def begin_call(self, key: tuple[int, ...], timestep: Any) -> None:
        """Track the step of a denoiser call of input shape ``key`` at ``timestep``.

        Driven (a pipeline's scheduler between ``set_timesteps`` and its last ``step``, or :func:`set_step`): the
        step is already set and the timestep is never read (no device sync: compiled models see only Python
        constants); a new input shape empties the caches. Otherwise the step advances on a new timestep value, and a
        reset, a new input shape (batch size or resolution) or a rising timestep start a new generation; repeated
        calls at one timestep (separate guidance passes) share a step.
        """
        if self.driven:
            if self.new_generation or key != self.key:
                self.start_generation(key)
                self.set_step(self.step)
            return
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if self.new_generation or key != self.key or t > self.timestep:
            self.start_generation(key)
            self.set_step(0)
        elif t != self.timestep:
            self.set_step(self.step + 1)
        self.timestep = t

    def after_scheduler_step(self) -> None:
        """The scheduler took a step: the next calls belong to the step of its next timestep (its ``step_index``,
        or one more than before for schedulers without one); past its last timestep the run is over."""
        if not self.driven:
            return
        index = getattr(self.scheduler, "step_index", None)
        self.index = index if isinstance(index, int) else self.index + 1
        if self.index >= len(self.step_of_index):
            self.driven, self.new_generation = False, True
        else:
            self.set_step(self.step_of_index[self.index] - self.step_of_index[self.first_index])

    def steps_to_run(self) -> int | None:
        """Denoising steps of the generation starting now: the scheduler's step count less those an img2img
        ``strength`` skips (the scheduler's ``begin_index``); ``None`` for a bare denoiser."""
        begin = getattr(self.scheduler, "begin_index", None)
        if self.num_steps is None or not isinstance(begin, int):
            return self.num_steps
        return max(1, self.num_steps - begin // max(1, int(getattr(self.scheduler, "order", 1))))

    def install(self) -> None:
        model = self.adapter.model
        self.handles.append(model.register_forward_pre_hook(self._on_call, with_kwargs=True))
        self.handles += self.adapter.install_grid_hooks(self.sites)
        for site in self.sites:
            self.handles.append(site.block.register_forward_pre_hook(self._plan_hook(site), with_kwargs=True))
            if self.method.keys_values:
                for attention in site.self_attention:
                    self.handles += self._kv_hooks(site, attention)
                self.handles += self._map_hooks(site, "attn")
                continue
            for role in self.method.roles & site.modules.keys():
                pre, post = self._merge_hooks(site, role)
                module = site.modules[role]
                self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                self.handles.append(module.register_forward_hook(post, with_kwargs=True))
            for role in self.method.roles & site.extra_modules.keys():
                for module in site.extra_modules[role]:
                    pre, post = self._merge_hooks(site, role)
                    self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                    self.handles.append(module.register_forward_hook(post, with_kwargs=True))
            for role in self.method.roles & site.spans.keys():
                self.handles += self._span_hooks(site, role)
            for role in self.method.roles & (site.kwarg_maps.keys() | site.output_maps.keys()):
                self.handles += self._map_hooks(site, role)
        if self.scheduler is not None and hasattr(self.scheduler, "set_timesteps"):
            self._wrap_scheduler()

    def _wrap_scheduler(self) -> None:
        """Wrap the scheduler's ``set_timesteps`` (a new generation: its step count and the step of every timestep
        index) and ``step`` (the next step), as instance attributes that ``uninstall`` deletes."""
        scheduler = self.scheduler
        set_timesteps, step = scheduler.set_timesteps, getattr(scheduler, "step", None)

        @functools.wraps(set_timesteps)
        def wrapped_set_timesteps(*args: Any, **kwargs: Any) -> Any:
            result = set_timesteps(*args, **kwargs)
            timesteps = getattr(scheduler, "timesteps", None)
            if isinstance(timesteps, torch.Tensor) and timesteps.numel():
                new = torch.ones(timesteps.numel(), dtype=torch.long)
                new[1:] = (timesteps[1:] != timesteps[:-1]).cpu()
                self.step_of_index = (new.cumsum(0) - 1).tolist()  # repeated timesteps (Heun) share a step
                self.num_steps = self.step_of_index[-1] + 1
            else:
                self.step_of_index, self.num_steps = [], None
            self.new_generation, self.driven = True, bool(self.step_of_index) and callable(step)
            self.set_step(0)
            return result

        wrapped_set_timesteps.__tokenmerge__ = True
        scheduler.set_timesteps = wrapped_set_timesteps
        if callable(step):

            @functools.wraps(step)
            def wrapped_step(*args: Any, **kwargs: Any) -> Any:
                result = step(*args, **kwargs)
                self.after_scheduler_step()
                return result

            wrapped_step.__tokenmerge__ = True
            scheduler.step = wrapped_step

    def uninstall(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for name in ("set_timesteps", "step"):
            if self.scheduler is not None and getattr(vars(self.scheduler).get(name), "__tokenmerge__", False):
                delattr(self.scheduler, name)
        self.reset_state()

    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.begin_call(*self.adapter.call_inputs(args, kwargs))

    def _plan_hook(self, site: Site):
        def plan(block: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            hw = site.grid.hw
            ok = self.active and hw is not None and x.ndim == 3 and hw[0] * hw[1] == x.shape[1]
            cache = self.caches.setdefault(site.name if self.method.cache_scope == "block" else site.group, {})
            # one dict shared by every site for the whole generation (e.g. a random generator, the step count)
            cache.setdefault("generation", self.caches[""])
            self.plans[id(site)] = self.method.plan(x, hw, cache, self.phase) if ok else None

        return plan

    def _merge_hooks(self, site: Site, role: str):
        stack: list[Plan | None] = []  # the pre-hook's decision, for the matching post-hook

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            plan = self.plans.get(id(site))
            x = args[0] if args else kwargs.get("hidden_states")
            if plan is None or not isinstance(x, torch.Tensor) or x.shape[1] != site.grid.hw[0] * site.grid.hw[1]:
                stack.append(None)
                return None
            stack.append(plan)
            self.merging[id(site), role] = plan
            bias = getattr(plan, "key_bias", None) if role == "attn" and not site.masks_keys else None
            if bias is not None:  # padded rows of a per-sample merge: masked out as keys
                _check_key_bias(module, site)
                kwargs = {**kwargs, "attention_mask": bias}
            if args:
                return (plan.merge(x), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": plan.merge(x)}

        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            plan = stack.pop() if stack else None
            if plan is None:
                return None
            self.merging.pop((id(site), role), None)
            return _on_image(output, plan.unmerge)

        return pre, post

    def _span_hooks(self, site: Site, role: str) -> list[RemovableHandle]:
        """Joint sequences ``[prefix, image]``: merge the image suffix of ``entry``'s output, unmerge that of
        ``exit``'s output; the prefix (text) passes through."""
        entry, exit_ = site.spans[role]
        stack: list[tuple[Plan, int] | None] = []

        def merge(module: nn.Module, args: tuple, output: Any) -> Any:
            plan, x = self.plans.get(id(site)), output[0] if isinstance(output, tuple) else output
            n = site.grid.hw[0] * site.grid.hw[1] if site.grid.hw is not None else 0
            ok = plan is not None and hasattr(plan, "merge") and isinstance(x, torch.Tensor) and x.ndim == 3
            if not ok or not 0 < n <= x.shape[1]:
                stack.append(None)
                return None
            if getattr(plan, "key_bias", None) is not None and not site.masks_keys:
                _check_key_bias(None, site)
            prefix = x.shape[1] - n
            stack.append((plan, prefix))
            self.merging[id(site), role] = plan
            return _on_image(output, lambda t: torch.cat((t[:, :prefix], plan.merge(t[:, prefix:])), 1))

        def unmerge(module: nn.Module, args: tuple, output: Any) -> Any:
            top = stack.pop() if stack else None
            if top is None:
                return None
            (plan, prefix), _ = top, self.merging.pop((id(site), role), None)
            return _on_image(output, lambda t: torch.cat((t[:, :prefix], plan.unmerge(t[:, prefix:])), 1))

        return [entry.register_forward_hook(merge), exit_.register_forward_hook(unmerge)]

    def _kv_hooks(self, site: Site, attention: nn.Module) -> list[RemovableHandle]:
        """Keys/values plans: while ``attention`` runs a self-attention (``to_k``/``to_v`` take the very tensor
        ``to_q`` took), the last ``H*W`` tokens of their input (the image) become the plan's ``kv`` of them; the
        queries keep every token. Raises if an active plan found no such projections (fused or unknown ones)."""
        state: dict[str, Any] = {}

        def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
            plan = self.plans.get(id(site))
            if plan is not None and hasattr(plan, "kv"):
                state.update(plan=plan, queries=None, projected=0)
                self.merging[id(site), "attn"] = plan

        def leave(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            plan, projected = state.pop("plan", None), state.pop("projected", 0)
            state.pop("queries", None)
            self.merging.pop((id(site), "attn"), None)
            if plan is not None and projected < 2:
                raise ValueError(
                    f"{site.name}: {type(getattr(module, 'processor', None)).__name__} attention does not project "
                    "keys and values through to_q/to_k/to_v from the same tokens (fused projections or not a "
                    "self-attention): keys/values methods cannot run here (call unfuse_qkv_projections())"
                )

        def queries(module: nn.Module, args: tuple) -> None:
            if "plan" in state:
                state["queries"] = args[0]

        def keys_values(module: nn.Module, args: tuple) -> tuple | None:
            x, plan = args[0], state.get("plan")
            n = site.grid.hw[0] * site.grid.hw[1] if site.grid.hw is not None else 0
            if plan is None or x is not state.get("queries") or x.ndim != 3 or not 0 < n <= x.shape[1]:
                return None
            state["projected"] += 1
            prefix = x.shape[1] - n
            return (torch.cat((x[:, :prefix], plan.kv(x[:, prefix:])), 1), *args[1:])

        handles = [
            attention.register_forward_pre_hook(enter, with_kwargs=True),
            attention.register_forward_hook(leave, with_kwargs=True),
        ]
        for name, hook in (("to_q", queries), ("to_k", keys_values), ("to_v", keys_values)):
            projection = getattr(attention, name, None)
            if isinstance(projection, nn.Module):
                handles.append(projection.register_forward_pre_hook(hook))
        return handles

    def _map_hooks(self, site: Site, role: str) -> list[RemovableHandle]:
        """While ``role`` runs merged: rewrite modules' keyword arguments / outputs with the site's maps."""
        handles = []
        for module, fn in site.kwarg_maps.get(role, ()):

            def pre(module: nn.Module, args: tuple, kwargs: dict, fn: Any = fn) -> tuple[tuple, dict] | None:
                plan = self.merging.get((id(site), role))
                return None if plan is None else (args, fn(kwargs, plan))

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        for module, fn in site.output_maps.get(role, ()):

            def post(module: nn.Module, args: tuple, output: Any, fn: Any = fn) -> Any:
                plan = self.merging.get((id(site), role))
                return None if plan is None else fn(output, plan)

            handles.append(module.register_forward_hook(post))
        return handles


def _check_key_bias(module: nn.Module | None, site: Site) -> None:
    processor = type(getattr(module, "processor", None)).__name__
    if processor not in PLAIN_PROCESSORS:
        raise ValueError(
            f"{site.name}: this plan pads rows that must be masked as keys, which {processor} attention cannot take "
            "(e.g. CA-ToMe batch='sample' on a joint-attention model): use batch='min' or batch='max' here"
        )


def _on_image(output: Any, fn: Any) -> Any:
    """Apply ``fn`` to a module output, or to the first element (the image tokens) of a tuple output."""
    return (fn(output[0]), *output[1:]) if isinstance(output, tuple) else fn(output)


def apply(obj: Any, method: Method) -> Any:
    """Patch a diffusers pipeline (or its denoiser module) in place with ``method``; returns ``obj``.

    Applying again replaces the previous patch. A method that changes nothing (ratio 0) leaves the model unpatched.
    """
    if not isinstance(method, Method):
        raise ValueError(f"expected a tokenmerge method such as tm.ToMA(...), got {type(method).__name__}")
    model = find_denoiser(obj)
    adapter = adapter_for(model)
    remove(obj)
    if method.is_identity:
        return obj
    state = MergeState(method, adapter, None if obj is model else getattr(obj, "scheduler", None))
    state.install()
    setattr(model, _ATTR, state)
    return obj


def remove(obj: Any) -> Any:
    """Undo :func:`apply`: every hook and wrapper removed, the model exactly as it was. No-op if not patched."""
    model = find_denoiser(obj)
    state = vars(model).get(_ATTR)
    if state is not None:
        state.uninstall()
        delattr(model, _ATTR)
    return obj


def set_step(obj: Any, step: int) -> None:
    """Drive the step yourself: the denoiser calls that follow belong to denoising ``step`` (0 starts a new
    generation) until the next ``set_step`` or :func:`reset`. No timestep is read from the device, so a compiled
    denoiser in a custom loop sees Python constants only. Pipelines do this by themselves (through their scheduler)."""
    if int(step) != step or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    state = vars(find_denoiser(obj)).get(_ATTR)
    if state is not None:
        state.driven = True
        if step == 0:
            state.new_generation = True
        state.set_step(int(step))


def reset(obj: Any) -> None:
    """Start a new generation at the next call (pipelines do this themselves; for direct denoiser loops)."""
    state = vars(find_denoiser(obj)).get(_ATTR)
    if state is not None:
        state.reset_state()
