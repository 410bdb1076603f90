"""The cost model against real execution: FLOPs counted on a weightless twin vs ``count_flops`` around a real call.

Part 1: for each setting on a real-size architecture (random weights, batch 1, fp32 on the CPU), the FLOPs of the
first call of a generation counted while the real model runs vs counted on its twin (:class:`tokenmerge.cost.Twin`,
meta tensors): their relative difference, and the seconds each count took. Part 2: the seconds the cost model takes
for one setting (its resolution included) on every real-size architecture at its native resolution, full depth.

    python benchmarks/cost_check.py --out docs/results/cost_check.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import write_results

import tokenmerge as tm
from tokenmerge.archs import REAL_SIZE, build_dit, build_unet
from tokenmerge.cost import CostSpec, Twin, forget_twins
from tokenmerge.flops import count_flops
from tokenmerge.patch import adapter_for

SETTINGS = {
    "baseline": None,
    "toma": tm.ToMA(),
    "toma-kv": tm.ToMA(mode="kv"),
    "tomesd-whole": tm.ToMeSD(merge_crossattn=True, merge_mlp=True, max_downsample=4),
    "todo": tm.ToDo(),
    "catome-all": tm.CAToMe(threshold=-1.0, batch="max"),  # every source above the threshold: merged fraction 1
}
#: Real execution: the SD 1.5 UNet at 512 px whole, Flux.1-dev at 1024 px at real width with one block of each kind.
REAL = {"sd15": (build_unet, {}), "flux-dev": (build_dit, dict(num_layers=1, num_single_layers=1))}


def check(arch: str) -> list[dict]:
    build, overrides = REAL[arch]
    model = build(arch, **overrides)
    spec = CostSpec.parse(arch)
    adapter = adapter_for(model)
    shape = adapter.shape_at(spec.height, spec.width)
    inputs = adapter.example_inputs(shape, torch.Generator().manual_seed(0))
    twin = Twin.of(model)
    rows = []
    for name, method in SETTINGS.items():
        if method is not None:
            tm.apply(model, method)
            tm.set_step(model, 0)
        start = time.perf_counter()
        with torch.no_grad():
            real = count_flops(lambda: model(**inputs))
        real_s = time.perf_counter() - start
        concrete = tm.summary(model).method if method is not None else "-"
        start = time.perf_counter()
        counted = twin.call(method, shape, 1.0 if method is not None and method.content_adaptive else None)
        twin_s = time.perf_counter() - start
        tm.remove(model)
        rows.append(
            dict(
                arch=arch if not overrides else f"{arch} ({overrides})",
                config=name,
                method=concrete,
                real_tflop=round(real / 1e12, 6),
                twin_tflop=round(counted / 1e12, 6),
                rel_diff=abs(counted - real) / real,
                real_count_s=round(real_s, 2),
                twin_count_s=round(twin_s, 2),
            )
        )
        print(f"{rows[-1]['arch']:44s} {name:14s} real {real:.6e} twin {counted:.6e} diff {rows[-1]['rel_diff']:.1e}")
    return rows


def speed() -> list[dict]:
    rows = []
    for arch in REAL_SIZE:
        forget_twins()
        spec = CostSpec.parse(arch)
        start = time.perf_counter()
        twin, shape = spec.twin(), spec.shape()
        full = twin.call(None, shape)
        built_s = time.perf_counter() - start
        start = time.perf_counter()
        method = tm.ToMA().resolve(spec.view())
        resolved_s = time.perf_counter() - start
        start = time.perf_counter()
        merged = twin.call(tm.ToMeSD(ratio=0.6, merge_mlp=True), shape)
        setting_s = time.perf_counter() - start
        rows.append(
            dict(
                arch=spec.label,
                full_tflop=round(full / 1e12, 3),
                toma_default=method.describe(),
                toma_flop_ratio=round(full / twin.call(method, shape), 3),
                tomesd_flop_ratio=round(full / merged, 3),
                build_and_unpatched_s=round(built_s, 2),
                resolve_toma_s=round(resolved_s, 2),
                one_setting_s=round(setting_s, 2),
            )
        )
        print(rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    checks = [row for arch in REAL for row in check(arch)]
    worst = max(r["rel_diff"] for r in checks)
    print(f"largest relative difference: {worst:.2e}")
    write_results(args.out, checks, dict(speed=speed(), largest_rel_diff=worst))


if __name__ == "__main__":
    main()
