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
    """The denoiser of a diffusers pipeline (``unet`` or ``transformer``), or ``obj`` itself if it is a module."""
    if isinstance(obj, nn.Module):
        return obj
    for name in ("unet", "transformer"):
        module = getattr(obj, name, None)
        if isinstance(module, nn.Module):
            return module
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
        self.reset_state()

    def reset_state(self) -> None:
        """Forget the step count and every cached plan: the next call starts a new generation."""
        self.new_generation = True
        self.key: tuple[int, ...] | None = None
        self.timestep = 0.0
        self.step = 0
        self.active = False
        self.caches: dict[str, dict[str, Any]] = {}
        self.plans: dict[int, Plan | None] = {}
        self.merging: dict[tuple[int, str], Plan] = {}  # (site, role) -> plan, while that role runs merged

    def begin_call(self, key: tuple[int, ...], timestep: float) -> None:
        """Advance the step on a new timestep; start a new generation on a reset, a new input shape (batch size
        or resolution) or a rising timestep. Repeated calls at one timestep (separate guidance passes) share a step."""
        if self.new_generation or key != self.key or timestep > self.timestep:
            self.caches.clear()
            self.caches[""] = {"num_steps": self.steps_to_run()}  # shared by every cache of this generation
            self.step = 0
            self.new_generation = False
        elif timestep != self.timestep:
            self.step += 1
        self.key, self.timestep = key, timestep
        self.active = self.method.active(self.step)

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
            original = self.scheduler.set_timesteps

            @functools.wraps(original)
            def set_timesteps(*args: Any, **kwargs: Any) -> Any:
                self.new_generation = True
                result = original(*args, **kwargs)
                timesteps = getattr(self.scheduler, "timesteps", None)
                self.num_steps = len(torch.unique_consecutive(timesteps)) if timesteps is not None else None
                return result

            set_timesteps.__tokenmerge__ = True
            self.scheduler.set_timesteps = set_timesteps

    def uninstall(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.scheduler is not None and getattr(vars(self.scheduler).get("set_timesteps"), "__tokenmerge__", False):
            del self.scheduler.set_timesteps
        self.reset_state()

    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.begin_call(*self.adapter.call_key(args, kwargs))

    def _plan_hook(self, site: Site):
        def plan(block: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            hw = site.grid.hw
            ok = self.active and hw is not None and x.ndim == 3 and hw[0] * hw[1] == x.shape[1]
            cache = self.caches.setdefault(site.name if self.method.cache_scope == "block" else site.group, {})
            # one dict shared by every site for the whole generation (e.g. a random generator, the step count)
            cache.setdefault("generation", self.caches[""])
            self.plans[id(site)] = self.method.plan(x, hw, cache, self.step) if ok else None

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


def reset(obj: Any) -> None:
    """Start a new generation at the next call (pipelines do this themselves; for direct denoiser loops)."""
    state = vars(find_denoiser(obj)).get(_ATTR)
    if state is not None:
        state.reset_state()
