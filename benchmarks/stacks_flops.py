"""Step caches, methods and their stacks on a reference model: fidelity and FLOP ratio (deterministic, any machine).

For every setting (the unaccelerated baseline, each method at its values, each cache at its values, each stack) the
whole image set is generated once under ``torch.utils.flop_counter``: the FLOP ratio (baseline FLOPs / the setting's,
merge overheads included; a cache's elementwise checks are not counted) is the speed-up a setting could reach at
best, and PSNR / relative L2 say what it cost. Timing is ``tokenmerge pareto``'s job (same settings, same flags).

    python benchmarks/stacks_flops.py --model reference-flux --methods toma,todo --caches fbc,taylorseer \\
        --stack fbc=0.1,0.3+toma=0.25,0.5 --out results/stacks_flux.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tokenmerge.flops import count_flops
from tokenmerge.harness.metrics import psnr
from tokenmerge.harness.models import resolve_device
from tokenmerge.harness.runners import open_runner
from tokenmerge.harness.stacks import build_cache_settings
from tokenmerge.harness.sweep import Selection, build_settings, layout_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference-flux")
    parser.add_argument("--methods", default="toma,todo", help="comma-separated, or none")
    parser.add_argument("--caches", default="", help="comma-separated step caches")
    parser.add_argument("--stack", action="append", default=[], help="CACHE=V,..+METHOD=V,.. (repeatable)")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="the methods' and caches' quick values")
    parser.add_argument("--skip", action="append", default=[], help="leave this setting label out (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    runner = open_runner(args.model, None, None, args.num_prompts, resolve_device("cpu"), steps=args.steps)
    layout = layout_of(runner.target)
    chosen = [] if args.methods == "none" else [m for m in args.methods.split(",") if m]
    presets = {name: ["default"] for name in chosen}  # each method's default placement, at its values
    plan = build_settings(layout, Selection(chosen, presets, quick=args.quick), runner.method_defaults)
    caches = [c for c in args.caches.split(",") if c]
    extra, skipped = build_cache_settings(layout, runner.target, caches, args.stack, args.quick, runner.method_defaults)
    rows, base, base_flops = [], None, None
    for setting in [*plan.settings, *extra]:
        if setting.label in args.skip:
            continue
        setting.apply(runner.target)
        try:
            images: list[torch.Tensor] = []
            flops = count_flops(lambda images=images: images.append(runner.generate()))
        finally:
            setting.remove(runner.target)
        out = images[0]
        if base is None:
            base, base_flops = out, flops
        rel_l2 = ((out - base).norm() / base.norm()).item()
        row = dict(config=setting.label, family=setting.family, flop_ratio=round(base_flops / flops, 3))
        row.update(psnr=round(psnr(out, base).mean().item(), 2), rel_l2=round(rel_l2, 4))
        rows.append(row)
        print(f"{row['config']:45s} flop_ratio {row['flop_ratio']:6.3f}  psnr {row['psnr']:6.2f}", flush=True)
    for item in [*plan.skipped, *skipped]:
        print(f"skipped {item.label}: {item.reason}")
    meta = dict(model=args.model, num_prompts=args.num_prompts, steps=args.steps, torch=torch.__version__)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
