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
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from tokenmerge.ops import toma_dispatch as dispatch
from tokenmerge.ops.tiles import TileGrid
from tokenmerge.ops.toma import MergeOptions, TileMerge, keep_count, toma_merge_torch

INNER_FLAG = "TOKENMERGE_TEST_TRITON_INTERPRETED"
INNER = os.environ.get(INNER_FLAG) == "1"

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (H, W, tile_h, tile_w): the tile sizes asked for, divisible and ragged grids (up to four regions)
CASES = [(8, 8, 4, 4), (4, 6, 2, 2), (6, 10, 3, 5), (8, 8, 8, 8), (9, 11, 4, 4), (7, 5, 2, 2), (5, 13, 3, 5)]
ATOL = dispatch.TOLERANCE  # what the run-time check accepts, per dtype


def _opts(ratio: float, tau: float = 100.0, **options: float) -> MergeOptions:
    """Merge options with ``ratio`` and ``tau`` (default: ToMA's)."""
    return MergeOptions(ratio, tau, **options)


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
    KERNEL = tt.toma_merge_triton  # the real kernels (tests below replace the module's with broken ones)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("case", CASES, ids=lambda c: "{}x{}-tile{}x{}".format(*c))
    def test_plan_matches_torch_on_random_input(case, dtype):
        h, w, th, tw = case
        grid = TileGrid(h, w, th, tw)
        ratio = {4: 0.5, 16: 0.5, 15: 0.25, 64: 0.75}[th * tw]
        locality = 0.02 if (h + w) % 2 else 0.0  # the distance prior on about half the cases
        x = _randn(2, h * w, 24, seed=h * w + th, dtype=dtype)
        options = _opts(ratio, locality=locality)
        _, ref_dest = toma_merge_torch(x, grid, options)
        got, got_dest = tt.toma_merge_triton(x, grid, options)
        assert isinstance(got, tt.TritonTileMerge)
        assert [d.shape for d in got_dest] == [d.shape for d in ref_dest]
        # the same stable tie rule: float rounding differences between the two paths do not change picks
        for a, b in zip(ref_dest, got_dest, strict=True):
            assert b.dtype == torch.long and torch.equal(a, b)
        # weights from the same destinations (the dest-reuse path of both)
        ref_same, _ = toma_merge_torch(x, grid, options, dest=got_dest)
        _assert_close_plans(ref_same, got, dtype)
        reuse, reuse_dest = tt.toma_merge_triton(x, grid, options, dest=got_dest)
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
            ref, ref_dest = toma_merge_torch(xd, grid, _opts(ratio))
            got, got_dest = tt.toma_merge_triton(xd, grid, _opts(ratio))
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
            options = _opts(ratio, tie_tol=tie_tol, locality=locality)
            _, ref_dest = toma_merge_torch(tokens, grid, options)
            _, got_dest = tt.toma_merge_triton(tokens, grid, options)
            assert torch.equal(got_dest[0], ref_dest[0]), ratio

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("case", [(8, 8, 4, 4), (9, 11, 4, 4), (6, 10, 3, 5)], ids=str)
    def test_merge_unmerge_kernels_match_torch(case, dtype):
        h, w, th, tw = case
        grid = TileGrid(h, w, th, tw)
        x = _randn(2, h * w, 40, seed=7, dtype=dtype)
        plan, _ = tt.toma_merge_triton(x, grid, _opts(0.5, tau=10.0))
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
        plan, _ = tt.toma_merge_triton(x, grid, _opts(0.0))
        assert plan.num_merged == 35
        assert torch.equal(plan.unmerge(plan.merge(x)), x)

    @pytest.fixture
    def fresh_checks(monkeypatch: pytest.MonkeyPatch) -> dict:
        """No signature checked yet and no warning given (the verdicts are per process); check mode."""
        verdicts: dict = {}
        monkeypatch.setattr(dispatch, "VERDICTS", verdicts)
        monkeypatch.setattr(dispatch, "_warned", set())
        monkeypatch.delenv(dispatch.ENV, raising=False)
        return verdicts

    def _assert_same_plan(a: TileMerge, b: TileMerge) -> None:
        assert torch.equal(a.dest, b.dest)
        for x, y in zip(a.merge_mats + a.unmerge_mats, b.merge_mats + b.unmerge_mats, strict=True):
            assert torch.equal(x, y)

    def test_dispatcher_uses_torch_where_kernels_do_not_apply(fresh_checks):
        plan, _ = dispatch.toma_merge(_randn(1, 256, 8, seed=0), TileGrid(16, 16, 16, 16), _opts(0.5))  # 256 > 128
        assert type(plan) is TileMerge and plan.kernel == "torch"
        x = _randn(1, 16, 8, seed=0).requires_grad_()
        plan, _ = dispatch.toma_merge(x, TileGrid(4, 4, 2, 2), _opts(0.5))
        assert type(plan) is TileMerge and plan.merge_mats[0].requires_grad and not fresh_checks

    def test_check_mode_trusts_agreeing_kernels_once_per_signature(fresh_checks, monkeypatch):
        torch_builds = []
        monkeypatch.setattr(dispatch, "toma_merge_torch", lambda *a: torch_builds.append(1) or toma_merge_torch(*a))
        grid, x = TileGrid(6, 10, 3, 5), _randn(2, 60, 24, seed=5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            plan, dest = dispatch.toma_merge(x, grid, _opts(0.25))
            again, _ = dispatch.toma_merge(x, grid, _opts(0.25))
            weights, _ = dispatch.toma_merge(x, grid, _opts(0.25), dest)  # given destinations: a signature of its own
        assert isinstance(plan, tt.TritonTileMerge) and plan.kernel == again.kernel == weights.kernel == "triton"
        assert len(torch_builds) == 2 and len(fresh_checks) == 2  # the torch path ran at each first meeting only
        assert all(v.trusted for v in fresh_checks.values())

    def _raising(*args):
        raise RuntimeError("triton.compiler.errors.CompilationError: at 12:4: unsupported")

    def _disagreeing(x, grid, options, dest=None):
        plan, found = KERNEL(x, grid, options, dest)
        plan.merge_mats = [m * 1.5 for m in plan.merge_mats]  # wrong weights, same destinations
        return plan, found

    @pytest.mark.parametrize("broken", [_raising, _disagreeing], ids=["raises", "disagrees"])
    def test_broken_kernel_falls_back_bit_for_bit_with_one_warning(fresh_checks, monkeypatch, broken):
        calls = []
        monkeypatch.setattr(tt, "toma_merge_triton", lambda *a: calls.append(1) or broken(*a))
        grid, x = TileGrid(9, 11, 4, 4), _randn(2, 99, 16, seed=9)
        reference, ref_dest = toma_merge_torch(x, grid, _opts(0.5))
        with pytest.warns(RuntimeWarning, match="TOKENMERGE_TRITON") as record:
            plan, dest = dispatch.toma_merge(x, grid, _opts(0.5))
            later, _ = dispatch.toma_merge(x, grid, _opts(0.5))
            other, _ = dispatch.toma_merge(_randn(4, 99, 16, seed=1), grid, _opts(0.5))  # same error: no new warning
        assert len(record) == 1 and ("CompilationError" in str(record[0].message)) == (broken is _raising)
        assert len(calls) == 2  # checked at each new signature, never used after failing
        for p in (plan, later):
            _assert_same_plan(p, reference)
            assert type(p) is TileMerge and p.kernel.startswith("torch (Triton failed its check: ")
        assert all(torch.equal(a, b) for a, b in zip(dest, ref_dest, strict=True))
        assert torch.equal(plan.unmerge(plan.merge(x)), reference.unmerge(reference.merge(x)))
        assert not any(v.trusted for v in fresh_checks.values()) and other.kernel == plan.kernel

    def test_trust_mode_skips_the_check_and_off_mode_the_kernels(fresh_checks, monkeypatch):
        grid, x = TileGrid(8, 8, 4, 4), _randn(1, 64, 8, seed=2)
        monkeypatch.setenv(dispatch.ENV, "1")
        monkeypatch.setattr(dispatch, "toma_merge_torch", None)  # never called
        assert dispatch.toma_merge(x, grid, _opts(0.5))[0].kernel == "triton" and not fresh_checks
        monkeypatch.undo()
        monkeypatch.setenv(dispatch.ENV, "0")
        monkeypatch.setattr(tt, "toma_merge_triton", None)  # never called
        assert dispatch.toma_merge(x, grid, _opts(0.5))[0].kernel == "torch"

    @pytest.mark.parametrize("broken", [None, _raising], ids=["kernels", "broken"])
    def test_pipeline_image_with_checked_or_broken_kernels(fresh_checks, monkeypatch, broken):
        """Through the stock pipeline call: agreeing kernels are used (and said in the summary); a broken kernel
        leaves the image bit for bit the torch path's, with one warning."""
        import tokenmerge as tm
        from tokenmerge.archs import tiny_pipeline

        from .conftest import generate

        pipe = tiny_pipeline("tiny-sd15")
        pipe.set_progress_bar_config(disable=True)
        tm.apply(pipe, tm.ToMA(mode="tokens", max_downsample=1))  # the 8x8 level: few interpreted launches
        monkeypatch.setenv(dispatch.ENV, "0")
        expected = generate(pipe, steps=1, height=16, width=16)
        monkeypatch.setenv(dispatch.ENV, "check")
        if broken is not None:
            monkeypatch.setattr(tt, "toma_merge_triton", broken)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            got = generate(pipe, steps=1, height=16, width=16)
        messages = [str(w.message) for w in record if "TOKENMERGE_TRITON" in str(w.message)]
        kernels = tm.summary(pipe).kernels()
        if broken is None:
            assert not messages and set(kernels) == {"triton"}
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        else:
            assert len(messages) == 1 and torch.equal(got, expected)
            assert [k.startswith("torch (Triton failed its check: RuntimeError") for k in kernels] == [True]
            assert "torch (Triton failed its check" in str(tm.summary(pipe))

else:

    def test_triton_kernels_under_interpreter():
        env = {**os.environ, "TRITON_INTERPRET": "1", INNER_FLAG: "1", "OMP_NUM_THREADS": "1"}  # tiny tensors
        cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:warnings", "-p", "no:cacheprovider", "-x"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]  # 5 would mean: nothing collected

    def test_dispatcher_uses_torch_on_cpu_and_checks_the_flag(monkeypatch):
        monkeypatch.setattr(dispatch, "VERDICTS", {})
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        plan, _ = dispatch.toma_merge(_randn(1, 16, 8, seed=0), TileGrid(4, 4, 2, 2), _opts(0.5))
        assert type(plan) is TileMerge and plan.kernel == "torch" and not dispatch.VERDICTS
        assert dispatch.fused_kernels(_randn(1, 16, 8, seed=0), TileGrid(4, 4, 2, 2)) is None
        for value, mode in (("check", "check"), (" 1", "1"), ("0", "0")):
            monkeypatch.setenv(dispatch.ENV, value)
            assert dispatch.triton_mode() == mode
        monkeypatch.setenv(dispatch.ENV, "yes")
        with pytest.raises(ValueError, match="TOKENMERGE_TRITON must be one of check, 1, 0, got 'yes'"):
            dispatch.toma_merge(_randn(1, 16, 8, seed=0), TileGrid(4, 4, 2, 2), _opts(0.5))

    def test_benchmark_script_cpu_smoke(tmp_path: Path):
        script = Path(__file__).resolve().parents[1] / "benchmarks" / "toma_kernels.py"
        out = tmp_path / "kernels.json"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        subprocess.run([sys.executable, str(script), "--out", str(out)], check=True, env=env, timeout=120)
        result = json.loads(out.read_text())
        assert result["device"] == "cpu" and result["mode"] == "interpreter-smoke"
        assert result["rows"] and all(row["dest_equal_or_tied"] and row["max_abs_err"] < 3e-2 for row in result["rows"])
