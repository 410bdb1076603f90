"""CPU benchmark: Flux-architecture transformer at real width (3072 = 24 heads x 128) and reduced depth (2 double + 4
single blocks by default), random weights, fp32, 1024px token counts (64x64 = 4096 image + 512 text tokens), batch 1.

Unpatched vs ToMA at several ratios with every block merged (the default leaves the first five of each kind full,
which would be all of them at this depth), interleaved in one process (each round runs every configuration once, in
turn), median over rounds. Prints speed ratio, FLOP ratio, the share of the FLOP-ideal saving realised
((1 - t/t0) / (1 - F/F0)) and the output deviation from the unpatched model; writes JSON.

    python benchmarks/flux_cpu.py --rounds 3 --out docs/results/flux_cpu.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from _common import print_table, summarise, write_results

import tokenmerge as tm
from tokenmerge.archs import build_dit
from tokenmerge.flops import count_flops


def build_flux(double: int, single: int, seed: int = 0) -> torch.nn.Module:
    """The built-in ``flux-dev`` layout (width 3072, 24 heads of 128, T5 width 4096) at the given depth."""
    return build_dit("flux-dev", seed=seed, num_layers=double, num_single_layers=single)


def flux_inputs(size: int, text: int, seed: int = 0) -> dict[str, Any]:
    """Keyword inputs of one transformer call: a ``size x size`` packed latent grid and ``text`` T5 tokens."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    return dict(
        hidden_states=torch.randn(1, size * size, 64, generator=g),
        encoder_hidden_states=torch.randn(1, text, 4096, generator=g),
        pooled_projections=torch.randn(1, 768, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=img_ids,
        txt_ids=torch.zeros(text, 3),
        guidance=torch.tensor([3.5]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="packed latent grid height = width (64 = 1024px)")
    parser.add_argument("--text", type=int, default=512, help="T5 text tokens")
    parser.add_argument("--double", type=int, default=2, help="double-stream blocks")
    parser.add_argument("--single", type=int, default=4, help="single-stream blocks")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("flux_cpu.json"))
    args = parser.parse_args()
    if args.rounds < 1 or args.size < 1 or args.text < 1 or args.double < 0 or args.single < 0:
        parser.error("--rounds, --size and --text must be >= 1, --double and --single >= 0")

    model = build_flux(args.double, args.single)
    inputs = flux_inputs(args.size, args.text)
    everything = {"double": (0, None), "single": (0, None)}
    configs: dict[str, tm.ToMA | None] = {"baseline": None}
    configs |= {f"toma-{r:g}": tm.ToMA(ratio=r, blocks=everything) for r in args.ratios}

    def forward() -> torch.Tensor:
        tm.reset(model)  # every timed call plans from scratch: the worst case for ToMA's overhead
        with torch.inference_mode():
            return model(**inputs).sample

    def run(name: str) -> torch.Tensor:
        method = configs[name]
        if method is not None:
            tm.apply(model, method)
        try:
            return forward()
        finally:
            tm.remove(model)

    outputs, flops, times = {}, {}, {name: [] for name in configs}
    for name in configs:  # warm-up, reference outputs and FLOPs in one call each
        flops[name] = count_flops(lambda name=name: outputs.__setitem__(name, run(name)))
        print(f"warm-up {name}: {flops[name] / 1e12:.2f} TFLOP", flush=True)
    for r in range(args.rounds):
        for name in configs:
            start = time.perf_counter()
            run(name)
            times[name].append(time.perf_counter() - start)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    rows = summarise(times, outputs, flops)
    print_table(rows)
    write_results(
        args.out,
        rows,
        arch="flux-dev width, reduced depth",
        double_blocks=args.double,
        single_blocks=args.single,
        image_tokens=args.size * args.size,
        text_tokens=args.text,
        batch=1,
        rounds=args.rounds,
        dtype="float32",
    )


if __name__ == "__main__":
    main()
