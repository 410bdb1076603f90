"""Step caches next to token merging: which step caches run inside a denoiser, and which of them a method can run
with.

A step cache reuses a module's output from an earlier denoising step instead of running the module: diffusers'
caches (``model.enable_cache(...)`` / ``apply_*``: FirstBlockCache, MagCache, SeaCache, TaylorSeer, Pyramid
Attention Broadcast, FasterCache) replace the module's ``forward`` through diffusers' ``HookRegistry``; DeepCache
replaces the ``forward`` of a UNet's blocks by closures. tokenmerge's torch hooks are registered on the modules, not on
their ``forward``, so they keep firing around any such replacement, and enabling a cache and ``tm.apply`` commute:
each installs and removes only its own parts. Where the cache sits decides whether the two compose:

- **On a whole patched block, or above one** (FirstBlockCache, MagCache, SeaCache, TaylorSeer with block
  ``cache_identifiers`` or in lite mode, DeepCache's ``Transformer2DModel`` wrappers): a skipped block runs none of
  its sub-modules, so it computes no plan (plans are computed when the first merged sub-module runs,
  :meth:`tokenmerge.hooks.BlockRun.take_plan`), and what the cache stores is the block's full-resolution output.
  Exact composition.
- **On a sub-module of a patched block** (Pyramid Attention Broadcast, FasterCache and TaylorSeer's default hooks,
  all on attention modules): the cached output holds the *merged* rows of one step's plan, which
  the next plans unmerge to other tokens (and CA-ToMe's ``batch="sample"`` to other lengths). This cannot work for a
  method that merges that sub-module: :func:`check_caches` raises ``ValueError`` at ``apply``, and again when a
  pipeline loop or a bare denoiser's generation starts (a cache enabled after ``apply``). Keys/values methods (ToDo)
  keep every query, so an attention's output is full size: a cache on the attention module composes with them, one
  inside it (on ``to_k``/``to_v``) does not.

Step tracking is unaffected: a pipeline's scheduler drives the step whatever the cache skips, and no cache here skips
a whole denoiser call (FasterCache drops the unconditional half of the batch inside the call; plan caches are keyed
by batch size). Both reset per generation: diffusers resets its stateful hooks at the end of a pipeline call, the
patch drops its plans when the pipeline's loop ends; :func:`tokenmerge.reset` on a bare denoiser resets both.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from diffusers.hooks import HookRegistry
from torch import nn

from tokenmerge.adapters.base import Site
from tokenmerge.methods.base import Method

# diffusers hook names (``diffusers.hooks.*``) of the step caches, with the cache's name
DIFFUSERS_CACHE_HOOKS = {
    "fbc_leader_block_hook": "FirstBlockCache",
    "fbc_block_hook": "FirstBlockCache",
    "mag_cache_leader_block_hook": "MagCache",
    "mag_cache_block_hook": "MagCache",
    "pyramid_attention_broadcast": "PyramidAttentionBroadcast",
    "faster_cache_denoiser": "FasterCache",
    "faster_cache_block": "FasterCache",
    "taylorseer_cache": "TaylorSeerCache",
}
# packages whose functions replace a module's forward to serve cached outputs
CACHE_PACKAGES = {"DeepCache": "DeepCache", "cache_dit": "cache-dit"}


@dataclass(frozen=True)
class CachedModule:
    """A module whose forward a step cache replaced: its qualified name in the denoiser and the cache's name."""

    name: str
    module: nn.Module
    cache: str


def cache_of(module: nn.Module) -> str | None:
    """The step cache that replaced ``module``'s forward, if one did."""
    registry = vars(module).get("_diffusers_hook")
    for hook in getattr(registry, "hooks", {}):
        name = DIFFUSERS_CACHE_HOOKS.get(hook) or ("SeaCache" if hook.startswith("sea_cache") else None)
        if name is not None:
            return name
    forward = vars(module).get("forward")
    package = getattr(forward, "__module__", None) or ""
    return CACHE_PACKAGES.get(package.split(".")[0])


def step_caches(model: nn.Module) -> list[CachedModule]:
    """Every module of ``model`` (itself included) whose forward a step cache replaced."""
    found = []
    for name, module in model.named_modules():
        cache = cache_of(module)
        if cache is not None:
            found.append(CachedModule(name, module, cache))
    return found


def _inside(site: Site, keys_values: bool) -> Iterator[nn.Module]:
    """The modules of ``site`` whose cached output would hold merged tokens: every module strictly inside the block
    for a merging method; for a keys/values method, those strictly inside its self-attention modules."""
    roots = site.self_attention if keys_values else (site.block,)
    for root in roots:
        for module in root.modules():
            if module is not root:
                yield module


def check_caches(method: Method, model: nn.Module, sites: list[Site]) -> None:
    """Raise ``ValueError`` if a step cache replaced the forward of a module whose output ``method`` merges (see the
    module's docstring); caches on whole blocks or above them compose."""
    if not method.roles:
        return
    cached = {id(c.module): c for c in step_caches(model)}
    if not cached:
        return
    names = {id(m): n for n, m in model.named_modules()}
    for site in sites:
        for module in _inside(site, method.keys_values):
            found = cached.get(id(module))
            if found is not None:
                what = "key/value projections" if method.keys_values else "merged tokens"
                raise ValueError(
                    f"{method.describe()} cannot run with {found.cache} on {names[id(module)]}: it caches that "
                    f"module's output, which holds {what} of {site.name} whose meaning changes with every plan; use a "
                    "cache on whole blocks (FirstBlockCache, MagCache, SeaCache, TaylorSeer with block "
                    "cache_identifiers, DeepCache) "
                    "or leave that block unmerged (blocks=)"
                )


def reset_caches(model: nn.Module) -> None:
    """Reset the state of every diffusers step cache in ``model`` (what a pipeline does at the end of a call)."""
    for module in model.modules():
        registry = vars(module).get("_diffusers_hook")
        if isinstance(registry, HookRegistry):
            registry.reset_stateful_hooks(recurse=False)
