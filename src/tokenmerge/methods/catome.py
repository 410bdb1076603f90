"""CA-ToMe: cached adaptive token merging (adaptive similarity threshold in 2x2 cells, pairs cached across steps)."""

from __future__ import annotations

import dataclasses
import logging
import numbers
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from tokenmerge.methods.base import AUTO, ModelView, PlanCache, integer, real
from tokenmerge.methods.cells import CellMethod
from tokenmerge.ops.bipartite import SlotMerge, bipartite_match, slot_merge, top_sources

logger = logging.getLogger("tokenmerge")

#: Steps of the reference schedules' base length.
REFERENCE_STEPS = 50
#: The CA-ToMe paper's checkpoint schedules (0-based steps of a 50-step run); ``config3`` was reported best.
SCHEDULES: dict[str, tuple[int, ...]] = {
    "config1": (0, 1, 2, 3, 5, 10, 15, 25, 35),
    "config2": (0, 10, 11, 12, 15, 20, 25, 30, 35, 45),
    "config3": (0, 8, 11, 13, 20, 25, 30, 35, 45, 46, 47, 48, 49),
    "config4": (0, 9, 13, 14, 15, 28, 29, 32, 36, 45),
    "adaptive": (0, 1, 5, 7, 10, 12, 15, 35, 40, 45, 46, 47, 48, 49),
    "every5": tuple(range(0, REFERENCE_STEPS, 5)),
}
BATCH_MODES = (AUTO, "sample", "max", "min")
#: What ``batch="auto"`` becomes where a patched self-attention takes no key mask (``"sample"`` needs one).
BATCH_FALLBACK = "min"


def scale_schedule(steps: Sequence[int], num_steps: int, base: int = REFERENCE_STEPS) -> frozenset[int]:
    """Checkpoints ``s`` of a ``base``-step schedule at ``floor(s * num_steps / base)`` of a ``num_steps`` run."""
    return frozenset(s * num_steps // base for s in steps if s < base)


@dataclass(eq=False)
class PairCache(PlanCache):
    """One block's matching for the current generation, with the batch size, grid, device and dtype it was made for."""

    key: tuple | None = None
    plan: SlotMerge | None = None


@dataclass(frozen=True)
class CAToMe(CellMethod):
    """Cached Adaptive Token Merging (Saghatchian et al.), built on ToMeSD's 2x2-cell bipartite matching.

    Per block: one destination per ``sy x sx`` cell (random or top-left), every source's best destination by cosine
    similarity, and every source with best similarity ``>= threshold`` merged (mean) into it; unmerge copies. The
    matching (which sources merge where) is computed at checkpoint steps and reused by the same block in between.

    How many sources merge in a batch (``batch``):

    - ``"auto"`` (default): ``"sample"`` where every patched self-attention takes a key mask (UNets, PixArt, Flux on
      a backend with masks), else ``"min"`` (SD3's joint attention, the flash and sage backends), chosen at ``apply``
      and again at every pipeline call's start (a backend set in between, e.g. ``with attention_backend("flash")``,
      switches that call to ``"min"``), logged; ``tm.summary`` shows the result. ``"min"`` is the fallback because it
      keeps the threshold a bound: no pair below it is ever merged, in any sample (at batch size 1 it is
      ``"sample"``); ``"max"`` would merge pairs below it in samples whose batch mates merge more.
    - ``"sample"``: each sample merges exactly its own sources above the threshold, as if it ran alone: independent
      of its batch mates, the other guidance half and the batch size (random destinations are drawn whatever the
      batch size). Samples with fewer merges keep more rows; the others are padded to the batch's longest with zero
      rows that self-attention masks out as keys (an additive ``-inf``-like key bias, so the softmax is exactly that
      of the sample alone; padded query rows are computed and discarded). Cost: every sample runs at the longest
      sample's length, and the mask (always passed, so that shapes and kernels do not depend on the content) rules
      out flash kernels on GPU. Needs self-attention that takes an ``attention_mask``: elsewhere ``apply`` (or the
      call's start) raises ``ValueError``.
    - ``"max"``: the reference: ``r = max_b count_b``; every sample merges its top ``r`` sources (some below the
      threshold), so batch mates change each other's result.
    - ``"min"``: ``r = min_b count_b``: only pairs above the threshold merge in every sample (conservative).

    The count needs one host sync per block at checkpoint steps only (cached plans are reused without one).

    Args:
        threshold: cosine similarity in ``[-1, 1]`` at or above which a source is merged.
        schedule: checkpoint steps: a name from :data:`SCHEDULES` (a 50-step schedule scaled to the run's step count
            by :func:`scale_schedule`), an int ``n`` (every ``n``-th step) or explicit 0-based steps (used as given).
            Steps before a block's first plan of a generation always compute one.
        num_steps: the run's step count for scaling a named schedule; ``None``: the steps the pipeline runs (the
            scheduler's count, less those an img2img ``strength`` skips), or 50 for a bare denoiser.
        batch: ``"auto"``, ``"sample"``, ``"max"`` or ``"min"`` (see above).
        bucket: static shapes for ``torch.compile``: the merged length is rounded up to a multiple of ``bucket``
            (``"sample"``: more padding rows; ``"max"``/``"min"``: fewer merged sources).
        max_downsample, sx, sy, use_rand, merge_attn, merge_crossattn, merge_mlp, seed, steps, blocks: keyword-only,
            as :class:`~tokenmerge.ToMeSD`.
    """

    threshold: float = 0.7
    schedule: str | int | Sequence[int] = "config3"
    num_steps: int | None = field(default=None, kw_only=True)
    batch: str = field(default=AUTO, kw_only=True)
    bucket: int = field(default=1, kw_only=True)

    cache_scope = "block"
    cache_type = PairCache
    content_adaptive = True

    def validate(self) -> None:
        super().validate()
        self._set("threshold", real("threshold", self.threshold, -1.0, 1.0))
        sched = self.schedule
        if isinstance(sched, str):
            if sched not in SCHEDULES:
                raise ValueError(f"unknown schedule {sched!r}; choose from {', '.join(SCHEDULES)}, an int or steps")
        elif isinstance(sched, numbers.Integral) and not isinstance(sched, bool):
            self._set("schedule", integer("schedule (every n steps)", sched, 1))
        elif isinstance(sched, Iterable) and not isinstance(sched, bytes | torch.Tensor):
            self._set("schedule", tuple(sorted({integer("schedule steps", s, 0) for s in sched})))
        else:
            raise TypeError(f"schedule must be a name, an int or a sequence of steps, got {type(sched).__name__}")
        if self.num_steps is not None:
            self._set("num_steps", integer("num_steps", self.num_steps, 1))
        if self.batch not in BATCH_MODES:
            raise ValueError(f"batch must be one of {', '.join(BATCH_MODES)}, got {self.batch!r}")
        self._set("bucket", integer("bucket", self.bucket, 1))

    def resolve(self, model: ModelView) -> CAToMe:
        """``batch="auto"`` made concrete: ``"sample"`` where every self-attention it patches takes a key mask (or
        attention is not merged), else :data:`BATCH_FALLBACK`."""
        method = super().resolve(model)
        if method.batch != AUTO:
            return method
        exact = dataclasses.replace(method, batch="sample")
        problem = model.key_mask_problem(exact) if "attn" in exact.roles else None
        if problem is None:
            return exact
        logger.debug("CAToMe batch='auto' is %r: per-sample merging needs a key mask, but %s", BATCH_FALLBACK, problem)
        return dataclasses.replace(method, batch=BATCH_FALLBACK)

    @property
    def key_mask_option(self) -> tuple[str, str] | None:
        if self.batch != "sample":
            return None
        return ("batch='sample'", "use batch='auto' (the default), 'min' or 'max' here")

    @property
    def random_any_batch(self) -> bool:
        return self.batch == "sample"  # as if each sample ran alone: the same draws at any batch size

    def checkpoints(self, num_steps: int | None = None) -> frozenset[int] | None:
        """The 0-based checkpoint steps of a ``num_steps`` run (``None`` for an every-n schedule: ``step % n == 0``)."""
        if isinstance(self.schedule, int):
            return None
        if isinstance(self.schedule, str):
            return scale_schedule(SCHEDULES[self.schedule], self.num_steps or num_steps or REFERENCE_STEPS)
        return frozenset(self.schedule)

    def is_checkpoint(self, step: int, num_steps: int | None = None) -> bool:
        points = self.checkpoints(num_steps)
        return step % self.schedule == 0 if points is None else step in points

    def phase(self, step: int, num_steps: int | None) -> bool:
        """Whether ``step`` is a checkpoint (pairs recomputed)."""
        return self.is_checkpoint(step, num_steps)

    def plan(self, x: torch.Tensor, grid: tuple[int, int], cache: PairCache, phase: Hashable) -> SlotMerge | None:
        key = (x.shape[0], *grid, x.device, x.dtype)
        if cache.key != key or phase:
            cache.key, cache.plan = key, self._match(x, grid, cache)
        return cache.plan

    def _match(self, x: torch.Tensor, grid: tuple[int, int], cache: PairCache) -> SlotMerge | None:
        h, w = grid
        n = h * w
        if h < self.sy or w < self.sx:
            return None
        dst = self.destinations(x, grid, cache.generation)
        src, best, match = bipartite_match(x, dst)
        fraction = cache.generation.merged_fraction
        if fraction is not None:  # counting FLOPs at a given merged fraction (see Generation)
            r = round(fraction * src.numel())
            rows = min(n, -(-(n - r) // self.bucket) * self.bucket)
            key_bias = self.batch == "sample"
            return slot_merge(n, dst, src, match, top_sources(best, r), x.dtype, key_bias=key_bias, rows=rows)
        above = best >= self.threshold
        if self.batch == "sample":
            return slot_merge(n, dst, src, match, above, x.dtype, self.bucket, key_bias=True)
        counts = above.sum(-1)
        r = int(counts.max() if self.batch == "max" else counts.min())
        rows = min(n, -(-(n - r) // self.bucket) * self.bucket)
        return slot_merge(n, dst, src, match, top_sources(best, n - rows), x.dtype, key_bias=False, rows=rows)
