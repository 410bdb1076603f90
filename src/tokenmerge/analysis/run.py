"""Run a pipeline under observation (``analyze``), derive schedules (``derive``) and write the report folder."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tokenmerge.analysis.observe import Observe, Recorder, summarize
from tokenmerge.analysis.schedules import catome_schedule, drift_bound, step_curve, toma_intervals
from tokenmerge.methods.catome import CAToMe
from tokenmerge.patch import adapter_for, apply, find_denoiser, remove

#: ToMA's default ``weight_every``, the reference the derived one is compared with (``dest_every``: the observer's
#: ``reference_dest_every``, ToMA's default 5).
TOMA_REFERENCE_WEIGHT_EVERY = 1


def observer_for(obj: Any, observe: Observe | None = None) -> Observe:
    """``observe`` (default ``Observe()``) set up to see every block of ``obj``'s denoiser: every level, every block
    kind, ``layout`` filled in call order, and a fresh recorder."""
    adapter = adapter_for(find_denoiser(obj))
    blocks = {kind: ((0, None),) for kind in adapter.default_blocks} or None
    sites = adapter.select(adapter.sites(), blocks)
    layout = tuple((s.name, s.group, s.downsample) for s in sites)
    return dataclasses.replace(
        observe or Observe(), layout=layout, blocks=blocks, max_downsample=1 << 20, recorder=Recorder()
    )


def analyze(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int] = (0,),
    steps: int = 20,
    observe: Observe | None = None,
    progress: bool = False,
    **call_kwargs: Any,
) -> dict[str, Any]:
    """Generate every (prompt, seed) once with the stock pipeline call under an :class:`Observe` (nothing merged)
    and return :func:`summarize`'s statistics, with the runs listed under ``runs_info``.

    ``call_kwargs`` go to the pipeline call (``height``, ``width``, ``guidance_scale``, ...); latents are returned
    by the pipeline (``output_type="latent"``), so the VAE does not run. The pipeline is left unpatched.
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
            generator = torch.Generator().manual_seed(seed)
            with torch.inference_mode():
                pipe(prompt, num_inference_steps=steps, generator=generator, output_type="latent", **call_kwargs)
    finally:
        remove(pipe)
    stats = summarize(observer)
    stats["runs_info"] = [dict(prompt=p, seed=s) for p, s in items]
    return stats


def derive(stats: dict[str, Any], tolerance: float = 0.2) -> dict[str, Any]:
    """Schedules for ``tolerance`` and how they and the reference schedules drift on the observed run.

    ``catome``: :func:`catome_schedule` on the finest level (CA-ToMe's placement); ``toma``: :func:`toma_intervals`
    on downsample <= 4 (ToMA's). ``bound_*``: the summed adjacent distances since the last recomputation
    (:func:`drift_bound`); ``measured_*``: the drift of the reference schedule measured by the observer against its
    last recomputation (mean and max over steps of the per-step block means).
    """
    n = stats["num_steps"]
    config = stats["config"]
    pairs, pairs_ref = step_curve(stats, "pairs_adj"), step_curve(stats, "pairs_ref")
    schedule = catome_schedule(stats, tolerance)
    reference = CAToMe(schedule=config["reference_schedule"])
    ref_points = sorted(reference.checkpoints(n) or range(0, n, reference.schedule))
    catome = dict(
        schedule=schedule,
        downsample=min(b["downsample"] for b in stats["blocks"]),
        bound_max=max(drift_bound(pairs, schedule)),
        reference=dict(
            name=config["reference_schedule"],
            schedule=ref_points,
            bound_max=max(drift_bound(pairs, ref_points)),
            measured_mean=sum(pairs_ref) / n,
            measured_max=max(pairs_ref),
        ),
    )
    intervals = toma_intervals(stats, tolerance)
    dest, weight, dest_ref = (step_curve(stats, m, 4) for m in ("dest_adj", "weight_adj", "dest_ref"))
    ref_every = config["reference_dest_every"]
    toma = dict(
        **intervals,
        dest_bound_max=max(drift_bound(dest, range(0, n, intervals["dest_every"]))),
        weight_bound_max=max(drift_bound(weight, range(0, n, intervals["weight_every"]))),
        reference=dict(
            dest_every=ref_every,
            weight_every=TOMA_REFERENCE_WEIGHT_EVERY,
            dest_bound_max=max(drift_bound(dest, range(0, n, ref_every))),
            dest_measured_mean=sum(dest_ref) / n,
            dest_measured_max=max(dest_ref),
        ),
    )
    return dict(tolerance=tolerance, catome=catome, toma=toma)


#: Figures of a report: file name -> (kind, argument) for :mod:`tokenmerge.analysis.plots`.
STABILITY_FIGURES = ("pairs_adj", "pairs_top_adj", "dest_adj", "weight_adj", "pairs_level", "dest_level")


def write_report(stats: dict[str, Any], derived: dict[str, Any], out: Path, meta: dict[str, Any]) -> list[str]:
    """Write ``stats.json`` (``meta``, the statistics and the derived schedules), the figures and ``summary.md``
    into the folder ``out``; returns the file names written."""
    from tokenmerge.analysis import plots
    from tokenmerge.harness.report import write_json

    write_json(out / "stats.json", dict(meta=meta, schedules=derived, **stats))
    written = ["stats.json"]
    for kind in ("cell", "tile"):
        if any(k.startswith(f"{kind}_share") for k in stats["metrics"]):
            plots.histogram_figure(stats, kind, out / f"hist_{kind}.png")
            plots.shares_figure(stats, kind, out / f"shares_{kind}.png")
            written += [f"hist_{kind}.png", f"shares_{kind}.png"]
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
    ref, tref = catome["reference"], toma["reference"]
    config = stats["config"]
    catome_options = f"threshold={config['pair_threshold']},max_downsample={catome['downsample']}"
    toma_options = f"ratio={config['ratio']},tile=({config['tile'][0]},{config['tile'][1]})"
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
        "Drift bound: summed adjacent-step distances since the last recomputation (Jaccard distance is a metric, "
        "so this bounds the distance to the recomputed sets); measured: the observer's distance to the reference's "
        "last recomputation. Mean over steps of the per-step block mean; max over steps.",
        "",
        "| schedule | recomputations | drift bound (max) | measured drift (mean / max) |",
        "| --- | --- | --- | --- |",
        f"| CA-ToMe derived `schedule={catome['schedule']}` | {len(catome['schedule'])} | "
        f"{catome['bound_max']:.3f} | - |",
        f"| CA-ToMe reference `{ref['name']}` = {ref['schedule']} | {len(ref['schedule'])} | {ref['bound_max']:.3f} | "
        f"{ref['measured_mean']:.3f} / {ref['measured_max']:.3f} |",
        f"| ToMA derived `dest_every={toma['dest_every']}, weight_every={toma['weight_every']}` | "
        f"{-(-stats['num_steps'] // toma['dest_every'])} (destinations) | {toma['dest_bound_max']:.3f} | - |",
        f"| ToMA reference `dest_every={tref['dest_every']}` | {-(-stats['num_steps'] // tref['dest_every'])} "
        f"(destinations) | {tref['dest_bound_max']:.3f} | {tref['dest_measured_mean']:.3f} / "
        f"{tref['dest_measured_max']:.3f} |",
        "",
        f"CA-ToMe blocks: downsample {catome['downsample']}; ToMA: downsample <= 4. The schedule is for "
        f"{stats['num_steps']} steps (0-based, used as given by `tm.CAToMe`). Use them as",
        "",
        "```python",
        f"tm.CAToMe({catome_options.replace(',', ', ')}, schedule={catome['schedule']})",
        f"tm.ToMA({toma_options.replace(',', ', ')}, dest_every={toma['dest_every']}, "
        f"weight_every={toma['weight_every']})",
        "```",
        "",
        "and compare speed and deviation from the unaccelerated output with `tokenmerge eval --model ... --steps "
        f'{stats["num_steps"]} --method "catome:{catome_options},schedule={ref["name"]}" '
        f'--method "catome:{catome_options},schedule={catome["schedule"]}" '
        f'--method "toma:{toma_options}" --method "toma:{toma_options},'
        f'dest_every={toma["dest_every"]},weight_every={toma["weight_every"]}"`.',
        "",
        "Figures: " + ", ".join(f"[{f}]({f})" for f in files if f.endswith(".png")),
        "",
    ]
    return "\n".join(lines)
