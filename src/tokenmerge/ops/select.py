"""Destination selection by greedy facility-location maximisation (the submodular step of ToMA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

TIE_TOL = 1e-4
"""Default tie tolerance of :func:`facility_location`, per token: gains closer than ``TIE_TOL * s`` (``s`` tokens per
tile) tie. Float32 rounding noise in the similarities (batch mates, attention backends, compilers, 1e-6 input noise)
is around 1e-7..1e-6 per token, so it cannot reorder candidates; a real preference of 1e-4 per token is negligible
for the merge."""


def cosine_similarity(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pairwise cosine similarity in float32: ``(..., s, C) -> (..., s, s)``; zero vectors get similarity 0."""
    xn = F.normalize(x.float(), dim=-1, eps=eps)
    return xn @ xn.transpose(-1, -2)


def facility_location(sim: torch.Tensor, k: int, tie_tol: float = TIE_TOL) -> torch.Tensor:
    """Greedy maximiser of ``f(D) = sum_j max_{i in D} S_ij`` over sets of ``k`` distinct rows.

    ``sim``: ``(..., s, s)`` similarities (any leading batch dims, all handled in one loop of ``k`` steps).
    The first pick is the row with the largest sum; each later pick has the largest marginal gain
    ``sum_j relu(S_ij - m_j)`` among rows not yet chosen, where ``m_j`` is the best similarity of ``j`` to the chosen
    set. Stable ties: every unchosen row whose gain is within ``tie_tol * s`` of the best counts as tied and the
    lowest index among them wins, so perturbations of the similarities far below ``tie_tol`` (float rounding of other
    batch compositions, backends or compilers) do not change the picks; ``tie_tol=0`` keeps exact ties only.
    Returns ``(..., k)`` indices in pick order, distinct per set.
    """
    s = sim.shape[-1]
    if not 1 <= k <= s:
        raise ValueError(f"k must be in [1, {s}], got {k}")
    if tie_tol < 0:
        raise ValueError(f"tie_tol must be >= 0, got {tie_tol}")
    sim = sim.float()
    index = torch.arange(s, device=sim.device)
    picks = []
    taken = torch.zeros(sim.shape[:-1], dtype=torch.bool, device=sim.device)
    best = None
    for _ in range(k):
        gain = sim.sum(-1) if best is None else (sim - best.unsqueeze(-2)).clamp_min(0).sum(-1)
        gain = gain.masked_fill(taken, float("-inf"))
        tied = gain >= gain.amax(-1, keepdim=True) - tie_tol * s
        pick = torch.where(tied, index, s).amin(-1)
        one_hot = F.one_hot(pick, s)
        picks.append(pick)
        taken |= one_hot.bool()
        row = (one_hot.to(sim.dtype).unsqueeze(-2) @ sim).squeeze(-2)
        best = row if best is None else torch.maximum(best, row)
    return torch.stack(picks, -1)
