"""Fused Triton kernels for ToMA's hot path (the torch reference is :mod:`tokenmerge.ops.toma`).

Per :class:`~tokenmerge.ops.tiles.Region` of a :class:`~tokenmerge.ops.tiles.TileGrid`, one program per
``(batch, tile)`` reads the tile's ``s`` tokens straight from the ``(B, N, C)`` grid (no fold copy) and

1. *plan* (one launch per region): computes ``S = X_hat X_hat^T - lambda * d^2`` (``s x s``, float32, ``X_hat``
   rows normalised like ``F.normalize``, ``d`` grid distances, ``lambda`` the locality prior), runs the ``k``-step
   greedy facility location with the running max ``m`` in registers (first pick ``argmax_i sum_j S_ij``, then
   ``argmax_i sum_j relu(S_ij - m_j)`` over unpicked rows, gains within ``tie_tol * s`` of the best tied and the
   lowest index winning, ``m = max(m, S_pick)``), or takes given destinations; then ``A = softmax_dest(tau * S[D])``
   (``k x s``, float32) with destination columns one-hot, and writes ``M = A / rowsum(A)``, ``A^T``, the tile-local
   and the grid indices of the destinations;
2. *merge* ``Y = M X`` and 3. *unmerge* ``X' = A^T Y'`` (one launch per region each, a program per tile and channel
   block), gathering / scattering the grid positions of the tile directly.

A divisible grid is one region, so one launch per step; ragged grids have up to four. Runs on CUDA, or on CPU when
``TRITON_INTERPRET=1`` was set before this module was imported (``@triton.jit`` reads it at decoration).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmerge.ops.tiles import Region, TileGrid
from tokenmerge.ops.toma import MergeOptions, TileMerge, keep_count

MAX_TILE_SIZE = 128
"""Largest tile (tokens) the kernels take: the ``s x s`` similarity lives in registers; larger tiles use torch."""

_EPS = 1e-6  # as ops.select.cosine_similarity / ops.toma.merge_weights


@triton.jit
def _plan_kernel(
    x_ptr,
    dest_in_ptr,
    dest_ptr,
    gdest_ptr,
    m_ptr,
    at_ptr,
    num_tiles,
    tiles_w,
    width,
    row0,
    col0,
    n_channels,
    k_total,
    k_offset,
    tau,
    tie_tol,
    locality,
    sxb,
    sxn,
    sxc,
    S: tl.constexpr,
    K: tl.constexpr,
    TH: tl.constexpr,
    TW: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_DEST: tl.constexpr,
    EPS: tl.constexpr,
):
    pid = tl.program_id(0)  # b * num_tiles + t
    b = pid // num_tiles
    t = pid % num_tiles
    tr = t // tiles_w
    tc = t % tiles_w
    offs_s = tl.arange(0, BLOCK_S)
    offs_k = tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, BLOCK_C)
    valid_s = offs_s < S
    valid_k = offs_k < K
    pos = (row0 + tr * TH + offs_s // TW) * width + col0 + tc * TW + offs_s % TW  # grid index of each tile slot
    rows = x_ptr + b.to(tl.int64) * sxb + pos.to(tl.int64) * sxn

    # norms, then S = X_hat X_hat^T with X_hat = X / max(|X|, eps), in float32
    sq = tl.zeros([BLOCK_S], dtype=tl.float32)
    for c0 in range(0, n_channels, BLOCK_C):
        cols = c0 + offs_c
        mask = valid_s[:, None] & (cols < n_channels)[None, :]
        xc = tl.load(rows[:, None] + cols[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
        sq += tl.sum(xc * xc, axis=1)
    denom = tl.maximum(tl.sqrt(sq), EPS)
    sim = tl.zeros([BLOCK_S, BLOCK_S], dtype=tl.float32)
    for c0 in range(0, n_channels, BLOCK_C):
        cols = c0 + offs_c
        mask = valid_s[:, None] & (cols < n_channels)[None, :]
        xc = tl.load(rows[:, None] + cols[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
        xn = xc / denom[:, None]
        sim += tl.dot(xn, tl.trans(xn), input_precision="ieee")
    dr = (offs_s // TW)[:, None] - (offs_s // TW)[None, :]
    dc = (offs_s % TW)[:, None] - (offs_s % TW)[None, :]
    sim -= locality * (dr * dr + dc * dc).to(tl.float32)  # locality prior lambda * d^2 (0: none)

    # greedy facility location (or given destinations); logits rows L[r] = S[dest_r]
    neg_inf = float("-inf")
    best = tl.full([BLOCK_S], neg_inf, dtype=tl.float32)  # m_j
    taken = offs_s >= S  # padding slots are never picked
    picks = tl.zeros([BLOCK_K], dtype=tl.int32)
    logits = tl.zeros([BLOCK_K, BLOCK_S], dtype=tl.float32)
    for step in range(K):
        if HAS_DEST:
            pick = tl.load(dest_in_ptr + pid.to(tl.int64) * K + step).to(tl.int32)
        else:
            gain_terms = tl.where(step == 0, sim, tl.maximum(sim - best[None, :], 0.0))
            gain = tl.sum(tl.where(valid_s[None, :], gain_terms, 0.0), axis=1)
            gain = tl.where(taken, neg_inf, gain)
            top = tl.max(gain, axis=0)
            tied = gain >= top - tie_tol * S  # stable ties, as ops.select.facility_location
            pick = tl.min(tl.where(tied, offs_s, BLOCK_S), axis=0)  # lowest index among ties
        taken = taken | (offs_s == pick)
        row = tl.max(tl.where(offs_s[:, None] == pick, sim, neg_inf), axis=0)  # S[pick, :]
        best = tl.maximum(best, row)
        picks = tl.where(offs_k == step, pick, picks)
        logits = tl.where(offs_k[:, None] == step, row[None, :], logits)

    # A = softmax over destinations of tau * S[D], destination columns one-hot; M = A / rowsum(A)
    z = tl.where(valid_k[:, None], tau * logits, neg_inf)
    e = tl.exp(z - tl.max(z, axis=0)[None, :])
    assign = e / tl.sum(e, axis=0)[None, :]
    own = (picks[:, None] == offs_s[None, :]) & valid_k[:, None]
    is_dest = tl.max(own.to(tl.int32), axis=0) > 0
    assign = tl.where(is_dest[None, :], own.to(tl.float32), assign)
    assign = tl.where(valid_s[None, :], assign, 0.0)
    rowsum = tl.where(valid_k, tl.sum(assign, axis=1), 1.0)
    merge = assign / rowsum[:, None]

    both = valid_k[:, None] & valid_s[None, :]
    base = pid.to(tl.int64) * (K * S)
    tl.store(m_ptr + base + offs_k[:, None] * S + offs_s[None, :], merge.to(m_ptr.dtype.element_ty), mask=both)
    tl.store(at_ptr + base + offs_s[None, :] * K + offs_k[:, None], assign.to(at_ptr.dtype.element_ty), mask=both)
    if not HAS_DEST:
        tl.store(dest_ptr + pid.to(tl.int64) * K + offs_k, picks.to(tl.int64), mask=valid_k)
    gpos = (row0 + tr * TH + picks // TW) * width + col0 + tc * TW + picks % TW
    tl.store(gdest_ptr + b.to(tl.int64) * k_total + k_offset + t * K + offs_k, gpos.to(tl.int64), mask=valid_k)


@triton.jit
def _apply_kernel(
    mat_ptr,
    src_ptr,
    dst_ptr,
    num_tiles,
    tiles_w,
    width,
    row0,
    col0,
    n_channels,
    k_offset,
    ssb,
    ssn,
    ssc,
    sdb,
    sdn,
    sdc,
    S: tl.constexpr,
    K: tl.constexpr,
    TH: tl.constexpr,
    TW: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
    UNMERGE: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    """Merge (``Y[tile] = M X[tile]``, ``M`` is ``k x s``) or unmerge (``X'[tile] = A^T Y[tile]``, ``s x k``)."""
    pid = tl.program_id(0)  # b * num_tiles + t
    cid = tl.program_id(1)  # channel block
    b = pid // num_tiles
    t = pid % num_tiles
    tr = t // tiles_w
    tc = t % tiles_w
    offs_s = tl.arange(0, BLOCK_S)
    offs_k = tl.arange(0, BLOCK_K)
    cols = cid * BLOCK_C + tl.arange(0, BLOCK_C)
    valid_s = offs_s < S
    valid_k = offs_k < K
    valid_c = cols < n_channels
    pos = (row0 + tr * TH + offs_s // TW) * width + col0 + tc * TW + offs_s % TW  # grid slots of this tile
    merged = k_offset + t * K + offs_k  # merged-token slots of this tile
    base = pid.to(tl.int64) * (K * S)
    if UNMERGE:
        mask = valid_s[:, None] & valid_k[None, :]
        mat = tl.load(mat_ptr + base + offs_s[:, None] * K + offs_k[None, :], mask=mask, other=0.0)
        src_rows, src_valid = merged, valid_k
        dst_rows, dst_valid = pos, valid_s
    else:
        mask = valid_k[:, None] & valid_s[None, :]
        mat = tl.load(mat_ptr + base + offs_k[:, None] * S + offs_s[None, :], mask=mask, other=0.0)
        src_rows, src_valid = pos, valid_s
        dst_rows, dst_valid = merged, valid_k
    src = tl.load(
        src_ptr + b.to(tl.int64) * ssb + src_rows.to(tl.int64)[:, None] * ssn + cols[None, :] * ssc,
        mask=src_valid[:, None] & valid_c[None, :],
        other=0.0,
    )
    if F32_DOT:
        out = tl.dot(mat.to(tl.float32), src.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(mat.to(src.dtype), src)
    tl.store(
        dst_ptr + b.to(tl.int64) * sdb + dst_rows.to(tl.int64)[:, None] * sdn + cols[None, :] * sdc,
        out.to(dst_ptr.dtype.element_ty),
        mask=dst_valid[:, None] & valid_c[None, :],
    )


INTERPRETED = type(_plan_kernel).__name__ == "InterpretedFunction"
"""Whether the kernels were built for the CPU interpreter (``TRITON_INTERPRET=1`` at import)."""


def _block(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def _launch_args(r: Region, grid: TileGrid) -> tuple[int, int, int, int]:
    return r.cols // r.tile_w, grid.width, r.row, r.col


def kernels_apply(x: torch.Tensor, grid: TileGrid | None = None) -> bool:
    """Whether the kernels can run on ``x``: CUDA (or interpreter mode), no autograd, tiles of <= MAX_TILE_SIZE."""
    if not (x.is_cuda or (INTERPRETED and x.device.type == "cpu")):
        return False
    if x.dim() != 3 or (torch.is_grad_enabled() and x.requires_grad):
        return False
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    return grid is None or all(r.tile_size <= MAX_TILE_SIZE for r in grid.regions)


class TritonTileMerge(TileMerge):
    """A :class:`TileMerge` whose ``merge``/``unmerge`` run one fused kernel per region (torch path elsewhere)."""

    def _apply(self, src: torch.Tensor, unmerge: bool) -> torch.Tensor:
        b, _, c = src.shape
        n_out = self.grid.num_tokens if unmerge else self.num_merged
        dst = torch.empty(b, n_out, c, dtype=src.dtype, device=src.device)
        block_c = min(64, _block(c))
        mats = self.unmerge_mats if unmerge else self.merge_mats
        k_offset = 0
        for r, mat in zip(self.grid.regions, mats, strict=True):
            k = mat.shape[-1] if unmerge else mat.shape[-2]
            _apply_kernel[(b * r.num_tiles, triton.cdiv(c, block_c))](
                mat.contiguous(),
                src,
                dst,
                r.num_tiles,
                *_launch_args(r, self.grid),
                c,
                k_offset,
                *src.stride(),
                *dst.stride(),
                S=r.tile_size,
                K=k,
                TH=r.tile_h,
                TW=r.tile_w,
                BLOCK_S=_block(r.tile_size),
                BLOCK_K=_block(k),
                BLOCK_C=block_c,
                UNMERGE=unmerge,
                F32_DOT=INTERPRETED or src.dtype == torch.float32,
            )
            k_offset += r.num_tiles * k
        return dst

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, C) -> (B, K, C)``: ``Y = M X`` per tile, read from the grid in place."""
        if not kernels_apply(x) or any(m.requires_grad for m in self.merge_mats):
            return super().merge(x)
        return self._apply(x, unmerge=False)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, K, C) -> (B, N, C)``: ``X' = A^T Y`` per tile, written to the grid in place."""
        if not kernels_apply(y) or any(u.requires_grad for u in self.unmerge_mats):
            return super().unmerge(y)
        return self._apply(y, unmerge=True)


def toma_merge_triton(
    x: torch.Tensor, grid: TileGrid, options: MergeOptions, dest: list[torch.Tensor] | None = None
) -> tuple[TritonTileMerge, list[torch.Tensor]]:
    """Fused-kernel :func:`~tokenmerge.ops.toma.toma_merge_torch`: same arguments, same results (up to float
    rounding of the weights; the same destinations, by the same stable tie rule). Only where :func:`kernels_apply`
    (the dispatcher, :mod:`tokenmerge.ops.toma_dispatch`, checks)."""
    b, n, c = x.shape
    if n != grid.num_tokens:
        raise ValueError(f"expected {grid.num_tokens} tokens for a {grid.height}x{grid.width} grid, got {n}")
    ks = (
        [d.shape[-1] for d in dest]
        if dest is not None
        else [keep_count(r.tile_size, options.ratio) for r in grid.regions]
    )
    k_total = sum(r.num_tiles * k for r, k in zip(grid.regions, ks, strict=True))
    gdest = torch.empty(b, k_total, dtype=torch.long, device=x.device)
    block_c = min(64, _block(c))
    merge_mats, unmerge_mats, local = [], [], []
    k_offset = 0
    for i, (r, k) in enumerate(zip(grid.regions, ks, strict=True)):
        s = r.tile_size
        m = torch.empty(b, r.num_tiles, k, s, dtype=x.dtype, device=x.device)
        at = torch.empty(b, r.num_tiles, s, k, dtype=x.dtype, device=x.device)
        d_out = torch.empty(b, r.num_tiles, k, dtype=torch.long, device=x.device) if dest is None else dest[i]
        d_in = d_out.contiguous() if dest is not None else d_out
        _plan_kernel[(b * r.num_tiles,)](
            x,
            d_in,
            d_out,
            gdest,
            m,
            at,
            r.num_tiles,
            *_launch_args(r, grid),
            c,
            k_total,
            k_offset,
            float(options.tau),
            float(options.tie_tol),
            float(options.locality),
            *x.stride(),
            S=s,
            K=k,
            TH=r.tile_h,
            TW=r.tile_w,
            BLOCK_S=_block(s),
            BLOCK_K=_block(k),
            BLOCK_C=block_c,
            HAS_DEST=dest is not None,
            EPS=_EPS,
        )
        merge_mats.append(m)
        unmerge_mats.append(at)
        local.append(d_out)
        k_offset += r.num_tiles * k
    return TritonTileMerge(grid, merge_mats, unmerge_mats, gdest, kernel="triton"), local
