"""Run a pipeline under observation (``analyze``), derive schedules (``derive``) and write the report folder."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tokenmerge.analysis.observe import Observe, Recorder, summarize
from tokenmerge.analysis.schedules import (
    bound_matrix,
    catome_schedule,
    drift_matrix,
    every,
    schedule_drift,
    selected_blocks,
    toma_intervals,
)
from tokenmerge.api import apply, remove
from tokenmerge.methods.catome import CAToMe
from tokenmerge.methods.toma import ToMA
from tokenmerge.patch import adapter_for, find_denoiser


def observer_for(obj: Any, observe: Observe | None = None) -> Observe:
    """``observe`` (default ``Observe()``) set up to see every block of ``obj``'s denoiser: every level, every block
    kind, ``layout`` filled in call order, and a fresh recorder."""
    adapter = adapter_for(find_denoiser(obj))
    blocks = {kind: ((0, None),) for kind in adapter.default_blocks()} or None
    sites = adapter.select(adapter.sites(), blocks)
    layout = tuple((s.name, s.group, s.downsample) for s in sites)
    return dataclasses.replace(
        observe or Observe(), layout=layout, blocks=blocks, max_downsample=1 << 20, recorder=Recorder()
    )


def diffusers_call(pipe: Any, prompt: str, seed: int, steps: int, **kwargs: Any) -> Any:
    """One generation by the stock diffusers pipeline call: a CPU generator seeded with ``seed``, latents out (the VAE
    does not run); ``kwargs`` (``height``, ``width``, ``guidance_scale``, ...) go to the call."""
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, generator=generator, output_type="latent", **kwargs)


def reference_call(pipe: Any, prompt: str, seed: int, steps: int, guidance_scale: float = 3.0) -> Any:
    """One generation by a :class:`tokenmerge.reference.pipeline.ReferencePipeline`, whose call takes lists of
    captions and seeds (the noise of ``seed``) and returns images."""
    return pipe([prompt], [seed], steps, guidance_scale)


def analyze(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int] = (0,),
    steps: int = 20,
    observe: Observe | None = None,
    progress: bool = False,
    call: Callable[..., Any] = diffusers_call,
    **call_kwargs: Any,
) -> dict[str, Any]:
    """Generate every (prompt, seed) once under an :class:`Observe` (nothing merged) and return :func:`summarize`'s
    statistics, with the runs listed under ``runs_info``.

    Each generation is ``call(pipe, prompt, seed, steps, **call_kwargs)`` in inference mode (default
    :func:`diffusers_call`; pass another for pipelines with a different call). The pipeline is left unpatched (a
    method applied before is removed).
    """
    from tqdm.auto import tqdm

    items = [(p, s) for p in prompts for s in seeds]
    if not items:
        raise ValueError("analyze needs at least one prompt and one seed")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    observer = observer_for(pipe, observe)
    apply(pipe, observer)
    try:
        for prompt, seed in tqdm(items, desc="analyze", disable=not progress):
            with torch.inference_mode():
                call(pipe, prompt, seed, steps, **call_kwargs)
    finally:
        remove(pipe)
    stats = summarize(observer)
    stats["runs_info"] = [dict(prompt=p, seed=s) for p, s in items]
    return stats


def derive(
    stats: dict[str, Any], tolerance: float = 0.2, reference_schedule: str | int | list[int] = "config3"
) -> dict[str, Any]:
    """Schedules for ``tolerance`` and the drift that they and the references allow on the observed runs.

    ``catome``: :func:`catome_schedule` on the finest level (CA-ToMe's placement), against ``reference_schedule``
    (as ``tm.CAToMe`` reads it); ``toma``: :func:`toma_intervals` on downsample <= 4 (ToMA's placement), against
    ToMA's defaults. ``drift``: mean and max over steps of :func:`schedule_drift` (for ToMA's merge matrix, the
    bound of :func:`bound_matrix`).
    """
    n = stats["num_steps"]
    pairs = drift_matrix(stats, "pairs")
    schedule = catome_schedule(stats, tolerance)
    reference = CAToMe(schedule=reference_schedule)
    ref_points = sorted(reference.checkpoints(n) or every(reference.schedule, n))
    catome = dict(
        schedule=schedule,
        downsample=min(stats["blocks"][i]["downsample"] for i in selected_blocks(stats)),
        drift=_over_steps(schedule_drift(pairs, schedule)),
        reference=dict(
            name=reference_schedule, schedule=ref_points, drift=_over_steps(schedule_drift(pairs, ref_points))
        ),
    )
    intervals = toma_intervals(stats, tolerance)
    dest, weight = drift_matrix(stats, "dest", 4), bound_matrix(stats, "weight_adj", 4)
    default = ToMA()

    def toma_drift(dest_every: int, weight_every: int) -> dict[str, Any]:
        return dict(
            dest_every=dest_every,
            weight_every=weight_every,
            dest_drift=_over_steps(schedule_drift(dest, every(dest_every, n))),
            weight_bound=_over_steps(schedule_drift(weight, every(weight_every, n))),
        )

    toma = dict(
        **toma_drift(intervals["dest_every"], intervals["weight_every"]),
        reference=toma_drift(default.dest_every, default.weight_every),
    )
    return dict(tolerance=tolerance, catome=catome, toma=toma)


def _over_steps(curve: list[float]) -> dict[str, float]:
    return dict(mean=sum(curve) / len(curve), max=max(curve))


#: Stability metrics drawn as curves per block (``stability_<metric>.png``).
STABILITY_FIGURES = ("pairs_adj", "pairs_top_adj", "dest_adj", "weight_adj", "pairs_level", "dest_level")


def write_report(stats: dict[str, Any], derived: dict[str, Any], out: Path, meta: dict[str, Any]) -> list[str]:
    """Write ``stats.json`` (``meta``, the statistics and the derived schedules), the figures and ``summary.md``
    into the folder ``out``; returns the file names written. ``meta["demo"]`` (a reference model) and
    ``meta["blocks"]`` (a placement) adapt the summary's comparison command and ``tm.`` calls."""
    from tokenmerge.analysis import plots
    from tokenmerge.harness.report import write_json

    write_json(out / "stats.json", dict(meta=meta, schedules=derived, **stats))
    written = ["stats.json"]
    for kind in ("cell", "tile"):
        if any(k.startswith(f"{kind}_share") for k in stats["metrics"]):
            plots.histogram_figure(stats, kind, out / f"hist_{kind}.png")
            plots.shares_figure(stats, kind, out / f"shares_{kind}.png")
            written += [f"hist_{kind}.png", f"shares_{kind}.png"]
    for kind in ("pairs", "dest"):
        plots.drift_figure(stats, kind, out / f"drift_{kind}.png")
        written.append(f"drift_{kind}.png")
    for metric in STABILITY_FIGURES:
        if metric in stats["metrics"]:
            plots.stability_figure(stats, metric, out / f"stability_{metric}.png")
            written.append(f"stability_{metric}.png")
    (out / "summary.md").write_text(summary_markdown(stats, derived, meta, written))
    return [*written, "summary.md"]


def level_table(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per level: its blocks, grid, and every metric averaged over its blocks, steps and runs."""
    from tokenmerge.analysis.plots import levels

    rows = []
    for group, members in levels(stats).items():
        row: dict[str, Any] = dict(
            level=group, blocks=len(members), grid="x".join(map(str, stats["blocks"][members[0]]["grid"]))
        )
        for metric, data in stats["metrics"].items():
            values = [v for i in members for v in data["mean"][i] if v is not None]
            row[metric] = sum(values) / len(values) if values else None
        rows.append(row)
    return rows


def summary_markdown(stats: dict[str, Any], derived: dict[str, Any], meta: dict[str, Any], files: list[str]) -> str:
    """The short human-readable report: per-level table, derived schedules next to the references, how to use them."""
    from tokenmerge.harness.report import markdown_table

    rows = level_table(stats)
    columns = ["level", "blocks", "grid"]
    for kind in ("cell", "tile"):
        columns += [f"{kind}_mean", *(k for k in stats["metrics"] if k.startswith(f"{kind}_share>="))]
    columns = [c for c in (*columns, *STABILITY_FIGURES) if c in rows[0]]
    catome, toma, tol = derived["catome"], derived["toma"], derived["tolerance"]
    ref, tref, n = catome["reference"], toma["reference"], stats["num_steps"]
    config = stats["config"]
    catome_options = f"threshold={config['pair_threshold']},max_downsample={catome['downsample']}"
    toma_options = f"ratio={config['ratio']},tile=({config['tile'][0]},{config['tile'][1]})"
    placement = f", blocks={meta['blocks']}" if meta.get("blocks") else ""
    compare = f"tokenmerge demo --model {meta['demo']}" if meta.get("demo") else "tokenmerge eval --model ..."
    lines = [
        f"# tokenmerge analyze: {meta.get('model', '')}",
        "",
        f"{stats['runs']} runs (prompts x seeds), {stats['num_steps']} steps, {len(stats['blocks'])} blocks observed; "
        f"pair threshold {config['pair_threshold']}, ToMA ratio {config['ratio']} in {config['tile'][0]}x"
        f"{config['tile'][1]} tiles. Averages over each level's blocks, steps and runs "
        "(`*_adj`: Jaccard distance to the previous step, `weight_adj`: relative Frobenius change, `*_level`: "
        "distance to the level's first block at the same step):",
        "",
        markdown_table(rows, columns),
        f"## Schedules for tolerance {tol}",
        "",
        "Drift: the Jaccard distance of the sets in use (pairs, destinations) from those the model would compute at "
        "that step, measured on these runs; for ToMA's merge matrix, the summed relative changes since the last "
        "recomputation (a bound). Mean over steps of the block mean, and the worst step.",
        "",
        "| schedule | recomputations | drift (mean / max) |",
        "| --- | --- | --- |",
        f"| CA-ToMe derived `schedule={catome['schedule']}` | {len(catome['schedule'])} | {_pair(catome['drift'])} |",
        f"| CA-ToMe reference `{ref['name']}` = {ref['schedule']} | {len(ref['schedule'])} | {_pair(ref['drift'])} |",
        *(
            f"| ToMA {label} `dest_every={t['dest_every']}, weight_every={t['weight_every']}` | "
            f"{len(every(t['dest_every'], n))} / {len(every(t['weight_every'], n))} (destinations / weights) | "
            f"{_pair(t['dest_drift'])} (destinations), {_pair(t['weight_bound'])} (weights, bound) |"
            for label, t in (("derived", toma), ("default", tref))
        ),
        "",
        f"CA-ToMe blocks: downsample {catome['downsample']}; ToMA: downsample <= 4. The schedule is for "
        f"{stats['num_steps']} steps (0-based, used as given by `tm.CAToMe`). Use them as",
        "",
        "```python",
        f"tm.CAToMe({catome_options.replace(',', ', ')}, schedule={catome['schedule']}{placement})",
        f"tm.ToMA({toma_options.replace(',', ', ')}, dest_every={toma['dest_every']}, "
        f"weight_every={toma['weight_every']}{placement})",
        "```",
        "",
        f"and compare speed and deviation from the unaccelerated output with `{compare} --steps "
        f'{stats["num_steps"]} --method "catome:{catome_options},schedule={ref["name"]}" '
        f'--method "catome:{catome_options},schedule={catome["schedule"]}" '
        f'--method "toma:{toma_options}" --method "toma:{toma_options},'
        f'dest_every={toma["dest_every"]},weight_every={toma["weight_every"]}"`.',
        "",
        "Figures: " + ", ".join(f"[{f}]({f})" for f in files if f.endswith(".png")),
        "",
    ]
    return "\n".join(lines)


def _pair(drift: dict[str, float]) -> str:
    return f"{drift['mean']:.3f} / {drift['max']:.3f}"
