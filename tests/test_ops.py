"""Unit tests of the pure tensor math in ``tokenmerge.ops`` (tiling, facility location, ToMA merge/unmerge)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from tokenmerge.ops.select import TIE_TOL, cosine_similarity, facility_location
from tokenmerge.ops.tiles import TileGrid
from tokenmerge.ops.toma import (
    MergedKV,
    MergeOptions,
    TileMerge,
    keep_count,
    merge_weights,
    select_destinations,
    toma_merge_torch,
)
from tokenmerge.plans import KVPlan

# (H, W, tile_h, tile_w): divisible, ragged on one or both sides, degenerate and oversized tiles.
GRID_CASES = [
    (1, 1, 1, 1),
    (1, 1, 4, 4),
    (4, 4, 2, 2),
    (8, 6, 4, 3),
    (64, 48, 4, 4),
    (5, 3, 4, 4),
    (7, 9, 2, 3),
    (7, 10, 2, 3),
    (10, 7, 4, 3),
    (9, 11, 4, 4),
    (5, 5, 2, 2),
    (3, 2, 8, 8),
    (6, 1, 4, 4),
    (1, 7, 2, 3),
    (4, 6, 1, 1),
    (3, 5, 1, 5),
    (5, 4, 5, 1),
]
RAGGED_CASES = [c for c in GRID_CASES if c[0] % min(c[2], c[0]) or c[1] % min(c[3], c[1])]


def merge(
    x: torch.Tensor, grid: TileGrid, ratio: float, tau: float = 100.0, dest: list | None = None, **options: float
) -> tuple[TileMerge, list[torch.Tensor]]:
    """The torch ToMA merge with ``ratio`` and ``tau`` (default: ToMA's)."""
    return toma_merge_torch(x, grid, MergeOptions(ratio, tau, **options), dest)


def _cases(cases: list[tuple[int, int, int, int]]) -> list:
    return [pytest.param(c, id=_grid_id(c)) for c in cases]


# the 64x48 grid is too slow for the N x N one-hot signal tests and adds nothing to the merge checks
MERGE_CASES = [c for c in GRID_CASES if c != (64, 48, 4, 4)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


def _grid_id(case: tuple[int, int, int, int]) -> str:
    return "{}x{}-tile{}x{}".format(*case)


# ---------------------------------------------------------------------------------------------------------------------
# TileGrid
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", GRID_CASES, ids=_grid_id)
def test_fold_unfold_roundtrip_exact(case):
    h, w, th, tw = case
    grid = TileGrid(h, w, th, tw)
    x = _randn(2, h * w, 5, seed=h * 100 + w)
    tiles = grid.fold(x)
    assert len(tiles) == len(grid.regions)
    for r, t in zip(grid.regions, tiles, strict=True):
        assert t.shape == (2, r.num_tiles, r.tile_size, 5)
    assert sum(t.shape[1] * t.shape[2] for t in tiles) == h * w
    assert torch.equal(grid.unfold(tiles), x)


@pytest.mark.parametrize("case", _cases(GRID_CASES))
def test_unfold_accepts_contiguous_tiles(case):
    # unmerge hands unfold fresh contiguous matmul results, not the strided views that fold returns
    h, w, th, tw = case
    grid = TileGrid(h, w, th, tw)
    x = _randn(2, h * w, 5, seed=h * 100 + w)
    assert torch.equal(grid.unfold([t.contiguous() for t in grid.fold(x)]), x)


@pytest.mark.parametrize("case", GRID_CASES, ids=_grid_id)
def test_regions_and_tiles_are_contiguous_rectangles(case):
    h, w, th, tw = case
    grid = TileGrid(h, w, th, tw)
    idx = grid.token_index()
    assert len(idx) == len(grid.regions)
    for r, slots in zip(grid.regions, idx, strict=True):
        assert r.tile_h >= 1 and r.tile_w >= 1
        assert r.tile_h <= th and r.tile_w <= tw
        assert r.rows % r.tile_h == 0 and r.cols % r.tile_w == 0
        assert slots.shape == (r.num_tiles, r.tile_size)
        assert slots.dtype == torch.long
        rows, cols = slots // w, slots % w
        # the region's tokens are exactly the rectangle [row, row + rows) x [col, col + cols)
        expected = {(i, j) for i in range(r.row, r.row + r.rows) for j in range(r.col, r.col + r.cols)}
        got = set(zip(rows.flatten().tolist(), cols.flatten().tolist(), strict=True))
        assert got == expected
        assert slots.numel() == len(expected)
        # each tile is a tile_h x tile_w rectangle listed in row-major order
        local_r = torch.arange(r.tile_h).repeat_interleave(r.tile_w)
        local_c = torch.arange(r.tile_w).repeat(r.tile_h)
        for t in range(r.num_tiles):
            r0, c0 = rows[t, 0].item(), cols[t, 0].item()
            assert torch.equal(rows[t], r0 + local_r)
            assert torch.equal(cols[t], c0 + local_c)
            assert (r0 - r.row) % r.tile_h == 0 and (c0 - r.col) % r.tile_w == 0


@pytest.mark.parametrize("case", GRID_CASES, ids=_grid_id)
def test_token_index_covers_every_token_once(case):
    h, w, th, tw = case
    grid = TileGrid(h, w, th, tw)
    flat = torch.cat([s.flatten() for s in grid.token_index()])
    assert flat.numel() == h * w
    assert torch.equal(flat.sort().values, torch.arange(h * w))
    # token_index is fold of arange: indexing x with it reproduces fold(x)
    x = _randn(1, h * w, 3, seed=7)
    for s, t in zip(grid.token_index(), grid.fold(x), strict=True):
        assert torch.equal(x[0, s], t[0])


@pytest.mark.parametrize("case", [c for c in GRID_CASES if c not in RAGGED_CASES], ids=_grid_id)
def test_fold_matches_naive_loop_on_divisible_grid(case):
    h, w, th, tw = case
    th, tw = min(th, h), min(tw, w)
    grid = TileGrid(h, w, th, tw)
    assert len(grid.regions) == 1
    x = _randn(2, h * w, 4, seed=11)
    naive = []
    for ty in range(h // th):
        for tx in range(w // tw):
            tokens = [x[:, (ty * th + i) * w + tx * tw + j] for i in range(th) for j in range(tw)]
            naive.append(torch.stack(tokens, 1))
    naive = torch.stack(naive, 1)
    (folded,) = grid.fold(x)
    assert torch.equal(folded, naive)


def test_ragged_grid_has_expected_regions():
    grid = TileGrid(7, 10, 2, 3)
    shapes = [(r.row, r.col, r.rows, r.cols, r.tile_h, r.tile_w) for r in grid.regions]
    assert shapes == [(0, 0, 6, 9, 2, 3), (0, 9, 6, 1, 2, 1), (6, 0, 1, 9, 1, 3), (6, 9, 1, 1, 1, 1)]
    assert [r.num_tiles for r in grid.regions] == [9, 3, 3, 1]


def test_tilegrid_rejects_bad_input():
    with pytest.raises(ValueError):
        TileGrid(0, 4, 2, 2)
    with pytest.raises(ValueError):
        TileGrid(4, 4, 0, 2)
    with pytest.raises(ValueError):
        TileGrid(4, 4, 2, 2).fold(torch.zeros(1, 15, 3))


# ---------------------------------------------------------------------------------------------------------------------
# facility_location
# ---------------------------------------------------------------------------------------------------------------------


def naive_facility_location(sim: list[list[float]], k: int, tie_tol: float = TIE_TOL) -> list[int]:
    """Float64 reference of the greedy with stable ties: the lowest index among gains within ``tie_tol * s``."""
    s = len(sim)
    chosen: list[int] = []
    best: list[float] | None = None
    for _ in range(k):
        gains = {}
        for i in range(s):
            if i in chosen:
                continue
            if best is None:
                gains[i] = sum(sim[i])
            else:
                gains[i] = sum(max(sim[i][j] - best[j], 0.0) for j in range(s))
        top = max(gains.values())
        pick = min(i for i, g in gains.items() if g >= top - tie_tol * s)
        chosen.append(pick)
        best = list(sim[pick]) if best is None else [max(a, b) for a, b in zip(best, sim[pick], strict=True)]
    return chosen


@pytest.mark.parametrize("s", [1, 2, 4, 7, 16])
def test_facility_location_matches_naive_reference(s):
    lead = (2, 3)
    x = _randn(*lead, s, 6, seed=s)
    sim = cosine_similarity(x)
    assert sim.shape == (*lead, s, s)
    assert torch.allclose(sim, sim.transpose(-1, -2))
    # make it exactly symmetric with a unit diagonal: float32 rounding of the matmul otherwise decides exact ties
    # (e.g. the two row sums of a 2x2 matrix) differently in float32 and in the float64 reference
    sim = (sim + sim.transpose(-1, -2)) / 2
    sim.diagonal(dim1=-2, dim2=-1).fill_(1.0)
    for k in sorted({1, max(1, s // 4), max(1, s // 2), max(1, s - 1), s}):
        got = facility_location(sim, k)
        assert got.shape == (*lead, k)
        assert got.dtype == torch.long
        for b in itertools.product(*(range(n) for n in lead)):
            assert got[b].tolist() == naive_facility_location(sim[b].tolist(), k), (s, k, b)
            assert len(set(got[b].tolist())) == k


def test_facility_location_unbatched_and_prefix_property():
    x = _randn(12, 8, seed=3)
    sim = cosine_similarity(x)
    full = facility_location(sim, 12)
    assert sorted(full.tolist()) == list(range(12))
    assert full.tolist() == naive_facility_location(sim.tolist(), 12)
    # greedy: a shorter run is a prefix of a longer one
    for k in range(1, 12):
        assert torch.equal(facility_location(sim, k), full[:k])


def test_facility_location_ties_go_to_lowest_index():
    sim = torch.full((2, 6, 6), 0.5)
    assert facility_location(sim, 4).tolist() == [[0, 1, 2, 3]] * 2
    # explicit non-trivial example: token 2 is most central, then the 0/1 cluster, etc.
    sim = torch.tensor(
        [
            [1.0, 0.9, 0.5, 0.0],
            [0.9, 1.0, 0.5, 0.0],
            [0.5, 0.5, 1.0, 0.6],
            [0.0, 0.0, 0.6, 1.0],
        ]
    )
    # row sums: 2.4, 2.4, 2.6, 1.6 -> 2; gains then: row0 .5+.4=.9(+0 for j=2,3) , row1 .4+.5=.9, row3 .4 -> 0
    got = facility_location(sim, 3).tolist()
    assert got == naive_facility_location(sim.tolist(), 3)
    assert got[:2] == [2, 0]


def test_near_ties_within_tolerance_go_to_lowest_index():
    # four tokens; the row sums of 1..3 exceed row 0's by less than the tolerance (2e-5 * 4 < 1e-4 * 4): all tied
    eps = 2e-5
    sim = torch.tensor(
        [
            [1.0, 0.2, 0.2, 0.2],
            [0.2, 1.0, 0.2, 0.2 + 2 * eps],
            [0.2, 0.2, 1.0, 0.2 + 3 * eps],
            [0.2, 0.2 + 2 * eps, 0.2 + 3 * eps, 1.0],
        ]
    )
    assert facility_location(sim, 1).tolist() == [0]
    assert facility_location(sim, 1, tie_tol=0.0).tolist() == [3]  # exact comparison: the largest sum
    # a gap larger than the tolerance is a real preference: rows 2 and 3 gain 0.01 over rows 0 and 1 (tied among
    # themselves: the lower index wins)
    sim[3, 2] = sim[2, 3] = 0.21
    assert facility_location(sim, 1).tolist() == [2]
    with pytest.raises(ValueError, match="tie_tol"):
        facility_location(sim, 1, tie_tol=-1.0)


def _tie_heavy_tiles(seed: int) -> torch.Tensor:
    """``(3, 8, 16, 12)`` tiles full of exact ties: constant tiles, mutual pairs, duplicated and zero tokens."""
    gen = _gen(seed)
    x = torch.randn(3, 8, 16, 12, generator=gen)
    x[:, 0] = x[:, 0, :1]  # constant tile
    x[:, 1] = x[:, 1, :8].repeat(1, 2, 1)  # every token twice: mutual pairs
    x[:, 2] = x[:, 2, :2].repeat(1, 8, 1)  # two directions
    x[:, 3, ::2] = 0.0  # half zero
    x[:, 4] = x[:, 4, :4].repeat_interleave(4, 1) * torch.rand(1, 16, 1, generator=gen)  # scaled duplicates
    return x


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_picks_stable_under_rounding_noise_and_batch_composition(ratio):
    """1e-6 relative noise on tie-heavy tokens (far below the tolerance; relative, like rounding: a zero token has no
    direction to perturb) changes no pick, and a sample's picks do not depend on its batch mates (ties broken by
    float rounding used to flip a third of the reference UNet's tiles)."""
    x = _tie_heavy_tiles(int(ratio * 100))
    k = keep_count(16, ratio)
    ref = select_destinations(x, k)
    for seed in range(3):
        noisy = x * (1 + 1e-6 * torch.randn(x.shape, generator=_gen(seed)))
        assert torch.equal(select_destinations(noisy, k), ref)
    for b in range(3):
        assert torch.equal(select_destinations(x[b : b + 1], k), ref[b : b + 1])
        assert torch.equal(select_destinations(torch.cat([x[b : b + 1], x.flip(0)]), k)[:1], ref[b : b + 1])
    # the exact-tie rule meets the same inputs: constant tiles take their first k tokens
    assert torch.equal(ref[:, 0], torch.arange(k).expand(3, k))


@pytest.mark.parametrize("k", [0, -1, 6])
def test_facility_location_rejects_k_out_of_range(k):
    sim = cosine_similarity(_randn(5, 4))
    with pytest.raises(ValueError):
        facility_location(sim, k)


# ---------------------------------------------------------------------------------------------------------------------
# keep_count
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "ratio", "expected"),
    [
        (16, 0.0, 16),
        (16, 0.5, 8),
        (16, 0.75, 4),
        (16, 0.9, 2),
        (16, 1.0, 1),
        (16, 0.99, 1),
        (1, 0.0, 1),
        (1, 0.9, 1),
        (10, 0.7, 3),
        (12, 1 / 3, 8),
        (4, -1.0, 4),
        (4, 2.0, 1),
        (9, 0.5, 4),  # round(4.5) == 4 (Python rounds half to even)
    ],
)
def test_keep_count_examples(size, ratio, expected):
    assert keep_count(size, ratio) == expected


def test_keep_count_matches_formula():
    for size in range(1, 40):
        for ratio in [i / 20 for i in range(-4, 25)]:
            want = min(size, max(1, round((1.0 - ratio) * size)))
            got = keep_count(size, ratio)
            assert got == want, (size, ratio)
            assert 1 <= got <= size


# ---------------------------------------------------------------------------------------------------------------------
# merge_weights / TileMerge
# ---------------------------------------------------------------------------------------------------------------------


def _assert_assignment_invariants(assign: torch.Tensor, dest: torch.Tensor) -> None:
    b, t, k, s = assign.shape
    assert dest.shape == (b, t, k)
    assert assign.dtype == torch.float32
    assert torch.isfinite(assign).all()
    assert (assign >= 0).all()
    torch.testing.assert_close(assign.sum(-2), torch.ones(b, t, s), rtol=0, atol=1e-5)
    assert (assign.sum(-1) >= 1).all()
    # destination columns are one-hot, pointing at their own row
    cols = torch.gather(assign, 3, dest.unsqueeze(-2).expand(b, t, k, k))  # cols[..., :, j] = A[..., :, dest_j]
    assert torch.equal(cols, torch.eye(k).expand(b, t, k, k))


@pytest.mark.parametrize(("s", "k"), [(1, 1), (4, 1), (4, 2), (9, 3), (16, 4), (16, 16)])
@pytest.mark.parametrize("tau", [1.0, 10.0, 1000.0])
def test_merge_weights_columns_sum_to_one_and_dest_one_hot(s, k, tau):
    tiles = _randn(2, 3, s, 8, seed=s * 31 + k)
    dest = select_destinations(tiles, k)
    assert dest.shape == (2, 3, k)
    assign = merge_weights(tiles, dest, tau)
    assert assign.shape == (2, 3, k, s)
    _assert_assignment_invariants(assign, dest)


def test_merge_weights_soft_assignment_is_softmax_of_cosine():
    tiles = _randn(1, 2, 6, 5, seed=5)
    dest = torch.tensor([[[0, 3], [5, 1]]])
    tau = 2.0
    assign = merge_weights(tiles, dest, tau)
    for t in range(2):
        xn = F.normalize(tiles[0, t], dim=-1)
        logits = tau * xn[dest[0, t]] @ xn.T
        want = torch.softmax(logits, dim=0)
        want[:, dest[0, t]] = torch.eye(2)
        torch.testing.assert_close(assign[0, t], want)


@pytest.mark.parametrize("case", [(8, 8, 4, 4), (7, 10, 2, 3), (5, 3, 4, 4)], ids=_grid_id)
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_hard_assignment_merge_then_unmerge_matrix_is_identity(case, ratio):
    h, w, th, tw = case
    grid = TileGrid(h, w, th, tw)
    x = _randn(2, h * w, 16, seed=h * w)
    plan, dest = merge(x, grid, ratio, tau=1e9)
    for m, u, d in zip(plan.merge_mats, plan.unmerge_mats, dest, strict=True):
        b, t, k, s = m.shape
        assert u.shape == (b, t, s, k)
        assert d.shape == (b, t, k)
        assert k == keep_count(s, ratio)
        a = u.transpose(-1, -2)
        # premise: the assignment is one-hot for such a large tau
        assert ((a == 0) | (a == 1)).all()
        assert torch.equal(a.sum(-2), torch.ones(b, t, s))
        torch.testing.assert_close(m @ u, torch.eye(k).expand(b, t, k, k), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", _cases(MERGE_CASES))
@pytest.mark.parametrize("ratio", [0.3, 0.9])
def test_unmerge_matrices_are_convex_and_merge_rows_are_means(case, ratio):
    h, w, th, tw = case
    grid = TileGrid(h, w, th, tw)
    x = _randn(2, h * w, 8, seed=h * 13 + w)
    plan, dest = merge(x, grid, ratio)
    assert plan.num_merged == sum(d.shape[1] * d.shape[2] for d in dest)
    assert plan.num_merged == sum(r.num_tiles * keep_count(r.tile_size, ratio) for r in grid.regions)
    for m, u in zip(plan.merge_mats, plan.unmerge_mats, strict=True):
        assert (u >= 0).all() and (m >= 0).all()
        torch.testing.assert_close(u.sum(-1), torch.ones(u.shape[:-1]), rtol=0, atol=1e-5)
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]), rtol=0, atol=1e-5)
    y = plan.merge(x)
    assert y.shape == (2, plan.num_merged, 8)
    assert plan.unmerge(y).shape == x.shape


@pytest.mark.parametrize("case", _cases(GRID_CASES))
def test_unmerge_of_merge_is_identity_for_tile_constant_input(case):
    h, w, th, tw = case
    grid = TileGrid(h, w, th, tw)
    c = 6
    # one random vector per tile, broadcast to all tokens of the tile (written through token_index, not unfold)
    x = torch.empty(2, h * w, c)
    for i, (r, slots) in enumerate(zip(grid.regions, grid.token_index(), strict=True)):
        x[:, slots] = _randn(2, r.num_tiles, 1, c, seed=i).expand(2, r.num_tiles, r.tile_size, c)
    for t in grid.fold(x):
        assert torch.equal(t, t[:, :, :1].expand_as(t))
    for ratio in (0.5, 0.75):
        plan, _ = merge(x, grid, ratio, tau=10.0)
        torch.testing.assert_close(plan.unmerge(plan.merge(x)), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", _cases(GRID_CASES))
def test_keep_all_tokens_roundtrips_exactly(case):
    h, w, th, tw = case
    grid = TileGrid(h, w, th, tw)
    x = _randn(2, h * w, 7, seed=h + 17 * w)
    plan, dest = merge(x, grid, 0.0)
    assert plan.num_merged == h * w
    for r, d in zip(grid.regions, dest, strict=True):
        assert d.shape[-1] == r.tile_size == keep_count(r.tile_size, 0.0)
        assert torch.equal(d.sort(-1).values, torch.arange(r.tile_size).expand_as(d))
    y = plan.merge(x)
    assert torch.equal(plan.unmerge(y), x)
    # every token is its own destination, so merging the position signal yields plan.dest itself
    pos = torch.arange(h * w, dtype=torch.float32).view(1, -1, 1).expand(2, -1, 1)
    assert torch.equal(plan.merge(pos)[..., 0].long(), plan.dest)
    assert torch.equal(plan.dest.sort(-1).values, torch.arange(h * w).expand(2, -1))


@pytest.mark.parametrize("case", _cases(MERGE_CASES))
@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_dest_holds_grid_indices_of_destinations(case, ratio):
    h, w, th, tw = case
    grid = TileGrid(h, w, th, tw)
    n = h * w
    x = _randn(2, n, 8, seed=n + 3)
    plan, dest = merge(x, grid, ratio)
    k_total = plan.num_merged
    assert plan.dest.shape == (2, k_total)
    assert plan.dest.dtype == torch.long
    for b in range(2):
        assert len(set(plan.dest[b].tolist())) == k_total
    assert ((plan.dest >= 0) & (plan.dest < n)).all()
    # dest (global) agrees with the tile-local indices mapped through the fold
    local = torch.cat(
        [
            torch.gather(t, 2, d.unsqueeze(-1).expand(*d.shape, 8)).flatten(1, 2)
            for t, d in zip(grid.fold(x), dest, strict=True)
        ],
        1,
    )
    assert torch.equal(local, torch.gather(x, 1, plan.dest.unsqueeze(-1).expand(-1, -1, 8)))
    # merging one-hot position signals: merged token j sees its own destination and none of the other destinations
    eye_n = torch.eye(n).expand(2, n, n)
    merged = plan.merge(eye_n)  # (B, K, N): merged[b, j] = row j of the merge matrix in grid coordinates
    at_dest = torch.gather(merged, 2, plan.dest.unsqueeze(1).expand(-1, k_total, -1))  # [b, j, l] = M_j(dest_l)
    diag = torch.diagonal(at_dest, dim1=1, dim2=2)
    assert (diag > 0).all()
    assert torch.equal(at_dest - torch.diag_embed(diag), torch.zeros_like(at_dest))
    # unmerging one-hot merged signals: the destination token of j gets exactly e_j back
    eye_k = torch.eye(k_total).expand(2, k_total, k_total)
    back = plan.unmerge(eye_k)  # (B, N, K)
    assert torch.equal(torch.gather(back, 1, plan.dest.unsqueeze(-1).expand(-1, -1, k_total)), eye_k)


def test_dest_reuse_gives_same_plan():
    grid = TileGrid(7, 10, 2, 3)
    x = _randn(2, 70, 8, seed=1)
    plan, dest = merge(x, grid, 0.5)
    plan2, dest2 = merge(x, grid, 0.5, dest=dest)
    assert all(a is b for a, b in zip(dest, dest2, strict=True))
    assert torch.equal(plan.dest, plan2.dest)
    for a, b in zip(plan.merge_mats + plan.unmerge_mats, plan2.merge_mats + plan2.unmerge_mats, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------------
# dtypes and degenerate inputs
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [(8, 8, 4, 4), (7, 10, 2, 3)], ids=_grid_id)
def test_dtype_preserved_and_finite(dtype, case):
    h, w, th, tw = case
    grid = TileGrid(h, w, th, tw)
    x = _randn(2, h * w, 16, seed=2, dtype=dtype)
    plan, _ = merge(x, grid, 0.5)
    for m in plan.merge_mats + plan.unmerge_mats:
        assert m.dtype == dtype
    y = plan.merge(x)
    assert y.dtype == dtype
    assert torch.isfinite(y).all()
    out = plan.unmerge(y)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.isfinite(out).all()
    # low-precision plans agree with the fp32 plan built on the same (rounded) tokens
    ref_plan, _ = merge(x.float(), grid, 0.5)
    assert torch.equal(plan.dest, ref_plan.dest)
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(y.float(), ref_plan.merge(x.float()), rtol=tol, atol=tol)


def _degenerate_inputs(n: int, c: int) -> dict[str, torch.Tensor]:
    base = _randn(1, 1, c, seed=9)
    dup = _randn(1, 4, c, seed=10).repeat(1, (n + 3) // 4, 1)[:, :n]
    return {
        "constant": base.expand(2, n, c).contiguous(),
        "zeros": torch.zeros(2, n, c),
        "duplicated": dup.expand(2, n, c).contiguous(),
        "partly_zero": torch.cat([torch.zeros(2, n // 2, c), _randn(2, n - n // 2, c, seed=12)], 1),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["constant", "zeros", "duplicated", "partly_zero"])
@pytest.mark.parametrize("case", [(8, 8, 4, 4), (7, 10, 2, 3)], ids=_grid_id)
def test_degenerate_tokens_give_no_nan_and_unique_destinations(dtype, kind, case):
    h, w, th, tw = case
    grid = TileGrid(h, w, th, tw)
    x = _degenerate_inputs(h * w, 8)[kind].to(dtype)
    for ratio in (0.0, 0.5, 0.9):
        plan, dest = merge(x, grid, ratio)
        for d in dest:
            srt = d.sort(-1).values
            assert (srt[..., 1:] != srt[..., :-1]).all()
        for b in range(2):
            assert len(set(plan.dest[b].tolist())) == plan.num_merged
        for t, d in zip(grid.fold(x), dest, strict=True):
            _assert_assignment_invariants(merge_weights(t, d, 1000.0), d)
        for m in plan.merge_mats + plan.unmerge_mats:
            assert torch.isfinite(m).all()
        y = plan.merge(x)
        out = plan.unmerge(y)
        assert y.dtype == dtype and out.dtype == dtype
        assert torch.isfinite(y).all() and torch.isfinite(out).all()
        if kind in ("constant", "zeros"):
            # every token equal: the merge and the unmerge reproduce it
            torch.testing.assert_close(out.float(), x.float(), rtol=1e-2, atol=1e-2)


def test_cosine_similarity_of_zero_vectors_is_zero():
    x = torch.zeros(3, 4)
    x[1] = torch.tensor([1.0, 2.0, 0.0, 0.0])
    sim = cosine_similarity(x.half())
    assert sim.dtype == torch.float32
    assert torch.isfinite(sim).all()
    assert sim[0].abs().sum() == 0 and sim[2].abs().sum() == 0
    torch.testing.assert_close(sim[1, 1], torch.tensor(1.0))


# ---------------------------------------------------------------------------------------------------------------------
# locality prior and keys/values plans
# ---------------------------------------------------------------------------------------------------------------------


def test_sq_distances_of_tile_slots():
    region = TileGrid(6, 6, 2, 3).regions[0]
    d2 = region.sq_distances()
    assert d2.shape == (6, 6) and torch.equal(d2, d2.T) and (d2.diagonal() == 0).all()
    assert d2[0, 5] == 1 + 4 and d2[1, 3] == 1 + 1 and d2[2, 0] == 4  # slot i is (i // 3, i % 3)


def test_locality_prior_enters_selection_and_weights():
    grid = TileGrid(8, 8, 4, 4)
    x = _randn(2, 64, 8, seed=4)
    prior = 0.01 * grid.regions[0].sq_distances()
    tiles = grid.fold(x)[0]
    plan, dest = merge(x, grid, 0.5, tau=10.0, locality=0.01)
    want_dest = facility_location(cosine_similarity(tiles) - prior, 8)
    assert torch.equal(dest[0], want_dest)
    xn = F.normalize(tiles, dim=-1)
    logits = torch.gather(xn, 2, want_dest.unsqueeze(-1).expand(-1, -1, -1, 8)) @ xn.transpose(-1, -2)
    want = torch.softmax(10.0 * (logits - prior[want_dest]), dim=-2)
    want = torch.where(F.one_hot(want_dest, 16).sum(-2, keepdim=True) > 0, F.one_hot(want_dest, 16).float(), want)
    torch.testing.assert_close(plan.unmerge_mats[0].transpose(-1, -2), want)
    _, dest0 = merge(x, grid, 0.5, tau=10.0, locality=0.0)
    assert torch.equal(dest0[0], select_destinations(tiles, 8))


@pytest.mark.parametrize("case", [(8, 8, 4, 4), (7, 10, 2, 3)], ids=_grid_id)
def test_locality_on_flat_tiles_spreads_destinations_and_assigns_to_the_nearest(case):
    """On a constant tile every cosine is 1: the prior alone decides, so destinations spread over the tile (not the
    first k slots that the tie rule alone gives) and every token merges into a nearest destination."""
    h, w, th, tw = case
    grid = TileGrid(h, w, th, tw)
    x = torch.ones(1, h * w, 4)
    plan, dest = merge(x, grid, 0.75, locality=0.01)
    for r, d, u in zip(grid.regions, dest, plan.unmerge_mats, strict=True):
        d2 = r.sq_distances()
        nearest = d2[:, d[0, 0]].amin(-1)  # (s,) distance of every slot to its nearest destination
        assert torch.equal(d2[torch.arange(r.tile_size), d[0, 0][u[0, 0].argmax(-1)]], nearest)
        if r.tile_size == 16:
            assert nearest.max() <= 2  # four destinations covering a 4x4 tile: every token within one diagonal step
    torch.testing.assert_close(plan.unmerge(plan.merge(x)), x)


def test_merged_kv_plan():
    """Keys/values of a ToMA merge: the merged tokens ``M x``, or (``select``) the destination tokens themselves,
    per sample at the destinations' grid positions."""
    grid = TileGrid(6, 8, 2, 2)
    x = _randn(2, 48, 8, seed=6)
    plan, _ = merge(x, grid, 0.5)
    kv = MergedKV(plan)
    assert torch.equal(kv.kv(x), plan.merge(x)) and torch.equal(kv.kv_index, plan.dest) and kv.num_kv == 24
    picked = MergedKV(plan, select=True)
    assert torch.equal(picked.kv(x), torch.stack([x[b, plan.dest[b]] for b in range(2)]))
    assert isinstance(kv, KVPlan)
