"""Fused Triton ToMA kernels vs the torch path. Writes JSON.

On CUDA: latency (CUDA events, median of repeats) of building the plan (selection + weights) and of one merge +
unmerge, Triton vs torch, at SDXL-like sizes (batch 2; 64x64 tokens x 640 ch, 32x32 x 1280; 4x4 tiles; ratio 0.5).
On CPU: a tiny correctness smoke of the kernels under the Triton interpreter (``TRITON_INTERPRET=1``).

    python benchmarks/toma_kernels.py --out toma_kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton_toma is imported: @triton.jit reads it

from tokenmerge.methods.toma import ToMA
from tokenmerge.ops.select import cosine_similarity
from tokenmerge.ops.tiles import TileGrid
from tokenmerge.ops.toma import MergeOptions, toma_merge_torch
from tokenmerge.ops.triton_toma import toma_merge_triton

LEVELS = {"64x64x640": (64, 640), "32x32x1280": (32, 1280)}  # grid side, channels
TINY = {"8x8x32": (8, 32), "6x10x16": ((6, 10), 16)}


def cuda_median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def compare(x: torch.Tensor, grid: TileGrid, options: MergeOptions) -> dict[str, object]:
    """Triton vs torch on one input: destinations equal (or exact-arithmetic ties), max error of merge + unmerge."""
    _, ref_dest = toma_merge_torch(x, grid, options)
    got, got_dest = toma_merge_triton(x, grid, options)
    same = all(torch.equal(a, b) for a, b in zip(ref_dest, got_dest, strict=True))
    tied = same
    if not same:  # rounding may decide exact ties differently: the first differing pick must be a near-tie
        tied = True
        for tiles, a, b in zip(grid.fold(x), ref_dest, got_dest, strict=True):
            sims = cosine_similarity(tiles).double()
            for idx in zip(*torch.nonzero((a != b).any(-1), as_tuple=True), strict=True):
                r, g = a[idx].tolist(), b[idx].tolist()
                step = next(i for i in range(len(r)) if r[i] != g[i])
                sim = sims[idx]
                gains = sim.sum(-1) if step == 0 else (sim - sim[r[:step]].amax(0)).clamp_min(0).sum(-1)
                tied &= abs(gains[r[step]] - gains[g[step]]).item() <= 1e-5 * max(1.0, gains.abs().max().item())
    ref_same, _ = toma_merge_torch(x, grid, options, dest=got_dest)
    err = (ref_same.unmerge(ref_same.merge(x)).float() - got.unmerge(got.merge(x)).float()).abs().max().item()
    return {"dest_equal": same, "dest_equal_or_tied": tied, "max_abs_err": err}


def kernel_rows(
    options: MergeOptions, batch: int, tile: int, dtype: torch.dtype, repeats: int, cuda: bool
) -> list[dict[str, object]]:
    """One row per level: Triton vs torch on a random input (:func:`compare`), and on CUDA the latency of both."""
    rows = []
    with torch.inference_mode():
        for name, (side, channels) in (LEVELS if cuda else TINY).items():
            h, w = side if isinstance(side, tuple) else (side, side)
            grid = TileGrid(h, w, tile, tile)
            x = torch.randn(batch, h * w, channels, device="cuda" if cuda else "cpu").to(dtype)
            row: dict[str, object] = {
                "level": name,
                "dtype": str(dtype).removeprefix("torch."),
                **compare(x, grid, options),
            }
            if cuda:
                for path, build in (("torch", toma_merge_torch), ("triton", toma_merge_triton)):
                    plan, dest = build(x, grid, options)
                    y = plan.merge(x)

                    def plan_fn(build=build, x=x, grid=grid) -> object:
                        return build(x, grid, options)

                    def weights_fn(build=build, x=x, grid=grid, dest=dest) -> object:
                        return build(x, grid, options, dest=dest)

                    def apply_fn(plan=plan, x=x, y=y) -> object:
                        return plan.unmerge(plan.merge(x) + y)

                    row[f"{path}_plan_ms"] = round(cuda_median_ms(plan_fn, repeats), 4)
                    row[f"{path}_weights_only_ms"] = round(cuda_median_ms(weights_fn, repeats), 4)
                    row[f"{path}_merge_unmerge_ms"] = round(cuda_median_ms(apply_fn, repeats), 4)
                for key in ("plan", "weights_only", "merge_unmerge"):
                    row[f"speedup_{key}"] = round(row[f"torch_{key}_ms"] / row[f"triton_{key}_ms"], 3)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tile", type=int, default=4)
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("toma_kernels.json"))
    args = parser.parse_args()
    options = ToMA(ratio=args.ratio).merge_options  # ToMA's defaults (tau, tie tolerance, no locality)
    cuda = torch.cuda.is_available()
    rows = kernel_rows(options, args.batch, args.tile, getattr(torch, args.dtype), args.repeats, cuda)
    for row in rows:
        print(json.dumps(row))
    result = {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "mode": "cuda-timing" if cuda else "interpreter-smoke",
        "batch": args.batch,
        "tile": args.tile,
        "ratio": args.ratio,
        "tau": options.tau,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "torch": torch.__version__,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
