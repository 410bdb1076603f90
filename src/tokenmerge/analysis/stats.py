"""Redundancy statistics of one block input: pure tensor functions (no state).

Similarities are cosines in float32. Sets are *codes*: a ``(B, L)`` long tensor whose entry ``l`` is ``v >= 0`` when
the pair ``(l, v)`` is in the sample's set and ``-1`` when position ``l`` contributes nothing. A merge pair set
(source ``l`` -> destination ``v``) and a destination set (``v = 0`` for chosen tokens) are both codes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tokenmerge.ops.bipartite import top_sources
from tokenmerge.ops.select import cosine_similarity
from tokenmerge.ops.tiles import TileGrid
from tokenmerge.ops.toma import keep_count, merge_weights, select_destinations


def histogram(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts ``(bins,)`` (float64) of ``values`` in equal bins over ``[-1, 1]`` (cosines; the edges are included)."""
    return torch.histc(values.detach().float().clamp(-1, 1).flatten(), bins, -1.0, 1.0).double().cpu()


def shares_above(values: torch.Tensor, thresholds: Sequence[float]) -> list[float]:
    """Fraction of ``values`` at or above each threshold."""
    flat = values.detach().float().flatten()
    return [float((flat >= t).float().mean()) for t in thresholds]


def tile_best(x: torch.Tensor, tiles: TileGrid) -> torch.Tensor:
    """``(B, N')``: every token's best cosine similarity to another token of its tile (``max_{j != i} S_ij``).

    Tokens of one-token tiles have no partner and are left out (``N' <= N``; order is tile-major, not grid order).
    """
    parts = []
    for t in tiles.fold(x):
        s = t.shape[2]
        if s < 2:
            continue
        sim = cosine_similarity(t).masked_fill(torch.eye(s, dtype=torch.bool, device=x.device), float("-inf"))
        parts.append(sim.amax(-1).flatten(1))
    return torch.cat(parts, 1) if parts else x.new_zeros(x.shape[0], 0, dtype=torch.float32)


def pair_codes(match: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """Codes ``(B, S)`` of the merge pairs: source ``l`` -> destination ``match[:, l]`` where ``merged``, else -1."""
    return torch.where(merged, match, torch.full_like(match, -1))


def threshold_pairs(best: torch.Tensor, match: torch.Tensor, threshold: float) -> torch.Tensor:
    """CA-ToMe's pairs: every source whose best similarity is ``>= threshold``."""
    return pair_codes(match, best >= threshold)


def top_pairs(best: torch.Tensor, match: torch.Tensor, num_tokens: int, ratio: float) -> torch.Tensor:
    """ToMeSD's pairs: the ``r = int(ratio * N)`` sources with the highest best similarity (at most all sources)."""
    return pair_codes(match, top_sources(best, min(int(num_tokens * ratio), best.shape[-1])))


def jaccard_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(B,)``: ``1 - |A & B| / |A | B|`` per sample of two code sets; 0 when both sets are empty."""
    inter = ((a == b) & (a >= 0)).sum(-1)
    union = (a >= 0).sum(-1) + (b >= 0).sum(-1) - inter
    return torch.where(union > 0, 1.0 - inter / union.clamp_min(1), torch.zeros_like(inter, dtype=torch.float32))


def toma_destinations(x: torch.Tensor, tiles: TileGrid, ratio: float) -> list[torch.Tensor]:
    """ToMA's tile-local destinations: one ``(B, T_r, k_r)`` tensor per region (facility location per tile)."""
    return [select_destinations(t, keep_count(t.shape[2], ratio)) for t in tiles.fold(x)]


def destination_codes(dest: list[torch.Tensor], tiles: TileGrid) -> torch.Tensor:
    """Codes ``(B, N)`` of a destination set: 0 at the grid index of every chosen destination, -1 elsewhere."""
    b = dest[0].shape[0]
    index = torch.cat(
        [
            torch.gather(s.expand(b, -1, -1), 2, d).flatten(1)
            for s, d in zip(tiles.token_index(dest[0].device), dest, strict=True)
        ],
        1,
    )
    codes = torch.full((b, tiles.num_tokens), -1, dtype=torch.long, device=index.device)
    return codes.scatter_(1, index, 0)


def toma_weights(x: torch.Tensor, tiles: TileGrid, dest: list[torch.Tensor], tau: float) -> list[torch.Tensor]:
    """ToMA's assignments ``A`` ``(B, T_r, k_r, s_r)`` (float32) of ``x`` to the destinations ``dest``."""
    return [merge_weights(t, d, tau) for t, d in zip(tiles.fold(x), dest, strict=True)]


def relative_change(new: list[torch.Tensor], old: list[torch.Tensor]) -> torch.Tensor:
    """``(B,)``: ``||new - old||_F / ||old||_F`` per sample, over all regions' matrices."""
    diff = sum((n.float() - o.float()).pow(2).flatten(1).sum(-1) for n, o in zip(new, old, strict=True))
    norm = sum(o.float().pow(2).flatten(1).sum(-1) for o in old)
    return (diff / norm.clamp_min(1e-30)).sqrt()


def compact(codes: torch.Tensor, upper: int) -> torch.Tensor:
    """Codes with values in ``[-1, upper)`` in the smallest integer type that holds them (to keep them cheaply)."""
    for dtype in (torch.int8, torch.int16, torch.int32):
        if upper <= torch.iinfo(dtype).max:
            return codes.to(dtype)
    return codes
