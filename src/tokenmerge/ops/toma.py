"""ToMA merge and unmerge as dense, attention-like matrices over tiles.

Per tile of ``s`` tokens with ``k`` destinations ``D``, similarities ``S = X_hat X_hat^T - lambda * d^2`` (cosine,
less an optional locality prior: ``d`` the grid distance between two tokens, ``lambda`` = ``locality``):
destinations by facility location on ``S``; ``A = softmax_over_destinations(tau * S[D])`` (``k x s``, columns sum
to 1), with each destination's own column forced one-hot; merge ``Y = M @ X`` with ``M = A / rowsum(A)``; unmerge
``X' = A^T @ Y'``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmerge.ops.select import TIE_TOL, cosine_similarity, facility_location
from tokenmerge.ops.tiles import TileGrid
from tokenmerge.plans import KVPlan, MergePlan


@dataclass(frozen=True)
class MergeOptions:
    """What a ToMA merge is built with (:class:`tokenmerge.ToMA`'s options of the same names): ``ratio`` the fraction
    of each tile's tokens removed, ``tau`` the assignment's softmax temperature, ``tie_tol`` the selection's tie
    tolerance per tile token, ``locality`` the distance prior's ``lambda`` (0: none)."""

    ratio: float
    tau: float
    tie_tol: float = TIE_TOL
    locality: float = 0.0


def keep_count(tile_size: int, ratio: float) -> int:
    """Destinations kept in a tile of ``tile_size`` tokens when a fraction ``ratio`` is removed (at least 1)."""
    return max(1, min(tile_size, round((1.0 - ratio) * tile_size)))


def select_destinations(
    tiles: torch.Tensor, k: int, tie_tol: float = TIE_TOL, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """``(B, T, s, C)`` tokens -> ``(B, T, k)`` tile-local destination indices (facility location per tile/sample on
    cosine similarity less ``prior`` ``(s, s)`` if given, stable ties: see
    :func:`~tokenmerge.ops.select.facility_location`)."""
    sim = cosine_similarity(tiles)
    return facility_location(sim if prior is None else sim - prior, k, tie_tol)


def merge_weights(
    tiles: torch.Tensor, dest: torch.Tensor, tau: float, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """Assignment ``A`` of shape ``(B, T, k, s)`` in float32: softmax over destinations of ``tau`` times cosine
    similarity (less ``prior`` ``(s, s)``, rows taken at the destinations), destination columns one-hot. Every
    column sums to 1 and every row to at least 1."""
    xn = F.normalize(tiles.float(), dim=-1, eps=1e-6)
    dn = torch.gather(xn, 2, dest.unsqueeze(-1).expand(*dest.shape, xn.shape[-1]))
    logits = dn @ xn.transpose(-1, -2)
    if prior is not None:
        logits = logits - prior[dest]
    assign = torch.softmax(tau * logits, dim=-2)
    own = F.one_hot(dest, tiles.shape[2]).to(assign.dtype)
    return torch.where(own.sum(-2, keepdim=True) > 0, own, assign)


@dataclass
class TileMerge(MergePlan):
    """A ToMA merge over a :class:`TileGrid`: per region, merge ``(B, T, k, s)`` and unmerge ``(B, T, s, k)``.

    ``dest`` holds the grid index of every merged token, ``(B, K)`` in merged order, for position lookups
    (rotary embeddings take the destination's position). ``kernel``: which implementation built it (``"torch"``
    here; see :mod:`tokenmerge.ops.toma_dispatch`).
    """

    grid: TileGrid
    merge_mats: list[torch.Tensor]
    unmerge_mats: list[torch.Tensor]
    dest: torch.Tensor
    kernel: str = "torch"

    @classmethod
    def from_assignment(
        cls, grid: TileGrid, assign: list[torch.Tensor], dest: list[torch.Tensor], dtype: torch.dtype
    ) -> TileMerge:
        """Build from per-region assignments ``A`` and tile-local destinations; matrices are stored in ``dtype``."""
        slots = grid.token_index(dest[0].device)
        dest_global = torch.cat(
            [torch.gather(s.expand(d.shape[0], -1, -1), 2, d).flatten(1) for s, d in zip(slots, dest, strict=True)],
            1,
        )
        return cls(
            grid,
            [(a / a.sum(-1, keepdim=True)).to(dtype) for a in assign],
            [a.transpose(-1, -2).to(dtype) for a in assign],
            dest_global,
        )

    @property
    def num_merged(self) -> int:
        return self.dest.shape[1]

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, C) -> (B, K, C)``: each destination becomes the weighted mean of its sources."""
        parts = [(m @ t).flatten(1, 2) for m, t in zip(self.merge_mats, self.grid.fold(x), strict=True)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, K, C) -> (B, N, C)``: each token becomes the convex mix ``A^T`` of destination outputs."""
        sizes = [u.shape[1] * u.shape[3] for u in self.unmerge_mats]
        tiles = [
            u @ part.unflatten(1, (u.shape[1], u.shape[3]))
            for u, part in zip(self.unmerge_mats, y.split(sizes, 1), strict=True)
        ]
        return self.grid.unfold(tiles)


@dataclass
class MergedKV(KVPlan):
    """Self-attention keys/values from a ToMA merge (every query kept, nothing to unmerge): ``kv(x)``
    ``(B, N, C) -> (B, K, C)`` is the merged tokens ``M x`` or, with ``select``, the destination tokens themselves
    ``x[D]`` (no averaging); ``kv_index`` ``(B, K)``: the grid position (destination) of every key, per sample."""

    merge: TileMerge
    select: bool = False

    @property
    def kv_index(self) -> torch.Tensor:  # type: ignore[override]
        return self.merge.dest

    @property
    def num_kv(self) -> int:
        return self.merge.num_merged

    @property
    def kernel(self) -> str:  # type: ignore[override]
        return self.merge.kernel

    def kv(self, x: torch.Tensor) -> torch.Tensor:
        if self.select:
            dest = self.merge.dest
            return torch.gather(x, 1, dest.unsqueeze(-1).expand(*dest.shape, x.shape[-1]))
        return self.merge.merge(x)


def toma_merge_torch(
    x: torch.Tensor, grid: TileGrid, options: MergeOptions, dest: list[torch.Tensor] | None = None
) -> tuple[TileMerge, list[torch.Tensor]]:
    """Build the ToMA merge of ``x`` ``(B, N, C)`` on ``grid`` with ``options`` in torch (any device); reuses
    tile-local ``dest`` if given, else selects them (facility location, stable ties within ``tie_tol``);
    ``locality`` (``lambda``) subtracts ``lambda * d^2`` from the similarities of tokens ``d`` grid steps apart, in
    selection and weights.

    Returns the merge and the tile-local destinations (one ``(B, T_r, k_r)`` tensor per region) for later reuse.
    """
    tiles = grid.fold(x)
    lam = options.locality
    priors = [lam * r.sq_distances(x.device) if lam else None for r in grid.regions]
    if dest is None:
        dest = [
            select_destinations(t, keep_count(t.shape[2], options.ratio), options.tie_tol, p)
            for t, p in zip(tiles, priors, strict=True)
        ]
    assign = [merge_weights(t, d, options.tau, p) for t, d, p in zip(tiles, dest, priors, strict=True)]
    return TileMerge.from_assignment(grid, assign, dest, x.dtype), dest
