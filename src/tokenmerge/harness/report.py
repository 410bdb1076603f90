"""Writers: JSON / CSV / Markdown tables, image grids, the speed-vs-quality Pareto plot, and atomic output folders."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from tokenmerge.errors import HarnessError


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub Markdown table of ``columns`` of ``rows``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    """Strict JSON has no infinity and no NaN: write them as the strings ``"inf"``, ``"-inf"`` and ``"nan"``."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_jsonable(data), indent=2, allow_nan=False) + "\n")


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _jsonable(row.get(c)) for c in columns})


def image_grid(rows: Sequence[Sequence[Image.Image]], pad: int = 2) -> Image.Image:
    """Images laid out row by row (all of one size), with ``pad`` white pixels between them."""
    w, h = rows[0][0].size
    ncols = max(len(r) for r in rows)
    grid = Image.new("RGB", (ncols * w + (ncols - 1) * pad, len(rows) * h + (len(rows) - 1) * pad), "white")
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            grid.paste(img.convert("RGB"), (j * (w + pad), i * (h + pad)))
    return grid


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when both coordinates are better larger, by increasing x."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


def pareto_plot(
    path: Path, labels: Sequence[str], speed: Sequence[float], quality: Sequence[float], ylabel: str
) -> None:
    """Scatter of speed-up vs a higher-is-better quality score, the Pareto front joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    ax.scatter(speed, quality, color="tab:blue")
    for x, y, label in zip(speed, quality, labels, strict=True):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front(list(zip(speed, quality, strict=True)))
    ax.plot([speed[i] for i in front], [quality[i] for i in front], color="tab:orange", label="Pareto front")
    ax.set_xlabel("speed-up vs unaccelerated (x)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def partial_dir(out: Path) -> Path:
    """The hidden sibling folder a run writes into before it is renamed to ``out``."""
    return out.parent / f".{out.name}.partial"


def check_output(out: Path, overwrite: bool) -> None:
    """Fail, before any work, when the output ``out`` (a folder or a file) could not be written at the end: it exists
    (and not ``overwrite``), or :func:`check_writable` fails."""
    if out.exists() and not overwrite:
        raise HarnessError(f"output {out} already exists (pass --overwrite to replace it)")
    check_writable(out)


def check_writable(out: Path) -> None:
    """Fail, before any work, when ``out`` could not be created or replaced: the nearest folder above it that exists
    is a file or takes no new entries (a probe folder is created and deleted there)."""
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise HarnessError(f"cannot write output {out}: {parent} is a file, not a folder")
    try:
        tempfile.TemporaryDirectory(prefix=f".{out.name}.probe", dir=parent).cleanup()
    except OSError as exc:
        raise HarnessError(f"cannot write output {out}: {exc.strerror or exc} in {parent}") from exc


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool, cleanup: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out``; rename it to ``out`` when the block succeeds, delete it when
    it fails (a failed run leaves no report behind). Writing errors (``OSError``) in the block are reported as a
    :class:`HarnessError` naming ``out``."""
    check_output(out, overwrite)
    tmp = partial_dir(out)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
    except BaseException as exc:
        if cleanup:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise HarnessError(f"cannot write output {out}: {exc}") from exc
        raise
    finalize(tmp, out, overwrite)


def finalize(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished folder ``tmp`` to ``out`` (replacing it when ``overwrite``)."""
    check_output(out, overwrite)
    try:
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    except OSError as exc:
        raise HarnessError(f"cannot move the finished output {tmp} to {out}: {exc}") from exc
