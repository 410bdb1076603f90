"""The ``tokenmerge pareto`` sweep with the FLOP ratio as its speed axis: deterministic, so it can run on a shared CPU.

Same settings (``--methods`` / ``--preset`` as ``pareto``), the same image set and fidelity (PSNR to the unaccelerated
images, capped per image at 100 dB) as ``tokenmerge pareto --model MODEL``; the speed-up is replaced by the FLOP ratio
of the whole generation (unaccelerated FLOPs / the setting's, merge overhead included; ``tokenmerge.flops``). Prints
every point, the front and each family's targets (issue #12: default on the front, within 1 dB at every ratio from
1.2 up) and writes JSON. Rows already in ``--out`` (same label and method) are reused, so a sweep can be resumed.

    python benchmarks/toma_variants.py --model reference-unet --out unet_flops.json
    python benchmarks/toma_variants.py --model reference-flux --methods toma,todo --preset toma=kv --out f.json

A FLOP ratio is not a speed-up (attention kernels, memory traffic and the merge's own cost weigh differently); the
wall-clock front is ``tokenmerge pareto`` on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from tokenmerge.flops import count_flops
from tokenmerge.harness.pareto import Point, check_targets, front, standard_metrics
from tokenmerge.harness.runners import REFERENCE, open_runner
from tokenmerge.harness.sweep import BASELINE, Selection, build_settings, layout_of


def measure(runner: Any, setting: Any) -> tuple[torch.Tensor, int]:
    """The setting's images and the FLOPs of generating them."""
    out: list[torch.Tensor] = []
    setting.apply(runner.target)
    try:
        flops = count_flops(lambda: out.append(runner.generate()))
    finally:
        setting.remove(runner.target)
    return out[0], flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(REFERENCE), default="reference-unet")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--methods", help="comma-separated (default: every sweepable method)")
    ap.add_argument("--preset", action="append", default=[], metavar="METHOD=A,B", help="presets of a method")
    ap.add_argument("--num-prompts", type=int, default=8, help="first N of pareto's default captions (default 8)")
    ap.add_argument("--steps", type=int, default=15, help="denoising steps (default 15, as pareto)")
    args = ap.parse_args()
    presets = {k: v.split(",") for k, _, v in (p.partition("=") for p in args.preset)}
    selection = Selection(args.methods.split(",") if args.methods else None, presets)
    runner = open_runner(args.model, None, None, args.num_prompts, torch.device("cpu"), steps=args.steps)
    plan = build_settings(layout_of(runner.target), selection, runner.method_defaults)
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    cached = {(r["config"], r["method"]): r for r in old.get("results", [])}
    psnr = standard_metrics()[0]
    prompts = list(runner.images.prompts)
    base_images, base_flops = measure(runner, BASELINE)
    rows, points = [], []
    for setting in plan.settings:
        method = repr(getattr(setting, "method", None))
        row = cached.get((setting.label, method))
        if row is None:
            images, flops = (base_images, base_flops) if setting is BASELINE else measure(runner, setting)
            score = psnr.score(images, base_images, prompts)
            row = dict(config=setting.label, method=method, default=setting.default, flops=flops, psnr=score)
            print(f"{setting.label:32s} {score:7.2f} dB  FLOP ratio {base_flops / flops:.3f}", flush=True)
        row["flop_ratio"] = base_flops / row["flops"]
        rows.append(row)
        points.append(Point(setting, [1.0], row["flop_ratio"], {"psnr": row["psnr"]}, 0.0, False))
    on_front = set(front(points, psnr))
    print("\n| setting | FLOP ratio | PSNR (dB) | front |\n| --- | ---: | ---: | --- |")
    for i in sorted(range(len(points)), key=lambda i: points[i].speedup):
        p = points[i]
        name = p.label + (" (default)" if p.setting.default else "")
        print(f"| {name} | {p.speedup:.3f} | {p.scores['psnr']:.2f} | {'front' if i in on_front else ''} |")
    targets = {}
    for family in dict.fromkeys(p.setting.family for p in points[1:]):
        report = check_targets(points, psnr, family)
        d, w = report.default, report.worst
        targets[family] = dict(default_ok=report.default_ok, gaps_ok=report.gaps_ok)
        if d is not None:
            targets[family] |= dict(best_faster=d.best_faster, advantage=d.advantage)
        if w is not None:
            targets[family] |= dict(worst_gap=w.gap, at=w.min_speedup, family_best=w.family_best, best=w.overall_best)
        print(f"targets {family}: {targets[family]}")
    for row in rows:
        row["psnr"] = row["psnr"] if math.isfinite(row["psnr"]) else "inf"
    meta = dict(
        model=args.model,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        prompts=prompts,
        steps=args.steps,
    )
    args.out.write_text(json.dumps(dict(meta=meta, results=rows, targets=targets), indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
