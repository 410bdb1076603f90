"""CPU cost of ToMA's own work at SD 1.5's token levels (512px, batch 2): destination selection, merge weights,
and one merge + unmerge, each timed alone (median of repeats). Writes JSON.

    python benchmarks/toma_ops_cpu.py --out docs/results/toma_ops_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

from tokenmerge.methods.toma import ToMA
from tokenmerge.ops.tiles import TileGrid
from tokenmerge.ops.toma import keep_count, toma_merge_torch

LEVELS = {"64x64": (64, 320), "32x32": (32, 640), "16x16": (16, 1280)}  # grid side, channels


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("toma_ops_cpu.json"))
    args = parser.parse_args()
    options = ToMA(ratio=args.ratio).merge_options  # ToMA's defaults (tau, tie tolerance, no locality)
    rows = []
    print(f"{'level':7s} {'select+weights ms':>18s} {'weights only ms':>16s} {'merge+unmerge ms':>17s}")
    with torch.inference_mode():
        for name, (side, channels) in LEVELS.items():
            x = torch.randn(args.batch, side * side, channels)
            grid = TileGrid(side, side, 4, 4)
            plan, dest = toma_merge_torch(x, grid, options)
            y = plan.merge(x)

            def select_and_weigh(x=x, grid=grid) -> object:
                return toma_merge_torch(x, grid, options)

            def weigh(x=x, grid=grid, dest=dest) -> object:
                return toma_merge_torch(x, grid, options, dest=dest)

            def merge_unmerge(x=x, y=y, plan=plan) -> object:
                return plan.unmerge(plan.merge(x) + y)

            row = dict(
                level=name,
                channels=channels,
                keep_per_tile=keep_count(16, args.ratio),
                plan_ms=median_ms(select_and_weigh, args.repeats),
                weights_ms=median_ms(weigh, args.repeats),
                merge_unmerge_ms=median_ms(merge_unmerge, args.repeats),
            )
            rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
            print(f"{name:7s} {row['plan_ms']:18.2f} {row['weights_ms']:16.2f} {row['merge_unmerge_ms']:17.2f}")
    meta = dict(ratio=args.ratio, batch=args.batch, threads=torch.get_num_threads(), date=date.today().isoformat())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, results=rows), indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
