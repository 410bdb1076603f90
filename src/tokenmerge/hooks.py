"""The torch hooks ``apply`` installs around one block, grouped by what they do (one small class per hook set).

Every hook reads the block's current plan from its :class:`BlockRun`. The block's :class:`PlanHook` only records the
block's input; the plan is computed from it when the first merged sub-module of the call asks for it
(:meth:`BlockRun.take_plan`), so that a block whose forward a step cache skips (diffusers' FirstBlockCache, MagCache,
TaylorSeer, DeepCache, ...: the block's torch pre-hook still fires, its sub-modules do not run) costs no plan. Hooks
are bound methods or callable objects (no closures), so that ``copy.deepcopy`` of a patched model gives hooks that
act on the copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenmerge.adapters.base import Point, Site
from tokenmerge.plans import KVPlan, MergePlan

#: The projections a keys/values plan acts on, by their name in the attention module.
PROJECTIONS = ("to_q", "to_k", "to_v")


class Removable(Protocol):
    """What ``remove`` takes off the model: a torch hook handle or a :class:`Followed` hook."""

    def remove(self) -> None: ...


@dataclass(eq=False)
class BlockRun:
    """One patched block at run time: the plan of its current call (``None``: unmerged), the input it is planned from
    (``pending``, until a sub-module asks), the roles running merged right now (for the site's keyword and output
    maps), and its last call's image tokens in and out and which implementation built its plan (``kernel``)."""

    site: Site
    planner: Planner | None = None
    plan: MergePlan | KVPlan | None = None
    pending: torch.Tensor | None = None
    running: dict[str, MergePlan | KVPlan] = field(default_factory=dict)
    tokens_in: int | None = None
    tokens_out: int | None = None
    kernel: str | None = None

    @property
    def grid_tokens(self) -> int:
        hw = self.site.grid.hw
        return 0 if hw is None else hw[0] * hw[1]

    def take_plan(self) -> MergePlan | KVPlan | None:
        """The plan of the block's current call, planned from its input on the first call of this one."""
        x, self.pending = self.pending, None
        if x is not None and self.planner is not None:
            self.planner.plan_block(self, x)
        return self.plan


class Planner(Protocol):
    def plan_block(self, run: BlockRun, x: torch.Tensor) -> None: ...


@dataclass(eq=False)
class Followed:
    """A hook on the module at a :class:`~tokenmerge.adapters.base.Point`, moved to the module found there whenever
    :meth:`follow` runs (at every call of the block or attention above it: a few dict lookups). A LoRA loaded after
    ``apply`` (peft, ``pipe.load_lora_weights``) replaces ``to_k`` by a wrapper computing ``base_layer(x) + B(A(x))``:
    a hook left on the original, now ``base_layer``, would change one term only; unloading puts the original back."""

    point: Point
    hook: Callable[..., Any]
    with_kwargs: bool = False
    prepend: bool = False
    module: nn.Module | None = None
    handle: RemovableHandle | None = None

    def follow(self) -> None:
        current = self.point.module
        if current is self.module:
            return
        self.remove()
        self.module = current
        if current is None:
            return
        register = current.register_forward_pre_hook if self.point.side == "input" else current.register_forward_hook
        self.handle = register(self.hook, with_kwargs=self.with_kwargs, prepend=self.prepend)

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
        self.module = self.handle = None


@dataclass(eq=False)
class PlanHook:
    """Pre-hook of a block: record its input tokens, to plan from when a merged sub-module first runs (``eager``: plan
    now, for a method that merges no sub-module by design, e.g. the analysis observer)."""

    run: BlockRun
    eager: bool = False

    def __call__(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        self.run.plan, self.run.pending = None, args[0] if args else kwargs["hidden_states"]
        if self.eager:
            self.run.take_plan()


@dataclass(eq=False)
class MergeHooks:
    """A sub-module that runs on merged tokens: the pre-hook merges its first input (and hands a plan's key bias to a
    plain self-attention as ``attention_mask``), the post-hook unmerges its output before the residual add."""

    run: BlockRun
    role: str
    stack: list[MergePlan | None] = field(default_factory=list)  # the pre-hook's decision, for the post-hook

    def install(self, module: nn.Module) -> list[RemovableHandle]:
        return [
            module.register_forward_pre_hook(self.merge, with_kwargs=True),
            module.register_forward_hook(self.unmerge, with_kwargs=True),
        ]

    def merge(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        plan, x = self.run.take_plan(), args[0] if args else kwargs.get("hidden_states")
        if plan is None or not isinstance(x, torch.Tensor) or x.shape[1] != self.run.grid_tokens:
            self.stack.append(None)
            return None
        self.stack.append(plan)
        self.run.running[self.role] = plan
        if self.role == "attn" and plan.key_bias is not None and not self.run.site.masks_keys:
            kwargs = {**kwargs, "attention_mask": plan.key_bias}  # padded rows masked out as keys
        if args:
            return (plan.merge(x), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": plan.merge(x)}

    def unmerge(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        plan = self.stack.pop() if self.stack else None
        if plan is None:
            return None
        self.run.running.pop(self.role, None)
        return on_image(output, plan.unmerge)


@dataclass(eq=False)
class SpanHooks:
    """A joint sequence ``[prefix, image]`` between two points of a block, run merged for ``roles``: the image suffix
    is merged at the entry (a module's input or output) and unmerged at the exit (a module's output); the prefix
    (text) passes through. Both hooks follow the modules at their points (checked when the block starts)."""

    run: BlockRun
    roles: frozenset[str]
    stack: list[tuple[MergePlan, int] | None] = field(default_factory=list)
    points: list[Followed] = field(default_factory=list)

    def install(self, block: nn.Module, entry: Point, exit_: Point) -> list[Removable]:
        enter = self.merge_input if entry.side == "input" else self.merge_output
        self.points = [
            Followed(entry, enter, with_kwargs=entry.side == "input", prepend=True),
            Followed(exit_, self.unmerge),
        ]
        self.follow()
        return [block.register_forward_pre_hook(self.follow), *self.points]

    def follow(self, *_: Any) -> None:
        for point in self.points:
            point.follow()

    def _merge(self, x: Any) -> torch.Tensor | None:
        plan, n = self.run.take_plan(), self.run.grid_tokens
        if plan is None or not isinstance(x, torch.Tensor) or x.ndim != 3 or not 0 < n <= x.shape[1]:
            self.stack.append(None)
            return None
        prefix = x.shape[1] - n
        self.stack.append((plan, prefix))
        for role in self.roles:
            self.run.running[role] = plan
        return torch.cat((x[:, :prefix], plan.merge(x[:, prefix:])), 1)

    def merge_input(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        merged = self._merge(args[0] if args else kwargs.get("hidden_states"))
        if merged is None:
            return None
        return ((merged, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": merged})

    def merge_output(self, module: nn.Module, args: tuple, output: Any) -> Any:
        merged = self._merge(output[0] if isinstance(output, tuple) else output)
        return None if merged is None else on_image(output, lambda _: merged)

    def unmerge(self, module: nn.Module, args: tuple, output: Any) -> Any:
        top = self.stack.pop() if self.stack else None
        if top is None:
            return None
        plan, prefix = top
        for role in self.roles:
            self.run.running.pop(role, None)
        return on_image(output, lambda t: torch.cat((t[:, :prefix], plan.unmerge(t[:, prefix:])), 1))


@dataclass(eq=False)
class KVHooks:
    """Keys/values plans on one attention module: while it runs a self-attention (``to_k``/``to_v`` take the very
    tensor ``to_q`` took), the last ``H*W`` tokens of their input (the image) become the plan's ``kv`` of them; the
    queries keep every token. Raises if an active plan found no such projections (fused or unknown ones) although the
    attention ran (a step cache that serves the attention's output, e.g. Pyramid Attention Broadcast, runs none of its
    sub-modules: nothing to check then). The projection hooks follow the modules at ``to_q``/``to_k``/``to_v``
    (checked at every call of the attention: a LoRA loaded or unloaded after ``apply`` replaces them)."""

    run: BlockRun
    plan: KVPlan | None = None
    queries: torch.Tensor | None = None
    projected: int = 0
    ran: bool = False
    projections: list[Followed] = field(default_factory=list)

    def install(self, attention: nn.Module) -> list[Removable]:
        handles: list[Removable] = [
            attention.register_forward_pre_hook(self.enter, with_kwargs=True),
            attention.register_forward_hook(self.leave, with_kwargs=True),
        ]
        hooks = dict(zip(PROJECTIONS, (self.take_queries, self.keys_values, self.keys_values), strict=True))
        self.projections = [Followed(Point(attention, name, "input"), hook) for name, hook in hooks.items()]
        for projection in self.projections:
            projection.follow()
        for name, child in attention.named_modules():
            if name and name not in hooks and not isinstance(child, nn.ModuleList | nn.ModuleDict):
                handles.append(child.register_forward_pre_hook(self.inside))
        return [*handles, *self.projections]

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        for projection in self.projections:
            projection.follow()
        plan = self.run.take_plan()
        self.plan, self.queries, self.projected, self.ran = plan, None, 0, False
        if plan is not None:
            self.run.running["attn"] = plan

    def leave(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        plan, projected, ran = self.plan, self.projected, self.ran
        self.plan, self.queries, self.projected = None, None, 0
        self.run.running.pop("attn", None)
        if plan is not None and ran and projected < 2:
            raise ValueError(
                f"{self.run.site.name}: {type(getattr(module, 'processor', None)).__name__} attention does not project "
                "keys and values through to_q/to_k/to_v from the same tokens (fused projections or not a "
                "self-attention): keys/values methods cannot run here (call unfuse_qkv_projections())"
            )

    def inside(self, module: nn.Module, args: tuple) -> None:
        self.ran = True

    def take_queries(self, module: nn.Module, args: tuple) -> None:
        self.ran = True
        if self.plan is not None:
            self.queries = args[0]

    def keys_values(self, module: nn.Module, args: tuple) -> tuple | None:
        self.ran = True
        x, plan, n = args[0], self.plan, self.run.grid_tokens
        if plan is None or x is not self.queries or x.ndim != 3 or not 0 < n <= x.shape[1]:
            return None
        self.projected += 1
        prefix = x.shape[1] - n
        return (torch.cat((x[:, :prefix], plan.kv(x[:, prefix:])), 1), *args[1:])


@dataclass(eq=False)
class KwargMap:
    """Pre-hook: while ``role`` runs merged, a module's keyword arguments become ``fn(kwargs, plan)``."""

    run: BlockRun
    role: str
    fn: Any

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        plan = self.run.running.get(self.role)
        return None if plan is None else (args, self.fn(kwargs, plan))


@dataclass(eq=False)
class OutputMap:
    """Forward hook: while ``role`` runs merged, a module's output becomes ``fn(output, plan)``."""

    run: BlockRun
    role: str
    fn: Any

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> Any:
        plan = self.run.running.get(self.role)
        return None if plan is None else self.fn(output, plan)


def install_block(run: BlockRun, planner: Planner, roles: frozenset[str], keys_values: bool) -> list[Removable]:
    """Every hook of one block: its plan hook, then the hook sets of the merged ``roles`` (or of its
    self-attentions' keys and values; the span whose roles are exactly those merged), then the site's keyword and
    output maps."""
    site = run.site
    run.planner = planner
    eager = not roles and not keys_values
    handles: list[Removable] = [site.block.register_forward_pre_hook(PlanHook(run, eager), with_kwargs=True)]
    if keys_values:
        for attention in site.self_attention:
            handles += KVHooks(run).install(attention)
        roles = frozenset({"attn"})
    else:
        for role in roles & site.modules.keys():
            for module in (site.modules[role], *site.extra_modules.get(role, ())):
                handles += MergeHooks(run, role).install(module)
        spanned = roles & frozenset().union(*site.spans)
        if spanned in site.spans:
            handles += SpanHooks(run, spanned).install(site.block, *site.spans[spanned])
    for role in roles & site.kwarg_maps.keys():
        for module, fn in site.kwarg_maps[role]:
            handles.append(module.register_forward_pre_hook(KwargMap(run, role, fn), with_kwargs=True))
    for role in roles & site.output_maps.keys():
        for module, fn in site.output_maps[role]:
            handles.append(module.register_forward_hook(OutputMap(run, role, fn)))
    return handles


def on_image(output: Any, fn: Any) -> Any:
    """Apply ``fn`` to a module output, or to the first element (the image tokens) of a tuple output."""
    return (fn(output[0]), *output[1:]) if isinstance(output, tuple) else fn(output)
