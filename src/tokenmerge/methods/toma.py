"""ToMA: tile-local submodular destination selection, merge/unmerge as attention-like matmuls."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmerge.methods.base import (
    AUTO,
    FlagRoles,
    Layout,
    Method,
    ModelView,
    PlanCache,
    check_ratio,
    check_tile,
    integer,
    is_auto,
    real,
)
from tokenmerge.ops.select import TIE_TOL
from tokenmerge.ops.tiles import TileGrid
from tokenmerge.ops.toma import MergedKV, MergeOptions, TileMerge
from tokenmerge.ops.toma_dispatch import toma_merge
from tokenmerge.parallel import Band

logger = logging.getLogger("tokenmerge")

#: The FLOP ratio (unpatched / merged call) :meth:`ToMA.resolve` aims for with the default ``mode="auto"``.
FLOP_GOAL = 1.5
#: The ratio at which :meth:`ToMA.resolve` compares its candidates: mode and placement depend on the model, not on
#: ``ratio``, so that a larger ratio merges more in the same blocks.
DECIDING_RATIO = 0.5
#: Where FLOPs cannot be counted, :meth:`ToMA.resolve` takes tokens mode at UNet levels up to this downsampling (the
#: authors' placement; diffusion transformers: the default blocks).
FALLBACK_LEVEL = 4
#: Where no candidate reaches :data:`FLOP_GOAL`, a less faithful one is taken only if it cuts this much more (a
#: relative gain in the FLOP ratio): SD 1.5's mid block adds 0.3% and is left full.
MIN_GAIN = 0.01


@dataclass(eq=False)
class ToMACache(PlanCache):
    """A reuse group's plan for the current generation: for which batch size, grid, device and dtype (``key``), the
    plan (a merge, or ``mode="kv"`` its keys/values) and the tile-local destinations it was built from."""

    key: tuple | None = None
    merge: TileMerge | MergedKV | None = None
    dest: list[torch.Tensor] | None = None


@dataclass(frozen=True)
class ToMA(FlagRoles, Method):
    """Token Merge with Attention.

    The defaults ``mode="auto"`` and ``max_downsample="auto"`` are made concrete per model at ``apply``
    (:meth:`resolve`) from where its work is: the FLOPs of its first merged call at its native resolution, counted
    exactly on a weightless twin (:mod:`tokenmerge.cost`). Candidates, most faithful first: keys/values at the finest
    level (every query kept; the self-attention's keys and values from the tokens facility location picks per
    tile), then tokens mode (the merged sub-modules run on merged tokens, outputs unmerged) on growing sets of UNet
    levels from the finest (diffusion transformers: the adapter's default blocks). The first that cuts the FLOPs by
    :data:`FLOP_GOAL` is taken, else the one that cuts the most. On attention-heavy toys keys/values mode qualifies;
    on SD 1.5, SDXL, Flux, SD 3.5 and PixArt only tokens mode does.

    Args:
        ratio: fraction of tokens removed in each tile, in ``[0, 1)``; 0 leaves the model untouched.
        tile: ``(tile_h, tile_w)`` of the local windows in which destinations are chosen and tokens merged (an
            integer ``t``: ``(t, t)``).
        tau: softmax temperature of the merge assignment ``softmax(tau * cos)`` over a tile's destinations, positive
            and finite: large is nearly hard (each token to its most similar destination), small spreads a token over
            several (smoother under input noise, blurrier); docs/benchmarks.md says why the default is 300.
        tie_tol: destination selection treats gains within ``tie_tol`` per tile token of the best as tied and takes
            the lowest index among them, so rounding noise (batch mates, attention backend, compiler) cannot flip
            picks; 0 keeps exact ties only.
        locality: ``lambda`` of a distance prior: selection and weights use ``cos - lambda * d^2`` for tokens ``d``
            grid steps apart (0: none), so that destinations spread over the tile and flat regions merge into nearby
            ones.
        merge_attn / merge_crossattn / merge_mlp: ``mode="tokens"``: run self-attention / cross-attention queries /
            the MLP on merged tokens (the whole block by default; attention alone is more faithful and slower, see
            docs/benchmarks.md). ``mode="kv"`` merges the self-attention's keys and values only: turning a flag off
            there is an error.
        mode: ``"tokens"``: the merged sub-modules run on merged tokens, their outputs unmerged; ``"kv"``: every
            query kept, the self-attention's keys and values taken from ToMA's selection, nothing to unmerge;
            ``"auto"`` (default): chosen per model at ``apply`` (:meth:`resolve`).
        kv_tokens: ``mode="kv"`` only: keys and values projected from the ``"destinations"`` themselves (``x[D]``,
            no averaging) or from the ``"merged"`` tokens ``M x`` (weighted means of each destination's sources).
        dest_every: recompute destinations every this many merged steps (reused in between).
        weight_every: recompute merge weights every this many merged steps. Within a step, the first patched block of a
            reuse group (a UNet level on the down, mid or up path) computes them and the later blocks reuse them.
        max_downsample: (keyword) merge in blocks whose grid is at most this many times smaller than the latent
            (4: the 64x64, 32x32 and 16x16-token levels of SD 1.5 at 512px, and both attention levels of SDXL);
            ``None``: the finest level that has attention (SD 1.x: 1, SDXL: 2; ToDo's placement); ``"auto"``
            (default): chosen with the mode by :meth:`resolve` (keys/values mode: the finest level).
        merge_every: merge at steps 0, ``merge_every``, 2 ``merge_every``, ... only and run the full model in
            between (the authors' schedule: 3, see :meth:`authors_schedule`).
        steps: (keyword) 0-based denoising steps at which merging is active (``None``: all; with ``merge_every``,
            those of them it keeps); the others run the full model.
        blocks: (keyword) diffusion transformers: merged block index ranges per block kind, half-open, e.g.
            ``{"double": (0, None), "single": range(5, 38)}`` (Flux kinds ``double``/``single``, SD3 ``joint``,
            PixArt ``blocks``); kinds not given keep the model's default (Flux: all but the first
            ``round(5 * n / 19)`` double-stream and ``round(5 * n / 38)`` single-stream blocks, i.e. five of each on
            Flux.1; SD3, PixArt: every block). Reuse groups there are one per kind (stream).
    """

    ratio: float = 0.5
    tile: tuple[int, int] = (4, 4)
    tau: float = 300.0
    tie_tol: float = TIE_TOL
    locality: float = 0.0
    merge_attn: bool = True
    merge_crossattn: bool = True
    merge_mlp: bool = True
    mode: str = AUTO
    kv_tokens: str = "destinations"
    max_downsample: int | str | None = field(default=AUTO, kw_only=True)
    dest_every: int = 5
    weight_every: int = 1
    merge_every: int = 1

    cache_type = ToMACache
    band_local = True

    def validate(self) -> None:
        self._set("ratio", check_ratio(self.ratio))
        self._set("tile", check_tile(self.tile))
        self._set("tau", real("tau", self.tau, 0.0, math.inf, low_open=True, high_open=True))
        self._set("tie_tol", real("tie_tol", self.tie_tol, 0.0, 1.0, high_open=True))
        self._set("locality", real("locality", self.locality, 0.0, math.inf, high_open=True))
        self.check_flags()
        if self.mode not in ("tokens", "kv", AUTO):
            raise ValueError(f"mode must be 'tokens', 'kv' or 'auto', got {self.mode!r}")
        if self.kv_tokens not in ("destinations", "merged"):
            raise ValueError(f"kv_tokens must be 'destinations' or 'merged', got {self.kv_tokens!r}")
        for name in ("dest_every", "weight_every", "merge_every"):
            self._set(name, integer(name, getattr(self, name), 1))
        if self.mode == "kv" and not (self.merge_attn and self.merge_crossattn and self.merge_mlp):
            raise ValueError(
                "mode='kv' merges only the self-attention's keys and values: merge_attn / merge_crossattn / merge_mlp "
                "must stay True (they choose what mode='tokens' merges; set mode='tokens' to merge less)"
            )
        if self.mode == "tokens" and self.kv_tokens != "destinations":
            raise ValueError(f"kv_tokens={self.kv_tokens!r} applies in mode='kv' only")
        if self.mode == "kv" and is_auto(self.max_downsample):
            self._set("max_downsample", None)

    def resolve(self, model: ModelView) -> ToMA:
        """``mode`` and ``max_downsample`` left ``"auto"`` made concrete for ``model``: the first of
        :meth:`candidates` whose merged call at ratio :data:`DECIDING_RATIO` cuts the FLOPs by :data:`FLOP_GOAL`
        (``model.flop_ratio``), else the one
        that cuts the most (by more than :data:`MIN_GAIN` over a more faithful one); where FLOPs cannot be counted,
        tokens mode at levels up to :data:`FALLBACK_LEVEL`."""
        candidates = self.candidates(model.layout)
        if len(candidates) == 1:
            return candidates[0]
        best, best_ratio = None, 0.0
        for candidate in candidates:
            ratio = model.flop_ratio(dataclasses.replace(candidate, ratio=DECIDING_RATIO))
            if ratio is None:
                tokens = [c for c in candidates if c.mode == "tokens" and (c.max_downsample or 1) <= FALLBACK_LEVEL]
                fallback = tokens[-1] if tokens else candidates[-1]
                logger.info("%s: FLOPs not counted; using %s", self.describe(), fallback.describe())
                return fallback
            if ratio >= FLOP_GOAL:
                return candidate
            if ratio > best_ratio * (1 + MIN_GAIN):
                best, best_ratio = candidate, ratio
        return best

    def candidates(self, layout: Layout) -> list[ToMA]:
        """The concrete configurations :meth:`resolve` chooses from, most faithful first: keys/values mode at the
        finest level (where ``mode`` allows it and the options apply to it), then tokens mode at levels up to each
        UNet level from the finest (one placement on a diffusion transformer: its default blocks), or at the given
        ``max_downsample``. Raises ``ValueError`` when the options fit none."""
        modes = ["kv", "tokens"] if self.mode == AUTO else [self.mode]
        levels: list[int | None] = [self.max_downsample]  # type: ignore[list-item]
        if is_auto(self.max_downsample):
            levels = list(layout.levels) if layout.family == "unet" else [None]
        out, errors = [], []
        for mode in modes:
            for level in levels[:1] if mode == "kv" and is_auto(self.max_downsample) else levels:
                try:
                    chosen = None if mode == "kv" and is_auto(self.max_downsample) else level
                    out.append(dataclasses.replace(self, mode=mode, max_downsample=chosen))
                except ValueError as error:
                    errors.append(f"mode={mode!r}: {error}")
        if not out:
            raise ValueError(f"{self.describe()}: no mode fits these options ({'; '.join(dict.fromkeys(errors))})")
        return out

    @property
    def is_identity(self) -> bool:
        return self.ratio == 0.0

    def cut_more(self, layout: Layout) -> list[Method]:
        """Keys/values mode: tokens mode where placed, then at every block; tokens mode: whole blocks (see
        :class:`~tokenmerge.methods.base.FlagRoles`)."""
        if not self.keys_values:
            return super().cut_more(layout)
        return [
            dataclasses.replace(self, mode="tokens"),
            dataclasses.replace(self, mode="tokens", **layout.everywhere()),
        ]

    def check_band(self, band: Band) -> str | None:
        """Each rank tiles its own band. Bands of whole tile rows (every band is ``band.rows`` high) give the very
        tiles of the whole grid, so the result equals a single-device run; other bands are tiled from their first
        row, tiles cut at band edges (a different tiling: the returned note)."""
        tile_h = min(self.tile[0], band.height)
        if band.rows % tile_h == 0:
            return None
        return (
            f"its {band.rows}-row bands of the {band.height}x{band.width} grid are not whole {tile_h}-row tiles: each "
            "rank tiles its own rows (tiles cut at band edges), so the result differs from a single-device run"
        )

    @property
    def merge_options(self) -> MergeOptions:
        """The options a merge is built with (:func:`tokenmerge.ops.toma_dispatch.toma_merge`)."""
        return MergeOptions(self.ratio, self.tau, self.tie_tol, self.locality)

    @property
    def keys_values(self) -> bool:  # type: ignore[override]
        return self.mode == "kv"

    @property
    def roles(self) -> frozenset[str]:
        return frozenset({"attn"}) if self.keys_values else super().roles

    @classmethod
    def authors_schedule(cls, **options: Any) -> ToMA:
        """The authors' reference code (WenboLuu/ToMA): tokens mode, merge at steps 0, 3, 6, ... with fresh
        destinations and weights at each merged step, the full model in between; ``options`` as the class's. On the
        command line: ``toma:mode=tokens,merge_every=3,dest_every=1``."""
        return cls(**{"mode": "tokens", "merge_every": 3, "dest_every": 1, "weight_every": 1, **options})

    def active(self, step: int) -> bool:
        return super().active(step) and step % self.merge_every == 0

    def phase(self, step: int, num_steps: int | None) -> tuple[bool, bool]:
        """``(destinations due, weights due)`` at ``step``, counted in merged steps ``m = step // merge_every``:
        weights every ``weight_every``; destinations with the first weights at least ``dest_every`` after the last
        destinations (from ``m = 0``)."""
        step //= self.merge_every
        weights_due = step % self.weight_every == 0
        last_dest = 0
        for s in range(self.weight_every, step + 1, self.weight_every):
            if s - last_dest >= self.dest_every:
                last_dest = s
        return weights_due and last_dest == step, weights_due

    def plan(self, x: torch.Tensor, grid: tuple[int, int], cache: ToMACache, phase: Hashable) -> TileMerge | MergedKV:
        """The group's merge (``mode="kv"``: its keys/values): computed by its first block in a step where weights
        are due (with new destinations if those are due too) or when nothing is cached for this batch size, grid,
        device and dtype; else reused."""
        dest_due, weights_due = phase
        key = (x.shape[0], *grid, x.device, x.dtype)
        if cache.key != key:
            cache.key, cache.merge, cache.dest, cache.fresh = key, None, None, False
        if cache.merge is None or (weights_due and not cache.fresh):
            dest = None if dest_due else cache.dest
            tiles = TileGrid(*grid, *self.tile)
            merge, cache.dest = toma_merge(x, tiles, self.merge_options, dest)
            cache.merge = MergedKV(merge, self.kv_tokens == "destinations") if self.keys_values else merge
            cache.fresh = True
        return cache.merge
