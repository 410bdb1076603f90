"""Bipartite soft matching in ``sy x sx`` cells (ToMeSD, CA-ToMe) as a slot map: pure tensor math.

A *slot merge* of ``N`` tokens into ``K`` rows is a map ``slot: (B, N) -> [0, K)``. Merge: every row is the mean of
the tokens mapped to it, ``Y_k = sum_{n: slot_n = k} X_n / |{n: slot_n = k}|``; unmerge copies each row back to its
tokens, ``X'_n = Y'_{slot_n}``. Rows no token maps to are padding (zero, masked as keys by ``key_bias``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmerge.plans import MergePlan


def cell_destinations(
    height: int,
    width: int,
    sx: int = 2,
    sy: int = 2,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Grid indices ``(D,)`` of one destination per full ``sy x sx`` cell, cells in row-major order.

    ``D = (height // sy) * (width // sx)``; tokens of incomplete edge cells are never destinations. With a
    ``generator`` the destination of every cell is ``randint(sy * sx)`` (cell-local row-major index, one draw of shape
    ``(height // sy, width // sx, 1)`` from ``generator``'s device), else the top-left token of each cell.
    """
    ch, cw = height // sy, width // sx
    if generator is None:
        local = torch.zeros(ch, cw, dtype=torch.long)
    else:
        local = torch.randint(sy * sx, (ch, cw, 1), generator=generator, device=generator.device)[..., 0].cpu()
    rows = torch.arange(ch).view(-1, 1) * sy + local // sx
    cols = torch.arange(cw).view(1, -1) * sx + local % sx
    return (rows * width + cols).flatten().to(device)


def bipartite_match(metric: torch.Tensor, dst: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best destination of every source by cosine similarity (float32).

    ``metric``: ``(B, N, C)``; ``dst``: ``(D,)`` grid indices. Returns ``src`` ``(S,)`` (the other indices, ascending),
    ``best`` ``(B, S)`` similarity to the best destination and ``match`` ``(B, S)`` its position in ``dst``.
    """
    n = metric.shape[1]
    is_dst = torch.zeros(n, dtype=torch.uint8, device=metric.device)
    is_dst[dst] = 1
    src = is_dst.argsort(stable=True)[: n - dst.numel()]  # the non-destinations, ascending (no data-dependent shape)
    unit = F.normalize(metric.float(), dim=-1, eps=1e-12)
    best, match = (unit[:, src] @ unit[:, dst].transpose(1, 2)).max(-1)
    return src, best, match


def top_sources(best: torch.Tensor, r: int | torch.Tensor) -> torch.Tensor:
    """``(B, S)`` bool: the ``r`` sources of each sample with the highest ``best`` (``r`` an int or ``(B,)``)."""
    order = best.argsort(-1, descending=True)
    positions = torch.arange(best.shape[-1], device=best.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    r = torch.as_tensor(r, device=best.device).view(-1, 1)
    return rank < r


@dataclass
class SlotMerge(MergePlan):
    """A hard merge of ``(B, N, C)`` tokens into ``(B, K, C)`` rows by ``slot`` ``(B, N)``; see the module doc.

    ``counts`` ``(B, K)``: tokens per row (0 for padding). ``dest`` ``(B, K)``: grid index of every row's position
    (its destination, or the token itself; 0 for padding), for rotary embeddings. ``key_bias`` ``(B, 1, K)``
    additive self-attention key bias (0 for real rows, a large negative number for padding), or ``None`` when no
    sample has padding.
    """

    slot: torch.Tensor
    counts: torch.Tensor
    dest: torch.Tensor
    key_bias: torch.Tensor | None = None

    @property
    def num_merged(self) -> int:
        return self.counts.shape[1]

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, C) -> (B, K, C)``: mean of the tokens in each row."""
        b, _, c = x.shape
        index = self.slot.unsqueeze(-1).expand(-1, -1, c)
        total = x.new_zeros(b, self.num_merged, c).scatter_add_(1, index, x)
        return total / self.counts.clamp_min(1).unsqueeze(-1).to(x.dtype)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, K, C) -> (B, N, C)``: every token takes its row's output."""
        return torch.gather(y, 1, self.slot.unsqueeze(-1).expand(-1, -1, y.shape[-1]))


def slot_merge(
    n: int,
    dst: torch.Tensor,
    src: torch.Tensor,
    match: torch.Tensor,
    merged: torch.Tensor,
    dtype: torch.dtype,
    multiple: int = 1,
    key_bias: bool | None = None,
    rows: int | None = None,
) -> SlotMerge:
    """Build the :class:`SlotMerge` where destination ``j`` is row ``j``, every ``merged`` source ``(B, S)`` joins
    its ``match``'s row and every other source gets a row of its own (after the destinations, in ``src`` order).

    Samples merging different numbers of sources get ``K = D + max_b(#unmerged_b)`` rows (rounded up to a
    ``multiple``; a host sync unless the caller knows ``rows``, e.g. every sample merges the same count); shorter
    ones are padded. ``key_bias``: build the key bias always (``True``), never (``False``) or only when there is
    padding (``None``; a host sync).
    """
    b, d = match.shape[0], dst.numel()
    kept = (~merged).long()
    own = d + kept.cumsum(-1) - 1
    slot = torch.empty(b, n, dtype=torch.long, device=match.device)
    slot[:, dst] = torch.arange(d, device=match.device)
    slot[:, src] = torch.where(merged, match, own)
    if rows is None:
        rows = d + int(kept.sum(-1).max()) if kept.numel() else d
        rows = min(n, -(-rows // multiple) * multiple)
    counts = torch.zeros(b, rows, dtype=torch.long, device=match.device).scatter_add_(1, slot, torch.ones_like(slot))
    position = torch.zeros(b, rows, dtype=torch.long, device=match.device)
    position.scatter_(1, slot[:, src], src.expand(b, -1))  # merged sources land on destination rows: overwritten
    position[:, :d] = dst
    bias = None
    if key_bias or (key_bias is None and bool((counts == 0).any())):
        bias = torch.zeros(b, 1, rows, dtype=dtype, device=match.device)
        bias.masked_fill_((counts == 0).unsqueeze(1), torch.finfo(dtype).min)
    return SlotMerge(slot, counts, position, bias)
