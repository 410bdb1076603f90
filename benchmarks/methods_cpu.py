"""CPU benchmark of every method on the real-size SD 1.5 UNet (random weights, fp32, 512px = 64x64 latent, batch 2).

Unpatched vs ToMA, ToMeSD, CA-ToMe and ToDo, with the ``tomesd`` and ``ca-tome`` packages themselves as peers,
interleaved in one process (each round runs every configuration once, in turn), median over rounds. Prints the speed
ratio and the output deviation from the unpatched UNet on the same inputs; writes JSON.

CA-ToMe is timed twice: at a checkpoint step (matching computed; ``tm.reset`` before every call) and at a cached step
(pairs reused). ``ca-tome`` runs its blocks without its private pipeline call: the benchmark sets the step attribute
its blocks read.

    python benchmarks/methods_cpu.py --rounds 3 --out methods_cpu.json
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

#: (patch, unpatch, cached): ``cached`` configurations are timed on a second call that reuses the first one's plans;
#: the others on a first call (``tm.reset`` before it: plans from scratch, the worst case).
Patch = tuple[Callable[[torch.nn.Module], object], Callable[[torch.nn.Module], object], bool]


def ours(method: tm.Method, cached: bool = False) -> Patch:
    return (lambda u: tm.apply(u, method), tm.remove, cached)


def ca_tome_patch(threshold: float, checkpoint: bool) -> Patch:
    """The ``ca-tome`` package's block patch, every call at a checkpoint (matching) or at a cached step."""
    from ca_tome import patch as ca_patch

    def apply(unet: torch.nn.Module) -> None:
        ca_patch.apply_patch(unet, [1] if checkpoint else [0], threshold)
        for module in unet.modules():
            if hasattr(module, "_cache_info"):
                module.inference_step = 1  # what its private pipeline call would set (1-based)

    return (apply, ca_patch.remove_patch, not checkpoint)


def configurations(peers: bool) -> dict[str, Patch]:
    none: Patch = (lambda u: None, lambda u: None, False)
    configs: dict[str, Patch] = {
        "baseline": none,
        "toma-0.5": ours(tm.ToMA(mode="tokens", ratio=0.5)),
        "toma-0.5-attn-only-ds1": ours(
            tm.ToMA(mode="tokens", ratio=0.5, merge_crossattn=False, merge_mlp=False, max_downsample=1)
        ),
        "tomesd-0.5": ours(tm.ToMeSD(ratio=0.5, seed=0)),
        "tomesd-0.5-ds4-all": ours(
            tm.ToMeSD(ratio=0.5, max_downsample=4, merge_crossattn=True, merge_mlp=True, seed=0)
        ),
        "catome-0.7-checkpoint": ours(tm.CAToMe(threshold=0.7, seed=0)),
        "catome-0.7-cached": ours(tm.CAToMe(threshold=0.7, schedule=[1], seed=0), cached=True),
        "catome-0.7-max-checkpoint": ours(tm.CAToMe(threshold=0.7, batch="max", seed=0)),
        "todo-2": ours(tm.ToDo(factor=2)),
        "todo-2-ds2": ours(tm.ToDo(factor=2, max_downsample=2)),
    }
    if peers:
        import tomesd

        configs["pkg:tomesd-0.5"] = (lambda u: tomesd.apply_patch(u, ratio=0.5), tomesd.remove_patch, False)
        configs["pkg:tomesd-0.5-ds4-all"] = (
            lambda u: tomesd.apply_patch(u, ratio=0.5, max_downsample=4, merge_crossattn=True, merge_mlp=True),
            tomesd.remove_patch,
            False,
        )
        configs["pkg:ca-tome-0.7-checkpoint"] = ca_tome_patch(0.7, checkpoint=True)
        configs["pkg:ca-tome-0.7-cached"] = ca_tome_patch(0.7, checkpoint=False)
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="latent height = width (64 = 512px)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-peers", action="store_true", help="leave out the tomesd and ca-tome packages")
    parser.add_argument("--configs", help="comma-separated subset of the configuration names (baseline always runs)")
    parser.add_argument("--out", type=Path, default=Path("methods_cpu.json"))
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    torch.manual_seed(0)
    unet = build_unet("sd15")
    inputs = unet_inputs(unet, args.batch, args.size, args.size)
    sample, timestep = inputs.pop("sample"), inputs.pop("timestep")  # positional: the packages' hooks need them so
    configs = configurations(not args.no_peers)
    if args.configs:
        wanted = {"baseline", *args.configs.split(",")}
        if wanted - configs.keys():
            parser.error(f"unknown configurations: {', '.join(sorted(wanted - configs.keys()))}")
        configs = {name: c for name, c in configs.items() if name in wanted}

    def forward(cached: bool = False) -> torch.Tensor:
        if not cached:
            tm.reset(unet)
        torch.manual_seed(0)  # the packages (and seed-less methods) fork the global generator
        with torch.inference_mode():
            return unet(sample, timestep, **inputs).sample

    outputs, times = {}, {name: [] for name in configs}
    for name, (patch, unpatch, _) in configs.items():  # warm-up and reference outputs
        patch(unet)
        outputs[name] = forward()
        unpatch(unet)
    for r in range(args.rounds):
        for name, (patch, unpatch, cached) in configs.items():
            patch(unet)
            if cached:
                forward()  # untimed: computes the plans the timed call reuses
            start = time.perf_counter()
            forward(cached)
            times[name].append(time.perf_counter() - start)
            unpatch(unet)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    rows = summarise(times, outputs)
    print_table(rows)
    write_results(args.out, rows, arch="sd15", latent=args.size, batch=args.batch, rounds=args.rounds, dtype="float32")


if __name__ == "__main__":
    main()
