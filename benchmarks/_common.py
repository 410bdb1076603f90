"""What the CPU benchmark scripts share: summary rows, the printed table and the JSON file."""

from __future__ import annotations

import json
import platform
import statistics
from datetime import date
from pathlib import Path
from typing import Any

import torch


def summarise(
    times: dict[str, list[float]], outputs: dict[str, torch.Tensor], flops: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """One row per configuration against ``baseline``: median seconds, speedup, relative L2 deviation of the output
    and, with ``flops``, the FLOP ratio and the share of the FLOP-ideal saving realised
    ``(1 - 1/speedup) / (1 - 1/flop_ratio)``."""
    base_t, base_out = statistics.median(times["baseline"]), outputs["baseline"]
    rows = []
    for name, runs in times.items():
        t = statistics.median(runs)
        row: dict[str, Any] = dict(config=name, median_s=round(t, 4), times_s=[round(x, 4) for x in runs])
        row["speedup"] = round(base_t / t, 3)
        if flops is not None:
            ratio = flops["baseline"] / flops[name]
            ideal = 1 - 1 / ratio
            row["tflop"] = round(flops[name] / 1e12, 3)
            row["flop_ratio"] = round(ratio, 3)
            row["realised"] = round((1 - t / base_t) / ideal, 3) if ideal > 0 else None
        row["rel_l2_deviation"] = round(((outputs[name] - base_out).norm() / base_out.norm()).item(), 4)
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """The rows as an aligned text table (``realised`` as a percentage)."""
    columns = [
        c for c in ("median_s", "tflop", "speedup", "flop_ratio", "realised", "rel_l2_deviation") if c in rows[0]
    ]
    width = max(len(r["config"]) for r in rows) + 2
    print(f"{'config':{width}s}" + "".join(f"{c:>18s}" for c in columns))
    for row in rows:
        cells = []
        for c in columns:
            value = row[c]
            cells.append("-" if value is None else f"{value:.0%}" if c == "realised" else f"{value:.4g}")
        print(f"{row['config']:{width}s}" + "".join(f"{cell:>18s}" for cell in cells))


def write_results(path: Path, rows: list[dict[str, Any]], **meta: Any) -> None:
    """``{"meta": ..., "results": rows}`` with the machine, torch version, threads and date added to ``meta``."""
    meta.update(
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.processor() or platform.machine(),
        date=date.today().isoformat(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(meta=meta, results=rows), indent=2) + "\n")
    print(f"wrote {path}")
