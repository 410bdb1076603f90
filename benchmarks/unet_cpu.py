"""CPU benchmark: real-size SD 1.5 UNet (random weights, fp32, 512px = 64x64 latent, batch 2 as under CFG).

Unpatched vs ToMA's tokens mode at several ratios and placements (and its default on UNets, keys/values mode at the
top level) vs the ``tomesd`` package, interleaved in one process (each round
runs every configuration once, in turn), median over rounds. Prints speed ratio, FLOP ratio, the share of the
FLOP-ideal saving realised ((1 - t/t0) / (1 - F/F0)) and the output deviation from the unpatched UNet; writes JSON.

    python benchmarks/unet_cpu.py --rounds 5 --out docs/results/unet_cpu.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import print_table, summarise, write_results

import tokenmerge as tm
from tokenmerge.archs import build_unet, unet_inputs
from tokenmerge.flops import count_flops


def configurations(include_tomesd: bool) -> dict[str, tuple[Callable, Callable]]:
    """name -> (patch, unpatch) functions of the UNet."""
    toma = {
        "toma-0.5-default": tm.ToMA(ratio=0.5),  # mode "auto": keys/values at the top level on a UNet
        "toma-0.25": tm.ToMA(mode="tokens", ratio=0.25),
        "toma-0.5": tm.ToMA(mode="tokens", ratio=0.5),
        "toma-0.75": tm.ToMA(mode="tokens", ratio=0.75),
        "toma-0.5-attn-only": tm.ToMA(mode="tokens", ratio=0.5, merge_crossattn=False, merge_mlp=False),
        "toma-0.5-attn-only-ds1": tm.ToMA(
            mode="tokens", ratio=0.5, merge_crossattn=False, merge_mlp=False, max_downsample=1
        ),
    }
    configs: dict[str, tuple[Callable, Callable]] = {"baseline": (lambda u: None, lambda u: None)}
    for name, method in toma.items():
        configs[name] = (lambda u, m=method: tm.apply(u, m), tm.remove)
    if include_tomesd:
        import tomesd

        configs["tomesd-0.5"] = (lambda u: tomesd.apply_patch(u, ratio=0.5), tomesd.remove_patch)
        configs["tomesd-0.5-like-toma"] = (
            lambda u: tomesd.apply_patch(u, ratio=0.5, max_downsample=4, merge_crossattn=True, merge_mlp=True),
            tomesd.remove_patch,
        )
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--size", type=int, default=64, help="latent height = width (64 = 512px)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-tomesd", action="store_true")
    parser.add_argument("--configs", nargs="+", help="run only these configurations (baseline is always run)")
    parser.add_argument("--out", type=Path, default=Path("unet_cpu.json"))
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    torch.manual_seed(0)
    unet = build_unet(args.arch)
    inputs = unet_inputs(unet, args.batch, args.size, args.size)
    sample, timestep = inputs.pop("sample"), inputs.pop("timestep")  # positional: tomesd's hook needs them so
    configs = configurations(not args.no_tomesd)
    if args.configs:
        unknown = set(args.configs) - configs.keys()
        if unknown:
            parser.error(f"unknown configurations {sorted(unknown)}; choose from {sorted(configs)}")
        configs = {k: v for k, v in configs.items() if k == "baseline" or k in args.configs}

    def forward() -> torch.Tensor:
        tm.reset(unet)  # every timed call plans from scratch: the worst case for ToMA's overhead
        with torch.inference_mode():
            return unet(sample, timestep, **inputs).sample

    outputs, flops, times = {}, {}, {name: [] for name in configs}
    for name, (patch, unpatch) in configs.items():  # warm-up, reference outputs and FLOPs
        patch(unet)
        outputs[name] = forward()
        flops[name] = count_flops(forward)
        unpatch(unet)
    for r in range(args.rounds):
        for name, (patch, unpatch) in configs.items():
            patch(unet)
            start = time.perf_counter()
            forward()
            times[name].append(time.perf_counter() - start)
            unpatch(unet)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    rows = summarise(times, outputs, flops)
    print_table(rows)
    write_results(
        args.out, rows, arch=args.arch, latent=args.size, batch=args.batch, rounds=args.rounds, dtype="float32"
    )


if __name__ == "__main__":
    main()
