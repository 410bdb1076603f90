"""What the CPU benchmark scripts share: summary rows, the printed table and the JSON file."""

from __future__ import annotations

import json
import platform
import statistics
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

import torch


def summarise(
    times: dict[str, list[float]],
    outputs: dict[str, torch.Tensor],
    flops: dict[str, int] | None = None,
    reference: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One row per configuration: median seconds, speedup against its reference configuration (``reference[name]``,
    default ``baseline``), relative L2 deviation of the output from ``baseline``'s and, where ``flops`` has the
    configuration and its reference, the FLOP ratio and the share of the FLOP-ideal saving realised
    ``(1 - 1/speedup) / (1 - 1/flop_ratio)``."""
    base_out = outputs["baseline"]
    rows = []
    for name, runs in times.items():
        ref = (reference or {}).get(name, "baseline")
        t, ref_t = statistics.median(runs), statistics.median(times[ref])
        row: dict[str, Any] = dict(config=name, median_s=round(t, 4), times_s=[round(x, 4) for x in runs])
        row["speedup"] = round(ref_t / t, 3)
        if flops is not None and name in flops and ref in flops:
            ratio = flops[ref] / flops[name]
            ideal = 1 - 1 / ratio
            row["tflop"] = round(flops[name] / 1e12, 3)
            row["flop_ratio"] = round(ratio, 3)
            row["realised"] = round((1 - t / ref_t) / ideal, 3) if ideal > 0 else None
        row["rel_l2_deviation"] = round(((outputs[name] - base_out).norm() / base_out.norm()).item(), 4)
        rows.append(row)
    return rows


#: Columns :func:`print_table` shows by default (those present in the first row), and those shown as percentages.
COLUMNS = ("median_s", "tflop", "speedup", "flop_ratio", "realised", "rel_l2_deviation")
PERCENT = frozenset({"realised", "overhead_share"})


def print_table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """The rows as an aligned text table: ``columns`` (default: those of :data:`COLUMNS` in the first row); missing
    or ``None`` values as ``-``, :data:`PERCENT` columns as percentages."""
    columns = [c for c in COLUMNS if c in rows[0]] if columns is None else list(columns)
    width = max(len(r["config"]) for r in rows) + 2
    print(f"{'config':{width}s}" + "".join(f"{c:>18s}" for c in columns))
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            cells.append("-" if value is None else f"{value:.0%}" if c in PERCENT else f"{value:.4g}")
        print(f"{row['config']:{width}s}" + "".join(f"{cell:>18s}" for cell in cells))


def write_results(path: Path, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None, **meta: Any) -> None:
    """``{"meta": ..., "results": rows, **extra}`` with the machine, torch version, threads and date added to
    ``meta``."""
    meta.update(
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.processor() or platform.machine(),
        date=date.today().isoformat(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(meta=meta, results=rows, **(extra or {})), indent=2) + "\n")
    print(f"wrote {path}")
