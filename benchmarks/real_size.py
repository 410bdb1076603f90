"""CPU time of real-size denoisers (random weights, fp32, batch 1, 2 threads): what a setting buys where users run it.

Architectures: the SD 1.5 UNet at 512 px and the SDXL UNet at 1024 px, whole; Flux.1-dev and SD 3.5 large at 1024 px
at their real width but reduced depth (one block of each kind), **scaled to the full depth**: a call of the full
model is estimated as the reduced call's time outside the blocks plus, per block kind, the measured time of a full
block (the unaccelerated run's) for every block the setting leaves full and of a merged block (the setting's run, all
blocks merged) for every block it merges on the full model. Settings: unaccelerated, every method's default (as it
resolves on the full architecture) and the ToMA points given. Schedule: one untimed warm-up call per setting, then
interleaved rounds in shuffled order; median. Each call is the first of a generation (plans made from scratch). Per
row: median seconds, speed-up, the FLOP ratio counted exactly on the full architecture's twin (:mod:`tokenmerge.cost`)
and the share of the FLOP-ideal saving realised, ``(1 - t/t0) / (1 - F/F0)``.

    python benchmarks/real_size.py --arch sd15 --rounds 3 --out docs/results/real_size_sd15.json
    python benchmarks/real_size.py --arch flux-dev --rounds 3 --out docs/results/real_size_flux.json
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from _common import print_table, write_results

import tokenmerge as tm
from tokenmerge.archs import build_dit, build_unet
from tokenmerge.cost import CostSpec, Twin
from tokenmerge.harness.timing import Schedule
from tokenmerge.patch import adapter_for, place

#: Reduced-depth builds of the transformers: one block of each kind (real width).
REDUCED = {"flux-dev": dict(num_layers=1, num_single_layers=1), "sd35-large": dict(num_layers=1)}
#: Whole-model blocks of a reduced build, merged on the reduced model: every block of every kind.
EVERY = {"flux-dev": {"double": (0, None), "single": (0, None)}, "sd35-large": {"joint": (0, None)}}


def settings(extra: list[str]) -> dict[str, tm.Method | None]:
    """name -> method (``None``: unaccelerated): every method's default, then ``--toma`` ratios in tokens mode."""
    out: dict[str, tm.Method | None] = {
        "baseline": None,
        "toma": tm.ToMA(),
        "tomesd": tm.ToMeSD(),
        "catome": tm.CAToMe(),
        "todo": tm.ToDo(),
    }
    for ratio in extra:
        out[f"toma-tokens-{ratio}"] = tm.ToMA(float(ratio), mode="tokens")
    return out


class BlockClock:
    """Forward hooks timing every block of ``kinds`` (block kind -> modules) with the wall clock, per call."""

    def __init__(self, kinds: dict[str, list[torch.nn.Module]]) -> None:
        self.seconds: Counter[str] = Counter()
        self.handles = []
        for kind, blocks in kinds.items():
            for block in blocks:
                self.handles.append(block.register_forward_pre_hook(self.enter))
                self.handles.append(block.register_forward_hook(lambda m, a, o, kind=kind: self.leave(kind)))
        self.start = 0.0

    def enter(self, module: torch.nn.Module, args: tuple) -> None:
        self.start = time.perf_counter()

    def leave(self, kind: str) -> None:
        self.seconds[kind] += time.perf_counter() - self.start

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def block_kinds(model: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
    adapter = adapter_for(model)
    kinds: dict[str, list[torch.nn.Module]] = {}
    for site in adapter.sites():
        kinds.setdefault(site.kind or site.group, []).append(site.block)
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True, choices=["sd15", "sdxl", *REDUCED])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--toma", nargs="*", default=["0.5", "0.75"], help="ToMA tokens-mode ratios to add")
    parser.add_argument("--only", nargs="+", help="run only these settings (the baseline always runs)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    spec = CostSpec.parse(args.arch)
    full_view = spec.view()
    chosen = settings(args.toma)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k == "baseline" or k in args.only}
    concrete = {k: None if m is None else m.resolve(full_view) for k, m in chosen.items()}
    reduced = args.arch in REDUCED
    model = build_dit(args.arch, **REDUCED[args.arch]) if reduced else build_unet(args.arch)
    adapter = adapter_for(model)
    shape = adapter.shape_at(spec.height, spec.width)
    inputs = adapter.example_inputs(shape, torch.Generator().manual_seed(0))
    # on a reduced build every block of the method's kinds is merged; the full model's placement scales it
    applied: dict[str, Callable[[], None]] = {}
    for name, method in concrete.items():
        run = dataclasses.replace(method, blocks=EVERY[args.arch]) if reduced and method is not None else method
        applied[name] = lambda m=run: tm.apply(model, m) if m is not None else None

    clock = BlockClock(block_kinds(model)) if reduced else None
    times: dict[str, list[float]] = {name: [] for name in concrete}
    blocks: dict[str, list[Counter[str]]] = {name: [] for name in concrete}
    names = list(concrete)
    for call in Schedule(args.rounds, 1, seed=0).calls(len(names)):
        name = names[call.config]
        applied[name]()
        tm.set_step(model, 0)
        if clock is not None:
            clock.seconds = Counter()
        start = time.perf_counter()
        with torch.no_grad():
            model(**inputs)
        seconds = time.perf_counter() - start
        tm.remove(model)
        if call.timed:
            times[name].append(seconds)
            if clock is not None:
                blocks[name].append(clock.seconds)
        print(
            f"{name:24s} {'round ' + str(call.round + 1) if call.timed else 'warm-up':10s} {seconds:8.2f} s", flush=True
        )

    twin = Twin.build(args.arch)
    full_flops = twin.call(None, spec.shape())
    medians = {}
    for name, method in concrete.items():
        if not reduced:
            medians[name] = statistics.median(times[name])
            continue
        medians[name] = statistics.median(
            _scaled(times[name][r], blocks[name][r], blocks["baseline"][r], method, twin) for r in range(args.rounds)
        )
    rows = []
    for name, method in concrete.items():
        ratio = full_flops / twin.call(method, spec.shape(), 1.0 if method and method.content_adaptive else None)
        speedup = medians["baseline"] / medians[name]
        ideal = 1 - 1 / ratio
        rows.append(
            dict(
                config=name,
                method=method.describe() if method else "-",
                median_s=round(medians[name], 3),
                times_s=[round(t, 3) for t in times[name]],
                speedup=round(speedup, 3),
                flop_ratio=round(ratio, 3),
                realised=round((1 - 1 / speedup) / ideal, 3) if ideal > 0.005 else None,
            )
        )
    print_table(rows, ["median_s", "speedup", "flop_ratio", "realised"])
    for row in rows:
        print(f"  {row['config']}: {row['method']}")
    write_results(
        args.out,
        rows,
        arch=spec.label,
        shape=dict(batch=shape.batch, latent=list(shape.latent), text=shape.text),
        reduced=REDUCED.get(args.arch),
        rounds=args.rounds,
        note="CA-ToMe's FLOP ratio is the most it can cut (every source merged); its time is measured",
    )


def _scaled(
    seconds: float, merged: Counter[str], unmerged: Counter[str], method: tm.Method | None, twin: Twin
) -> float:
    """A reduced call's time scaled to the full depth: the time outside the blocks, plus per kind the full blocks at
    the unaccelerated block time and the merged blocks at this call's block time (one block of each kind timed)."""
    outside = seconds - sum(merged.values())
    sites = twin.adapter.sites()
    counts = Counter(s.kind for s in sites)
    patched = Counter(s.kind for s in place(method, twin.adapter)) if method is not None else Counter()
    return outside + sum(
        (counts[kind] - patched[kind]) * unmerged[kind] + patched[kind] * merged[kind] for kind in counts
    )


if __name__ == "__main__":
    main()
