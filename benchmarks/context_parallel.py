"""CPU benchmark: token merging under diffusers' context parallelism, what the attention's collectives send.

A tiny Flux transformer (2 + 2 blocks, 2 heads of 16) on ``--world`` local ranks (gloo, one thread each), Ulysses,
``ulysses_anything`` and Ring (Ring on the CPU stand-in of :func:`tokenmerge.harness.parallel.cpu_stand_ins`; with
``--settings unified`` and an even ``--world`` >= 4, Ulysses 2 x Ring), every block merged. Per setting and method:
the bytes each rank's attention collectives deliver to the other ranks per denoiser call (counted at the
collectives: :class:`tokenmerge.harness.parallel.CollectiveBytes`), the other collectives' (the output gather), the
cut against the unmerged model, the relative distance of the output to the same method's single-device output, and
the median wall time of a call (indicative only: a shared 2-core CPU). What the collectives carry is proportional to
the tokens exchanged, so the cut depends on the image and text token counts (``--height``/``--width``/``--text``),
not on the model's width: ``--height 64 --width 64 --text 512`` is Flux at 1024px.

    python benchmarks/context_parallel.py --out docs/results/context_parallel.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import print_table, write_results

import tokenmerge as tm
from tokenmerge.harness.parallel import CollectiveBytes, run_ranks

ALL = {"double": (0, None), "single": (0, None)}
CONFIGS: dict[str, tm.Method | None] = {
    "none": None,
    "toma-0.5": tm.ToMA(0.5, mode="tokens", blocks=ALL),  # ToMA(0.5) as it resolves on Flux.1-dev
    "toma-0.75": tm.ToMA(0.75, mode="tokens", blocks=ALL),
    "toma-kv-0.5": tm.ToMA(0.5, mode="kv", blocks=ALL),
    "todo-2": tm.ToDo(2, blocks=ALL),
}
#: ``ContextParallelConfig`` options per setting, for ``world`` ranks (``unified``: Ulysses 2 x ring ``world / 2``).
SETTINGS: dict[str, Callable[[int], dict[str, Any]]] = {
    "ulysses": lambda world: dict(ulysses_degree=world),
    "ulysses_anything": lambda world: dict(ulysses_degree=world, ulysses_anything=True),
    "ring": lambda world: dict(ring_degree=world),
    "unified": lambda world: dict(ulysses_degree=2, ring_degree=world // 2),
}
COLUMNS = ("attention_kib", "cut", "other_kib", "median_s", "rel_vs_single")


def timed_calls(model: torch.nn.Module, inputs: dict, calls: int) -> tuple[torch.Tensor, list[float]]:
    """``calls`` denoiser calls at steps 0, 1, ... (the first untimed): the first output and the times of the rest."""
    times, first = [], None
    with torch.no_grad():
        for step in range(calls + 1):
            tm.set_step(model, step)
            start = time.perf_counter()
            out = model(**inputs, return_dict=False)[0]
            times.append(time.perf_counter() - start)
            first = out if first is None else first
    return first, times[1:]


def rank_rows(rank: int, world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One rank's rows: every setting and configuration (the parallel runs need every rank)."""
    from diffusers import ContextParallelConfig

    from tokenmerge.archs import build_dit
    from tokenmerge.harness.models import denoiser_inputs

    model = build_dit("tiny-flux")
    inputs = denoiser_inputs(model, args.batch, args.height, args.width, text=args.text)
    single: dict[str, tuple[torch.Tensor, float]] = {}
    for name, method in CONFIGS.items():
        if method is not None:
            tm.apply(model, method)
        out, times = timed_calls(model, inputs, args.rounds)
        single[name] = (out, statistics.median(times))
        tm.remove(model)
    rows = [dict(config=f"single-device {n}", median_s=round(t, 4)) for n, (_, t) in single.items()]
    for setting in args.settings:
        model = build_dit("tiny-flux")
        model.enable_parallelism(config=ContextParallelConfig(**SETTINGS[setting](world)))
        for name, method in CONFIGS.items():
            if method is not None:
                tm.apply(model, method)
            with CollectiveBytes() as sent, torch.no_grad():
                tm.set_step(model, 0)
                model(**inputs, return_dict=False)
            out, times = timed_calls(model, inputs, args.rounds)
            tm.remove(model)
            reference = single[name][0]
            rows.append(
                dict(
                    config=f"{setting} {name}",
                    attention_bytes=sent.attention,
                    attention_kib=sent.attention / 1024,
                    other_kib=sent.other / 1024,
                    median_s=round(statistics.median(times), 4),
                    rel_vs_single=float((out - reference).norm() / reference.norm()),
                )
            )
        base = next(r for r in rows if r["config"] == f"{setting} none")["attention_bytes"]
        for row in rows:
            if row["config"].startswith(f"{setting} "):
                row["cut"] = round(1 - row["attention_bytes"] / base, 4)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="ranks (local processes)")
    parser.add_argument("--height", type=int, default=32, help="packed latent grid height (tokens)")
    parser.add_argument("--width", type=int, default=32, help="packed latent grid width (tokens)")
    parser.add_argument("--text", type=int, default=16, help="text tokens")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per configuration (after one untimed)")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["ulysses", "ulysses_anything", "ring"],
        choices=list(SETTINGS),
        help="context-parallel settings (unified: Ulysses 2 x ring world/2, needs an even world >= 4)",
    )
    parser.add_argument("--out", type=Path, default=Path("context_parallel.json"))
    args = parser.parse_args()
    if min(args.world, args.height, args.width, args.text, args.batch, args.rounds) < 1 or args.world < 2:
        parser.error("--world must be >= 2 and the sizes, --batch and --rounds >= 1")
    if "unified" in args.settings and (args.world < 4 or args.world % 2):
        parser.error("--settings unified needs an even --world of at least 4")
    ranks = run_ranks(rank_rows, args.world, args)
    rows = ranks[0]
    for row, *others in zip(*ranks, strict=True):  # equal bands send equal bytes: say so where they do not
        if any(other.get("attention_bytes") != row.get("attention_bytes") for other in others):
            row["attention_bytes_per_rank"] = [r.get("attention_bytes") for r in (row, *others)]
    print_table(rows, COLUMNS)
    meta = dict(
        command=" ".join(["python", *sys.argv]),
        arch="tiny-flux",
        world=args.world,
        grid=[args.height, args.width],
        text=args.text,
        batch=args.batch,
        threads_per_rank=1,
    )
    write_results(args.out, rows, **meta)


if __name__ == "__main__":
    main()
