"""Figures of :func:`tokenmerge.analysis.summarize` statistics (matplotlib, Agg backend)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from tokenmerge.analysis.observe import STABILITY

TITLES = {"cell": "2x2-cell best-match similarity", "tile": "tile-local best-match similarity"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def levels(stats: dict[str, Any]) -> dict[str, list[int]]:
    """Level (reuse group) -> indices of its blocks, in call order."""
    out: dict[str, list[int]] = {}
    for i, block in enumerate(stats["blocks"]):
        out.setdefault(block["group"], []).append(i)
    return out


def selected_steps(num_steps: int, count: int = 5) -> list[int]:
    """Up to ``count`` steps spread evenly from the first to the last."""
    count = min(count, num_steps)
    return sorted({round(i * (num_steps - 1) / max(count - 1, 1)) for i in range(count)})


def _step_axis(ax: Any, axis: str = "x", label: str = "step") -> None:
    from matplotlib.ticker import MaxNLocator

    getattr(ax, f"{axis}axis").set_major_locator(MaxNLocator(integer=True))
    getattr(ax, f"set_{axis}label")(label, fontsize=8)


def _axes(plt: Any, panels: int, title: str) -> tuple[Any, list[Any]]:
    cols = min(panels, 4)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), dpi=110, squeeze=False)
    flat = list(axes.flat)
    for ax in flat[panels:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    return fig, flat[:panels]


def histogram_figure(stats: dict[str, Any], kind: str, path: Path) -> None:
    """Per level, the distribution (share of tokens per bin, summed over the level's blocks and all runs) of the
    ``kind`` (``cell``/``tile``) best-match similarity at a few steps."""
    plt = _pyplot()
    edges = np.asarray(stats["bin_edges"])
    centers = (edges[:-1] + edges[1:]) / 2
    groups = levels(stats)
    steps = selected_steps(stats["num_steps"])
    fig, axes = _axes(plt, len(groups), f"{TITLES[kind]} per step (share of tokens per bin)")
    occupied = np.nonzero(np.asarray(stats["histograms"][kind], dtype=float).sum((0, 1)))[0]
    span = (edges[occupied[0]], edges[occupied[-1] + 1]) if occupied.size else (-1.0, 1.0)
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(steps)))
    for ax, (group, members) in zip(axes, groups.items(), strict=True):
        counts = np.asarray(stats["histograms"][kind], dtype=float)[members].sum(0)  # (steps, bins)
        for color, t in zip(colors, steps, strict=True):
            total = counts[t].sum()
            if total > 0:
                ax.plot(centers, counts[t] / total, color=color, label=f"step {t}")
        ax.set_title(group, fontsize=9)
        ax.set_xlim(*span)
        ax.set_xlabel("cosine similarity", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def stability_figure(stats: dict[str, Any], metric: str, path: Path) -> None:
    """Per level, ``metric`` against the step for every block (layer): the mean over runs, shaded min to max."""
    plt = _pyplot()
    data = stats["metrics"][metric]
    groups = levels(stats)
    fig, axes = _axes(plt, len(groups), STABILITY[metric] + f" (mean, min-max over {stats['runs']} runs)")
    steps = np.arange(stats["num_steps"])
    for ax, (group, members) in zip(axes, groups.items(), strict=True):
        for i in members:
            mean, low, high = (np.asarray(data[k][i], dtype=float) for k in ("mean", "min", "max"))
            label = stats["blocks"][i]["name"].replace(".transformer_blocks.", ".")
            (line,) = ax.plot(steps, mean, marker=".", markersize=3, label=label)
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(group, fontsize=9)
        _step_axis(ax)
        ax.set_ylim(-0.02, 1.02 if metric != "weight_adj" else None)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(members) <= 6:
            ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def shares_figure(stats: dict[str, Any], kind: str, path: Path) -> None:
    """Per level, the share of tokens whose ``kind`` best match is at or above each threshold, against the step:
    the mean over the level's blocks of the mean over runs, shaded between the block means of the run minima and
    maxima."""
    plt = _pyplot()
    groups = levels(stats)
    fig, axes = _axes(plt, len(groups), f"share of tokens with {TITLES[kind]} >= threshold")
    steps = np.arange(stats["num_steps"])
    for ax, (group, members) in zip(axes, groups.items(), strict=True):
        for t in stats["config"]["thresholds"]:
            data = stats["metrics"].get(f"{kind}_share>={t:g}")
            if data is None:
                continue
            with warnings.catch_warnings():  # levels without a value (grids too small) stay empty
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, low, high = (
                    np.nanmean(np.asarray(data[k], dtype=float)[members], 0) for k in ("mean", "min", "max")
                )
            (line,) = ax.plot(steps, mean, label=f">= {t:g}")
            ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(group, fontsize=9)
        _step_axis(ax)
        ax.set_ylim(-0.02, 1.02)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def drift_figure(stats: dict[str, Any], kind: str, path: Path) -> None:
    """Per level, the drift matrix of ``kind`` (``pairs``/``dest``): mean over the level's blocks and runs of the
    Jaccard distance of the sets at step ``t`` (columns) from those at step ``s`` (rows), ``s < t``."""
    plt = _pyplot()
    groups = levels(stats)
    what = "CA-ToMe pairs" if kind == "pairs" else "ToMA destinations"
    fig, axes = _axes(plt, len(groups), f"{what}: Jaccard distance of step t's sets from step s's (mean)")
    for ax, (group, members) in zip(axes, groups.items(), strict=True):
        with warnings.catch_warnings():  # undefined cells (s >= t) stay empty
            warnings.simplefilter("ignore", RuntimeWarning)
            matrix = np.nanmean(np.asarray(stats["drift"][kind]["mean"], dtype=float)[members], 0)
        image = ax.imshow(matrix, vmin=0, vmax=1, cmap="magma", origin="upper")
        ax.set_title(group, fontsize=9)
        _step_axis(ax, "x", "step t")
        _step_axis(ax, "y", "step s")
        ax.tick_params(labelsize=7)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
