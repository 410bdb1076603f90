"""Redundancy analysis: observation leaves the output unchanged, statistics and schedules on constructed inputs with
known answers, the Python API on a tiny pipeline, ``tokenmerge analyze`` end to end (tiny and reference models) and on
bad input, and what the trained reference UNet shows that a random one does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tokenmerge as tm
from tokenmerge.analysis import (
    Observe,
    analyze,
    catome_schedule,
    derive,
    observer_for,
    reference_call,
    summarize,
    toma_intervals,
)
from tokenmerge.analysis import stats as st
from tokenmerge.archs import tiny_pipeline
from tokenmerge.cli import main
from tokenmerge.methods.base import Generation
from tokenmerge.reference import PROMPTS, models
from tokenmerge.reference.pipeline import ReferencePipeline, load_pipeline

from .conftest import generate

STEPS = 4


def observe_sequence(observe: Observe, inputs: list[list[torch.Tensor]], grid: tuple[int, int]) -> dict:
    """Drive ``observe.plan`` directly: ``inputs[t][b]`` is block ``b``'s input at step ``t``; returns the summary."""
    generation = Generation(num_steps=len(inputs))
    caches = [observe.new_cache(generation) for _ in inputs[0]]
    for step, xs in enumerate(inputs):
        for cache, x in zip(caches, xs, strict=True):
            assert observe.plan(x, grid, cache, step) is None
    return summarize(observe)


def flipping_pairs(step: int) -> torch.Tensor:
    """A 2x4 grid (cells of 2x2, top-left destinations 0 and 2): destination 0 is e1, destination 2 is e2, and every
    source is e1 at even steps (all merge into 0) and e2 at odd steps (all into 2): disjoint pair sets."""
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    x = (e1 if step % 2 == 0 else e2).repeat(8, 1)
    x[0], x[2] = e1, e2
    return x.unsqueeze(0)


def flipping_destinations(step: int) -> torch.Tensor:
    """A 2x2 grid in 1x2 tiles keeping one destination each: the non-zero token of each tile wins (a zero token has
    similarity 0 to everything), and which one is zero alternates: disjoint destination sets."""
    x = torch.zeros(1, 4, 3)
    x[0, [step % 2, 2 + step % 2]] = torch.tensor([1.0, 2.0, 3.0])
    return x


def values(summary: dict, metric: str, block: int = 0) -> list:
    return summary["metrics"][metric]["mean"][block]


def test_pairs_that_never_change_give_distance_zero_and_one_checkpoint() -> None:
    x = torch.randn(2, 32, 8, generator=torch.Generator().manual_seed(0))
    observe = Observe(pair_threshold=0.0, layout=(("a", "level", 1), ("b", "level", 1)))
    summary = observe_sequence(observe, [[x, x.clone()]] * STEPS, (4, 8))
    for metric in ("pairs_adj", "pairs_top_adj", "dest_adj", "weight_adj"):
        assert values(summary, metric) == [None] + [0.0] * (STEPS - 1)
    for kind in ("pairs", "dest"):
        drift = summary["drift"][kind]["mean"][1]
        assert [drift[s][t] for s in range(STEPS) for t in range(s + 1, STEPS)] == [0.0] * (STEPS * (STEPS - 1) // 2)
        assert drift[1][0] is None and drift[2][2] is None  # defined for s < t only
    assert values(summary, "pairs_level", 1) == [0.0] * STEPS and values(summary, "pairs_level", 0) == [None] * STEPS
    assert catome_schedule(summary, tolerance=0.2) == [0]
    assert toma_intervals(summary, tolerance=0.2) == dict(dest_every=STEPS, weight_every=STEPS)


def test_pairs_that_all_change_give_distance_one_and_a_checkpoint_every_step() -> None:
    summary = observe_sequence(Observe(), [[flipping_pairs(t)] for t in range(STEPS)], (2, 4))
    assert values(summary, "pairs_adj") == [None] + [1.0] * (STEPS - 1)
    assert values(summary, "pairs_top_adj") == [None] + [1.0] * (STEPS - 1)
    assert values(summary, "cell_share>=0.9") == [1.0] * STEPS  # every source matches its destination exactly
    assert catome_schedule(summary, tolerance=0.2) == list(range(STEPS))
    # the drift is measured, not summed: from step s the pairs are back at s + 2
    assert summary["drift"]["pairs"]["mean"][0][0][:3] == [None, 1.0, 0.0]
    destinations = observe_sequence(Observe(tile=(1, 2)), [[flipping_destinations(t)] for t in range(STEPS)], (2, 2))
    assert values(destinations, "dest_adj") == [None] + [1.0] * (STEPS - 1)
    assert destinations["drift"]["dest"]["max"][0][0][1:] == [1.0, 0.0, 1.0]
    assert toma_intervals(destinations, tolerance=0.2) == dict(dest_every=1, weight_every=1)


def test_set_statistics_on_small_cases() -> None:
    a = torch.tensor([[0, 1, -1, 2], [-1, -1, -1, -1]])
    b = torch.tensor([[0, 2, -1, 2], [-1, -1, -1, -1]])
    assert st.jaccard_distance(a, b).tolist() == [0.5, 0.0]  # {0->0, 3->2} shared of 4 pairs; two empty sets
    assert st.histogram(torch.tensor([-1.0, 0.1, 0.2, 1.0]), 4).tolist() == [1.0, 0.0, 2.0, 1.0]
    assert st.shares_above(torch.tensor([0.1, 0.5, 0.9, 1.0]), [0.5, 0.95]) == [0.75, 0.25]
    with pytest.raises(ValueError, match="thresholds"):
        Observe(thresholds=(1.5,))
    with pytest.raises(ValueError, match="tolerance"):
        catome_schedule(observe_sequence(Observe(), [[flipping_pairs(t)] for t in range(2)], (2, 4)), tolerance=0)
    assert catome_schedule(observe_sequence(Observe(), [[flipping_pairs(0)]], (2, 4))) == [0]  # one step
    one_row = observe_sequence(Observe(), [[torch.randn(1, 4, 2)]] * 2, (1, 4))  # no 2x2 cell: no pairs
    with pytest.raises(ValueError, match="no pairs drift"):
        catome_schedule(one_row)


def test_observation_does_not_change_the_output(pipe) -> None:
    base = generate(pipe, guidance_scale=5.0)
    observer = observer_for(pipe)
    tm.apply(pipe, observer)
    observed = generate(pipe, guidance_scale=5.0)
    tm.remove(pipe)
    assert torch.equal(observed, base)
    assert {r["block"] for r in observer.recorder.rows} == set(range(len(observer.layout))) and observer.recorder.runs


def test_analyze_shapes_and_usable_schedules() -> None:
    pipe = tiny_pipeline("tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    calls = []

    def call(pipe, prompt: str, seed: int, steps: int) -> None:  # a pipeline with its own call signature
        calls.append((prompt, seed))
        generate(pipe, prompt, steps, seed, height=32, width=32)

    stats = analyze(pipe, ["a red cube", "a cat"], seeds=[0], steps=3, call=call)
    assert calls == [("a red cube", 0), ("a cat", 0)] and [r["prompt"] for r in stats["runs_info"]] == [
        "a red cube",
        "a cat",
    ]
    assert not hasattr(pipe.unet, "_tokenmerge") and stats["runs"] == 2 and stats["num_steps"] == 3
    blocks = stats["blocks"]
    assert [b["group"] for b in blocks] == ["down1", "down2", "mid4", "up2", "up2", "up1", "up1"]
    assert blocks[0]["grid"] == [16, 16] and blocks[0]["name"].startswith("down_blocks.0.")
    for metric, data in stats["metrics"].items():
        assert set(data) == {"mean", "std", "min", "max"}
        assert len(data["mean"]) == len(blocks) and all(len(row) == 3 for row in data["mean"]), metric
    assert all(row[0] is None and None not in row[1:] for row in stats["metrics"]["pairs_adj"]["mean"])
    hist = torch.tensor(stats["histograms"]["cell"])
    assert hist.shape == (len(blocks), 3, 40)
    assert hist[0].sum(-1).tolist() == [2 * 2 * 192] * 3  # 2 runs x 2 guidance halves x 192 sources of 16x16
    derived = derive(stats, tolerance=0.2)
    schedule = derived["catome"]["schedule"]
    assert schedule[0] == 0 and schedule == sorted(set(schedule)) and schedule[-1] < 3
    assert derived["catome"]["drift"]["max"] <= 0.2 and derived["toma"]["dest_drift"]["max"] <= 0.2
    assert derived["catome"]["reference"]["schedule"] == [0, 1, 2]  # floor(s * 3 / 50) of config3's steps s
    drift = stats["drift"]["pairs"]["mean"]
    assert len(drift) == len(blocks) and all(len(row) == 3 for matrix in drift for row in matrix)
    tm.CAToMe(schedule=schedule)
    tm.ToMA(**toma_intervals(stats, 0.2))


def test_cli_analyze_tiny_sd15(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "analysis"
    argv = ["analyze", "--model", "tiny-sd15", "--num-prompts", "1", "--seeds", "0", "1", "--steps", "3"]
    argv += ["--height", "32", "--width", "32", "--thresholds", "0.6", "0.8", "--device", "cpu", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    data = json.loads((out / "stats.json").read_text())
    assert data["meta"]["model"] == "tiny-sd15" and data["runs"] == 2 and data["num_steps"] == 3
    assert "cell_share>=0.8" in data["metrics"] and data["schedules"]["tolerance"] == 0.2
    for name in ("hist_cell.png", "hist_tile.png", "stability_pairs_adj.png", "stability_dest_adj.png"):
        assert (out / name).stat().st_size > 0
    summary = (out / "summary.md").read_text()
    assert f"schedule={data['schedules']['catome']['schedule']}" in summary
    assert "CA-ToMe schedule:" in capsys.readouterr().out
    assert main([*argv, "--out", str(out)]) == 2  # exists, no --overwrite


@pytest.mark.parametrize(
    "model, groups, placement",
    [
        ("reference-unet", ["down1", "down2", "down4", "mid8", "up4", "up4", "up2", "up2", "up1", "up1"], ""),
        ("reference-flux", ["double"] * 4 + ["single"] * 8, ""),
    ],
)
def test_cli_analyze_reference_models(tmp_path: Path, model: str, groups: list, placement: str) -> None:
    out = tmp_path / "analysis"
    argv = ["analyze", "--model", model, "--num-prompts", "2", "--seeds", "3", "--steps", "2", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    data = json.loads((out / "stats.json").read_text())
    assert [r["prompt"] for r in data["runs_info"]] == list(PROMPTS[:2]) and data["meta"]["prompt_set"] == "demo"
    assert [b["group"] for b in data["blocks"]] == groups and data["num_steps"] == 2
    assert data["meta"]["height"] == 64 and data["meta"]["guidance_scale"] == 3.0
    assert data["blocks"][0]["grid"] == ([64, 64] if model == "reference-unet" else [32, 32])
    summary = (out / "summary.md").read_text()
    assert f"tokenmerge demo --model {model.removeprefix('reference-')} --steps 2" in summary
    assert f"weight_every={data['schedules']['toma']['weight_every']}{placement or ')'}" in summary
    prompts = tmp_path / "captions.txt"
    prompts.write_text("white circle and red square on green checks\n")
    argv[argv.index("--num-prompts") : argv.index("--seeds")] = ["--prompts", str(prompts), "--height", "16"]
    assert main([*argv, "--out", str(tmp_path / "file")]) == 0
    data = json.loads((tmp_path / "file" / "stats.json").read_text())
    assert data["runs_info"] == [dict(prompt="white circle and red square on green checks", seed=3)]
    assert data["meta"]["width"] == 16


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "tiny-sd15", "--thresholds", "1.5"], "thresholds must be"),
        (["--model", "tiny-sd15", "--tolerance", "0"], "--tolerance must be positive"),
        (["--model", "tiny-sd15", "--seeds", "0", "0"], "--seeds must be distinct"),
        (["--model", "tiny-sd15", "--reference-schedule", "config9"], "unknown schedule"),
        (["--model", "sd15"], "analyze needs a pipeline"),
        (["--model", "./no/such/pipeline"], "does not exist"),
        (["--model", "reference-unet", "--prompts", "general"], "knows only its captions"),
        (["--model", "reference-flux", "--height", "32", "--width", "16"], "square images"),
        (["--model", "reference-unet", "--height", "30"], "multiple of 4"),
        (["--model", "reference-unet", "--dtype", "float16"], "float32 only"),
    ],
)
def test_cli_analyze_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list, message: str) -> None:
    assert main(["analyze", *extra, "--out", str(tmp_path / "a"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokenmerge: error:") and message in err and "\n" not in err
    assert not (tmp_path / "a").exists()


def test_cli_analyze_reference_caption_outside_the_vocabulary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red circle and blue square on green gradient\na lighthouse at dawn\n")
    argv = ["analyze", "--model", "reference-flux", "--prompts", str(prompts), "--out", str(tmp_path / "a")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokenmerge: error: reference-flux: prompt 'a lighthouse at dawn': unknown words")
    assert "\n" not in err and not (tmp_path / "a").exists()


def test_trained_reference_unet_has_near_duplicate_tokens_a_random_one_lacks() -> None:
    """Issue #6 point 4: the trained reference UNet says what random weights cannot. At its top level (64x64
    tokens) the trained model's block inputs hold near-duplicate tokens; the same architecture with random weights
    (``models.build``, seeds 0 and 1) has almost none. Measured with this setting (2 demo captions, seed 0, 3 steps,
    guidance 3; mean over the 3 top-level blocks, the steps and runs; 2026-12-03): share of tokens whose best match in
    their 4x4 tile has cosine >= 0.9: trained 0.536, random 0.003 (init seed 0) and 0.000 (seed 1); share of 2x2-cell
    sources whose best match is >= 0.7: trained 0.990, random 0.947 and 0.857 (at 64x64 even random features are
    smooth over 2x2 cells, so that gap is small). Merge stability showed no such gap on the earlier 32x32 model, so it
    is not asserted."""

    def top_level(pipe: ReferencePipeline) -> dict[str, float]:
        stats = analyze(pipe, PROMPTS[:2], [0], 3, Observe(), call=reference_call)
        top = [i for i, b in enumerate(stats["blocks"]) if b["downsample"] == 1]
        out = {}
        for metric in ("tile_share>=0.9", "cell_share>=0.7"):
            values = [v for i in top for v in stats["metrics"][metric]["mean"][i]]
            out[metric] = sum(values) / len(values)
        return out

    trained = top_level(load_pipeline("unet"))
    for seed in (0, 1):
        denoiser, text_encoder = models.build("unet", seed=seed)
        random = top_level(ReferencePipeline("unet", denoiser.eval(), text_encoder.eval()))
        assert trained["tile_share>=0.9"] > 0.2 > 0.05 > random["tile_share>=0.9"], (trained, random)
        assert trained["cell_share>=0.7"] > random["cell_share>=0.7"] + 0.02, (trained, random)
