"""The fused Triton ToMA kernels (``ops/triton_toma.py``) against the torch path, on CPU under ``TRITON_INTERPRET=1``.

``@triton.jit`` reads ``TRITON_INTERPRET`` when a function is decorated, triton's own library included, and other test
modules import triton (through diffusers) at collection. So the kernel tests run in a fresh ``pytest`` subprocess of
this file with the variable set from the start; the launcher test reports its outcome.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from tokenmerge.ops import toma as toma_ops
from tokenmerge.ops.tiles import TileGrid
from tokenmerge.ops.toma import TileMerge, keep_count, toma_merge, toma_merge_torch

INNER_FLAG = "TOKENMERGE_TEST_TRITON_INTERPRETED"
INNER = os.environ.get(INNER_FLAG) == "1"

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (H, W, tile_h, tile_w): the tile sizes asked for, divisible and ragged grids (up to four regions)
CASES = [(8, 8, 4, 4), (4, 6, 2, 2), (6, 10, 3, 5), (8, 8, 8, 8), (9, 11, 4, 4), (7, 5, 2, 2), (5, 13, 3, 5)]
ATOL = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _assert_close_plans(a: TileMerge, b: TileMerge, dtype: torch.dtype) -> None:
    assert torch.equal(a.dest, b.dest)
    for ma, mb, ua, ub in zip(a.merge_mats, b.merge_mats, a.unmerge_mats, b.unmerge_mats, strict=True):
        assert ma.dtype == mb.dtype == ua.dtype == ub.dtype == dtype
        torch.testing.assert_close(mb.float(), ma.float(), atol=ATOL[dtype], rtol=0)
        torch.testing.assert_close(ub.float(), ua.float(), atol=ATOL[dtype], rtol=0)


if INNER:
    from tokenmerge.ops import triton_toma as tt

    assert tt.INTERPRETED, "TRITON_INTERPRET=1 must be set before triton is imported"

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("case", CASES, ids=lambda c: "{}x{}-tile{}x{}".format(*c))
    def test_plan_matches_torch_on_random_input(case, dtype):
        h, w, th, tw = case
        grid = TileGrid(h, w, th, tw)
        ratio = {4: 0.5, 16: 0.5, 15: 0.25, 64: 0.75}[th * tw]
        locality = 0.02 if (h + w) % 2 else 0.0  # the distance prior on about half the cases
        x = _randn(2, h * w, 24, seed=h * w + th, dtype=dtype)
        _, ref_dest = toma_merge_torch(x, grid, ratio, locality=locality)
        got, got_dest = tt.toma_merge_triton(x, grid, ratio, locality=locality)
        assert isinstance(got, tt.TritonTileMerge)
        assert [d.shape for d in got_dest] == [d.shape for d in ref_dest]
        # the same stable tie rule: float rounding differences between the two paths do not change picks
        for a, b in zip(ref_dest, got_dest, strict=True):
            assert b.dtype == torch.long and torch.equal(a, b)
        # weights from the same destinations (the dest-reuse path of both)
        ref_same, _ = toma_merge_torch(x, grid, ratio, dest=got_dest, locality=locality)
        _assert_close_plans(ref_same, got, dtype)
        reuse, reuse_dest = tt.toma_merge_triton(x, grid, ratio, dest=got_dest, locality=locality)
        assert reuse_dest is got_dest or all(torch.equal(a, b) for a, b in zip(reuse_dest, got_dest, strict=True))
        _assert_close_plans(ref_same, reuse, dtype)

    @pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
    def test_selection_exact_with_ties(ratio):
        # tokens on a few orthogonal directions, scaled by powers of two: cosines are exactly 0 or 1 in both paths, so
        # every tie is exact and must go to the lowest index; plus constant, zero and duplicated tiles
        grid = TileGrid(6, 10, 3, 5)
        gen = torch.Generator().manual_seed(int(ratio * 100))
        direction = torch.randint(0, 4, (2, 60), generator=gen)
        scale = 2.0 ** torch.randint(-3, 4, (2, 60), generator=gen).float()
        x = torch.nn.functional.one_hot(direction, 8).float() * scale[..., None]
        x[0, :30] = 1.5  # constant region
        x[1, 30:] = 0.0  # zero tokens
        for dtype in DTYPES:
            xd = x.to(dtype)
            ref, ref_dest = toma_merge_torch(xd, grid, ratio)
            got, got_dest = tt.toma_merge_triton(xd, grid, ratio)
            for a, b in zip(ref_dest, got_dest, strict=True):
                assert torch.equal(a, b)
            _assert_close_plans(ref, got, dtype)
            k = keep_count(15, ratio)
            assert all(len(set(t)) == k for d in got_dest for t in d.flatten(0, 1).tolist())

    @pytest.mark.parametrize(("tie_tol", "locality"), [(1e-4, 0.0), (1e-3, 0.0), (1e-4, 1e-3)])
    def test_tie_heavy_tiles_pick_identically(tie_tol, locality):
        # constant tiles, mutual pairs, duplicated and scaled-duplicate tokens with 1e-6 relative noise: float ties
        # everywhere, which the exact rule broke differently in torch and in the kernel
        gen = torch.Generator().manual_seed(3)
        grid = TileGrid(8, 16, 4, 4)
        x = torch.randn(2, 8, 16, 12, generator=gen)
        x[:, 0] = x[:, 0, :1]
        x[:, 1] = x[:, 1, :8].repeat(1, 2, 1)
        x[:, 2] = x[:, 2, :2].repeat(1, 8, 1)
        x[:, 3] = x[:, 3, :4].repeat_interleave(4, 1) * torch.rand(1, 16, 1, generator=gen)
        x = x * (1 + 1e-6 * torch.randn(x.shape, generator=gen))
        tokens = grid.unfold([x])
        for ratio in (0.25, 0.5, 0.75):
            _, ref_dest = toma_merge_torch(tokens, grid, ratio, tie_tol=tie_tol, locality=locality)
            _, got_dest = tt.toma_merge_triton(tokens, grid, ratio, tie_tol=tie_tol, locality=locality)
            assert torch.equal(got_dest[0], ref_dest[0]), ratio

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("case", [(8, 8, 4, 4), (9, 11, 4, 4), (6, 10, 3, 5)], ids=str)
    def test_merge_unmerge_kernels_match_torch(case, dtype):
        h, w, th, tw = case
        grid = TileGrid(h, w, th, tw)
        x = _randn(2, h * w, 40, seed=7, dtype=dtype)
        plan, _ = tt.toma_merge_triton(x, grid, 0.5, tau=10.0)
        base = TileMerge(plan.grid, plan.merge_mats, plan.unmerge_mats, plan.dest)
        xs = _randn(2, 40, h * w, seed=8, dtype=dtype).transpose(1, 2)  # non-contiguous input
        y_ref, y = base.merge(xs), plan.merge(xs)
        assert y.shape == (2, plan.num_merged, 40) and y.dtype == dtype
        torch.testing.assert_close(y.float(), y_ref.float(), atol=ATOL[dtype], rtol=ATOL[dtype])
        out_ref, out = base.unmerge(y_ref), plan.unmerge(y_ref)
        assert out.shape == xs.shape and out.dtype == dtype
        torch.testing.assert_close(out.float(), out_ref.float(), atol=ATOL[dtype], rtol=ATOL[dtype])

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_keep_all_roundtrips_exactly(dtype):
        grid = TileGrid(5, 7, 2, 3)
        x = _randn(1, 35, 20, seed=3, dtype=dtype)
        plan, _ = tt.toma_merge_triton(x, grid, 0.0)
        assert plan.num_merged == 35
        assert torch.equal(plan.unmerge(plan.merge(x)), x)

    def test_falls_back_to_torch_where_kernels_do_not_apply():
        grid = TileGrid(16, 16, 16, 16)  # 256-token tiles: larger than MAX_TILE_SIZE
        x = _randn(1, 256, 8, seed=0)
        plan, _ = tt.toma_merge_triton(x, grid, 0.5)
        assert type(plan) is TileMerge
        x = _randn(1, 16, 8, seed=0).requires_grad_()
        plan, _ = tt.toma_merge_triton(x, TileGrid(4, 4, 2, 2), 0.5)
        assert type(plan) is TileMerge and plan.merge_mats[0].requires_grad

else:

    def test_triton_kernels_under_interpreter():
        env = {**os.environ, "TRITON_INTERPRET": "1", INNER_FLAG: "1"}
        cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:warnings", "-p", "no:cacheprovider", "-x"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]  # 5 would mean: nothing collected

    def test_dispatcher_uses_torch_on_cpu_and_honours_flag(monkeypatch):
        x = _randn(1, 16, 8, seed=0)
        assert not toma_ops.use_triton(x)
        plan, _ = toma_merge(x, TileGrid(4, 4, 2, 2), 0.5)
        assert type(plan) is TileMerge
        cuda_like = SimpleNamespace(is_cuda=True)
        monkeypatch.setattr(toma_ops, "USE_TRITON", True)
        assert toma_ops.use_triton(cuda_like)
        monkeypatch.setattr(toma_ops, "USE_TRITON", False)
        assert not toma_ops.use_triton(cuda_like)

    def test_benchmark_script_cpu_smoke(tmp_path: Path):
        script = Path(__file__).resolve().parents[1] / "benchmarks" / "toma_kernels.py"
        out = tmp_path / "kernels.json"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        subprocess.run([sys.executable, str(script), "--out", str(out)], check=True, env=env, timeout=120)
        result = json.loads(out.read_text())
        assert result["device"] == "cpu" and result["mode"] == "interpreter-smoke"
        assert result["rows"] and all(row["dest_equal_or_tied"] and row["max_abs_err"] < 3e-2 for row in result["rows"])
