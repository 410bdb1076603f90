"""``tokenmerge pareto``: settings from presets, the sweep engine (fake runner and clock), the front, the target
checks on synthetic points, and the command end to end on tiny models."""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import tokenmerge as tm
from tokenmerge.cli import main
from tokenmerge.harness import runners, sweep, timing
from tokenmerge.harness.pareto import Metric, Point, check_targets, front, run_sweep, scene_metrics, standard_metrics
from tokenmerge.harness.registry import HarnessError
from tokenmerge.harness.runners import ImageSet
from tokenmerge.harness.sweep import Layout, Preset, Selection, build_settings
from tokenmerge.harness.timing import Schedule

UNET = Layout("unet", (1, 2, 4))
FLUX = Layout("dit", (1,), {"double": 2, "single": 4})
PSNR = Metric("psnr", True, lambda x, ref, p: 0.0, "dB")


def labels(settings: list[Any]) -> list[str]:
    return [s.label for s in settings]


def test_settings_default_always_in_and_marked() -> None:
    plan = build_settings(UNET, Selection(["toma", "todo"], values={"toma": [0.25, 0.75]}, quick=True))
    assert labels(plan.settings)[0] == "baseline"
    defaults = [s.label for s in plan.settings if s.default]
    assert defaults == ["toma:ratio=0.5", "todo:factor=2"]  # the default value is added to the given ones
    assert "toma:ratio=0.25@kv" in labels(plan.settings) and "toma:ratio=0.5@kv" not in labels(plan.settings)
    kv = next(s for s in plan.settings if s.label == "toma:ratio=0.25@kv")
    assert kv.method == tm.ToMA(ratio=0.25, mode="kv", locality=0.05, max_downsample=None)
    default = next(s for s in plan.settings if s.default and s.family == "toma")
    # a bare layout counts no FLOPs: ToMA's default falls back to tokens mode at levels <= 4, which @tokens repeats
    assert default.method == tm.ToMA(mode="tokens", max_downsample=4)
    reasons = {s.label: s.reason for s in plan.skipped}
    assert reasons["toma:ratio=0.25@tokens"] == "same configuration as toma:ratio=0.25"
    assert labels(plan.settings)[-2:] == ["todo:factor=2", "todo:factor=4"]  # quick: the default preset only


def test_placements_resolve_per_family_or_skip_with_reason() -> None:
    presets = {"toma": ["tokens", "every", "late", "top", "kvnolocal"]}
    unet = build_settings(UNET, Selection(["toma"], presets=presets, values={"toma": [0.5]}))
    reasons = {s.label: s.reason for s in unet.skipped}
    assert reasons["toma:ratio=0.5@every"] == "same configuration as toma:ratio=0.5"  # levels <= 4: the fallback
    assert reasons["toma:ratio=0.5@tokens"] == "same configuration as toma:ratio=0.5"
    kvnolocal = next(s for s in unet.settings if s.label == "toma:ratio=0.5@kvnolocal")
    assert kvnolocal.method == tm.ToMA(mode="kv", max_downsample=None)
    assert reasons["toma:ratio=0.5@late"] == "placement 'late' does not exist on a unet"
    top = next(s for s in unet.settings if s.label == "toma:ratio=0.5@top")
    assert top.method.max_downsample == 1 and top.method.roles == {"attn"}

    flux_blocks = {"blocks": {"double": (1, None), "single": (1, None)}}
    dit = build_settings(FLUX, Selection(["toma"], presets={"toma": ["tokens", "every", "late", "top"]}), flux_blocks)
    by_label = {s.label: s for s in dit.settings}
    assert by_label["toma:ratio=0.5"].method.blocks == {"double": ((1, None),), "single": ((1, None),)}
    assert by_label["toma:ratio=0.5@every"].method.blocks == {"double": ((0, None),), "single": ((0, None),)}
    assert by_label["toma:ratio=0.5@late"].method.blocks == {"double": ((1, None),), "single": ((2, None),)}
    assert by_label["toma:ratio=0.5"].method.mode == "tokens"
    reasons = {s.label: s.reason for s in dit.skipped}
    assert reasons["toma:ratio=0.5@top"] == "placement 'top' does not exist on a dit"
    assert reasons["toma:ratio=0.5@tokens"] == "same configuration as toma:ratio=0.5"  # tokens: the DiT default


def test_layout_of_tells_unets_from_dits() -> None:
    from tokenmerge.archs import build_dit, build_unet
    from tokenmerge.harness.sweep import layout_of

    assert layout_of(build_unet("tiny-sd15")).family == "unet"
    assert layout_of(build_dit("tiny-flux")).family == "dit"


def test_toma_presets_kv_values_and_authors_schedule() -> None:
    """The ``kv`` presets sweep their own ratios at the finest UNet level; ``authors`` is the authors' schedule;
    values given on the command line override a preset's."""
    unet = build_settings(UNET, Selection(["toma"], presets={"toma": ["kv", "authors"]}))
    kv = [s for s in unet.settings if s.preset == "kv"]
    assert [s.value for s in kv] == [0.5, 0.625, 0.75, 0.875, 0.9375]
    assert all(s.method.keys_values and s.method.locality == 0.05 and s.method.max_downsample is None for s in kv)
    authors = next(s for s in unet.settings if s.preset == "authors")
    assert authors.method == tm.ToMA.authors_schedule(ratio=authors.value, max_downsample=4)  # the fallback levels
    given = build_settings(UNET, Selection(["toma"], presets={"toma": ["kv"]}, values={"toma": [0.5]}))
    assert [s.value for s in given.settings if s.preset == "kv"] == [0.5]


def test_a_preset_is_one_line_and_bad_options_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    toma = sweep.SWEEPS["toma"]
    presets = (*toma.presets, Preset("tau", {"tau": 10.0}), Preset("future", {"no_such_option": True}))
    monkeypatch.setitem(sweep.SWEEPS, "toma", sweep.MethodSweep("ratio", (0.5,), (0.5,), presets))
    plan = build_settings(UNET, Selection(["toma"], presets={"toma": ["tau", "future"]}))
    assert next(s for s in plan.settings if s.label == "toma:ratio=0.5@tau").method.tau == 10.0
    (future,) = [s for s in plan.skipped if s.label == "toma:ratio=0.5@future"]
    assert future.reason.startswith("invalid options") and "no_such_option" in future.reason


@pytest.mark.parametrize(
    "selection, message",
    [
        (Selection(["fastmerge"]), "'fastmerge': unknown method"),
        (Selection(presets={"toma": ["nope"]}), "toma has no preset 'nope'"),
        (Selection(values={"toma": [1.5]}), r"toma ratio=1.5: ratio must be .*in \[0, 1\)"),
        (Selection(["todo"], values={"toma": [0.5]}), "not among the swept methods"),
    ],
)
def test_bad_selection(selection: Selection, message: str) -> None:
    with pytest.raises(HarnessError, match=message):
        selection.check()


@dataclass
class FakeSetting:
    label: str
    family: str
    image: torch.Tensor | None = None  # None: raises at apply
    default: bool = False
    preset: str = "default"
    knob: str | None = "ratio"
    value: float | None = 0.5

    def apply(self, target: dict[str, Any]) -> None:
        if self.image is None:
            raise ValueError("not on this model")
        target["applied"] = self

    def remove(self, target: dict[str, Any]) -> None:
        target.pop("applied", None)


@dataclass
class FakeRunner:
    base: torch.Tensor
    log: list[tuple[str, bool]] = field(default_factory=list)
    name: str = "fake"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    images: ImageSet = field(default_factory=lambda: ImageSet(("a", "b"), (0, 1), steps=1))
    method_defaults: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)
    in_clock: bool = False

    def generate(self) -> torch.Tensor:
        applied = self.target.get("applied")
        self.log.append((applied.label if applied else "baseline", self.in_clock))
        return (applied.image if applied else self.base).clone()


def test_run_sweep_warm_up_shuffle_duplicates_and_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    base = torch.full((2, 3, 16, 16), 0.5)
    noisy = base + 0.01 * torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    settings = [
        FakeSetting("fast", "toma", noisy),
        FakeSetting("fast-again", "toma", noisy.clone()),  # same images, same family: not timed again
        FakeSetting("noop", "toma", base.clone()),  # = the baseline: merges nothing
        FakeSetting("noop-default", "todo", base.clone(), default=True),  # a default is always kept
        FakeSetting("broken", "todo", None),
    ]
    runner = FakeRunner(base)
    seconds = {"baseline": 2.0, "fast": 1.0, "noop-default": 2.0}

    def clock(run: Any, device: torch.device) -> float:
        runner.in_clock = True
        try:
            run()
        finally:
            runner.in_clock = False
        return seconds[runner.log[-1][0]]

    monkeypatch.setattr(timing, "time_call", clock)
    result = run_sweep(runner, settings, standard_metrics(), Schedule(rounds=4, warmup=1, seed=1))
    warm = runner.log[:5]  # broken never generates
    assert warm == [(x, False) for x in ("baseline", "fast", "fast-again", "noop", "noop-default")]
    timed = runner.log[5:]
    assert len(timed) == 4 * 3 and all(inside for _, inside in timed)
    rounds = [tuple(label for label, _ in timed[3 * r : 3 * r + 3]) for r in range(4)]
    assert all(sorted(r) == ["baseline", "fast", "noop-default"] for r in rounds) and len(set(rounds)) > 1
    points = {p.label: p for p in result.points}
    assert list(points) == ["baseline", "fast", "noop-default"]
    assert points["fast"].speedup == 2.0 and points["fast"].times_s == [1.0] * 4
    assert points["fast"].timed_max_diff == 0.0 and 30 < points["fast"].scores["psnr"] < 60
    assert points["baseline"].scores["psnr"] == math.inf and points["noop-default"].merged_nothing
    reasons = {s.label: s.reason for s in result.dropped}
    assert reasons["fast-again"] == "same as the images of fast"
    assert reasons["noop"] == "same as the unaccelerated images: merges nothing here"
    assert reasons["broken"] == "failed on fake: not on this model"


def point(label: str, family: str, speedup: float, psnr: float, default: bool = False) -> Point:
    setting = FakeSetting(label, family, default=default)
    return Point(setting, [1.0 / speedup], speedup, {"psnr": psnr}, 0.0, False)


POINTS = [
    point("baseline", "baseline", 1.0, math.inf),
    point("toma-default", "toma", 1.5, 25.0, default=True),
    point("toma-0.25", "toma", 1.25, 30.0),
    point("toma-0.75", "toma", 1.8, 21.0),
    point("todo-default", "todo", 1.25, 40.0, default=True),
    point("todo-3", "todo", 1.4, 35.0),
    point("todo-4", "todo", 1.5, 28.0),
]


def test_front_on_synthetic_points() -> None:
    assert [POINTS[i].label for i in front(POINTS, PSNR)] == [
        "baseline",
        "todo-default",
        "todo-3",
        "todo-4",
        "toma-0.75",
    ]
    lower = Metric("rel_l2", False, PSNR.score)
    pts = [Point(p.setting, p.times_s, p.speedup, {"rel_l2": -p.scores["psnr"]}, 0.0, False) for p in POINTS]
    assert front(pts, lower) == front(POINTS, PSNR)  # lower-is-better metrics are turned around


def test_projected_settings_follow_the_real_architecture_and_count_its_flops() -> None:
    """``--cost``: a setting's auto options take their values on the projected architecture (ToMA's default as it
    resolves on the real-size SDXL UNet), each setting is placed there on its own layout, and its FLOP ratio over a
    generation is the twin's count; CA-ToMe's at the fraction it merged on the swept model, step caches none."""
    from tokenmerge.api import view_of
    from tokenmerge.archs import build_unet
    from tokenmerge.cost import CostSpec
    from tokenmerge.harness.pareto import FlopAxis
    from tokenmerge.harness.projection import project

    spec = CostSpec.parse("sd15@512")
    selection = Selection(["toma", "catome"], {"toma": ["default", "top"]}, {"toma": [0.5], "catome": [0.7]})
    plan = build_settings(view_of(build_unet("tiny-sdxl")), selection, None, [(spec.label, spec.view())])
    by_label = {s.label: s for s in plan.settings}
    default = by_label["toma:ratio=0.5"]
    assert default.method == default.projected["sd15@512"] == tm.ToMA(mode="tokens", max_downsample=4)
    assert by_label["toma:ratio=0.5@top"].projected["sd15@512"].max_downsample == 1
    points = [Point(s, [1.0], 1.0, {"psnr": 30.0}, 0.0, False, merged_fraction=0.5) for s in plan.settings]
    points.append(Point(FakeSetting("fbc", "fbc", None), [1.0], 1.0, {"psnr": 30.0}, 0.0, False))
    project(points, [spec], steps=3)
    twin, shape = spec.twin(), spec.shape()
    full = sum(twin.generation(None, shape, 3))
    ratios = {p.label: FlopAxis(spec.label)(p) for p in points}
    assert ratios["baseline"] == 1.0 and math.isnan(ratios["fbc"])
    assert (
        ratios["toma:ratio=0.5"]
        == full / sum(twin.generation(default.method, shape, 3))
        == pytest.approx(1.344, abs=1e-3)
    )
    catome = by_label["catome:threshold=0.7"].projected["sd15@512"]
    assert ratios["catome:threshold=0.7"] == full / sum(twin.generation(catome, shape, 3, 0.5)) > 1
    assert front(points, PSNR, FlopAxis(spec.label))[-1] == [p.label for p in points].index("toma:ratio=0.5")


def test_targets_on_synthetic_points() -> None:
    toma = check_targets(POINTS, PSNR, "toma", margin=1.0, min_speedup=1.2, bucket=0.1)
    assert toma.default.dominated and toma.default.best_faster == "todo-4" and toma.default.advantage == 3.0
    assert not toma.default_ok and not toma.gaps_ok and not toma.ok
    assert (
        toma.worst.gap == 10.0 and toma.worst.overall_best == "todo-default" and toma.worst.family_best == "toma-0.25"
    )
    gaps = {round(g.min_speedup, 2): g.gap for g in toma.gaps}
    assert gaps == {1.2: 10.0, 1.3: 10.0, 1.4: 10.0, 1.5: 3.0, 1.6: 0.0, 1.7: 0.0, 1.8: 0.0}
    todo = check_targets(POINTS, PSNR, "todo", margin=1.0, min_speedup=1.2)
    assert todo.default_ok and not todo.default.dominated and todo.default.best_faster == "todo-3"
    assert todo.worst.gap == math.inf and todo.worst.family_best is None  # ToDo reaches no 1.8x setting
    relaxed = check_targets(POINTS[:4] + POINTS[5:6], PSNR, "toma", margin=10.0, min_speedup=1.2)
    assert relaxed.ok  # within a 10 dB margin everywhere


COMMON = ["--device", "cpu", "--quiet", "--num-prompts", "1", "--steps", "2", "--rounds", "1"]


def test_quick_end_to_end_tiny_sd15(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pareto"
    argv = ["pareto", "--model", "tiny-sd15", "--quick", "--methods", "toma,todo", "--values", "toma=0.25"]
    argv += ["--preset", "toma=default"]
    assert main([*argv, *COMMON, "--height", "32", "--width", "32", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["pareto.png", "results.csv", "results.json", "results.md"]
    data = json.loads((out / "results.json").read_text())
    rows = {r["config"]: r for r in data["settings"]}
    assert list(rows) == ["baseline", "toma:ratio=0.25", "toma:ratio=0.5", "todo:factor=2", "todo:factor=4"]
    assert rows["toma:ratio=0.5"]["default"] and rows["todo:factor=2"]["default"]
    assert rows["baseline"]["psnr"] == "inf" and rows["baseline"]["speedup"] == 1.0
    assert all(0 < r["psnr"] < 100 for c, r in rows.items() if c != "baseline")
    assert data["front"][0] == "baseline" and all(rows[c]["front"] for c in data["front"])
    assert [t["family"] for t in data["targets"]] == ["toma", "todo"]
    assert {"default", "gaps", "worst", "ok"} <= data["targets"][0].keys()
    assert data["meta"]["schedule"] == {"rounds": 1, "warmup": 1, "seed": 0} and data["meta"]["quick"]
    with (out / "results.csv").open() as f:
        assert [r["config"] for r in csv.DictReader(f)] == [r["config"] for r in data["settings"]]
    md = (out / "results.md").read_text()
    assert "## Targets on measured speed-ups (psnr, margin 1 dB, speeds from 1.2x)" in md
    assert "| toma:ratio=0.5 | toma |" in md
    assert "Every timed call gave exactly the warm-up call's images." in md
    assert "targets toma (measured):" in capsys.readouterr().out
    assert not (tmp_path / ".pareto.partial").exists()


def test_reference_unet_small(tmp_path: Path) -> None:
    out = tmp_path / "ref"
    argv = ["pareto", "--model", "reference-unet", "--methods", "tomesd,catome", "--values", "tomesd=0.5"]
    argv += ["--values", "catome=0.7", "--preset", "tomesd=default,toma", "--metric", "ssim"]
    assert main([*argv, *COMMON, "--out", str(out)]) == 0
    text = (out / "results.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in results.json: not strict JSON"))
    assert data["metric"] == "ssim" and data["meta"]["images"] == 1 and data["meta"]["seeds"] == [1000]
    configs = [r["config"] for r in data["settings"]]
    assert configs == ["baseline", "tomesd:ratio=0.5", "tomesd:ratio=0.5@toma", "catome:threshold=0.7"]
    assert data["meta"]["prompts"] == runners.reference_captions(1)
    base, *others = data["settings"]  # scene metrics: caption accuracy in [0, 1]; one image has no Fréchet distance
    assert 0 <= base["caption_acc"] <= 1 and all(0 <= r["caption_acc"] <= 1 for r in others)
    assert all(r["scene_fd"] == "nan" for r in data["settings"])  # NaN as a string, like inf


def test_reference_flux_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["pareto", "--model", "reference-flux", "--methods", "toma", "--preset", "toma=late,top"]
    assert main([*argv, "--values", "toma=0.5", "--dry-run", "--out", "unused"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "baseline",
        "toma:ratio=0.5 (default)",
        "toma:ratio=0.5@late",
        "skipped toma:ratio=0.5@top: placement 'top' does not exist on a dit",
    ]


@pytest.mark.parametrize(
    "argv, message, loads",
    [
        (["--methods", "fastmerge"], "'fastmerge': unknown method", False),
        (["--preset", "toma=nope"], "toma has no preset 'nope'", False),
        (["--preset", "toma"], "--preset 'toma': expected METHOD=A", False),
        (["--values", "toma=1.5"], r"ratio must be .*in \[0, 1\)", False),
        (["--metric", "lpips"], "--metric lpips needs --lpips-backbone", False),
        (["--metric", "caption_acc"], "--metric caption_acc needs a reference model", False),
        (["--out", "FILE/out"], "is a file, not a folder", False),
        (["--out", "EXISTS"], "already exists", False),
        (["--rounds", "0"], "--rounds must be >= 1", False),
        (["--cost", "sd99@512"], "--cost: unknown real-size architecture 'sd99'", False),
        (["--cost", "sdxl@1001"], "--cost: .*multiples of 8 pixels", False),
        (["--model", "./missing"], "model path './missing' does not exist", True),
        (["--model", "reference-unet", "--prompts", "general"], "unknown words", True),
    ],
)
def test_bad_input_one_line_before_any_work(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
    loads: bool,
) -> None:
    (tmp_path / "FILE").write_text("")
    (tmp_path / "EXISTS").mkdir()
    if not loads:
        monkeypatch.setattr(runners, "open_runner", lambda *a, **k: pytest.fail("loaded a model before checking"))
    argv = [str(tmp_path / a) if a in ("FILE/out", "EXISTS") else a for a in argv]
    base = ["pareto", "--model", "tiny-sd15", "--out", str(tmp_path / "out")]
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("tokenmerge: error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_scene_metrics_read_the_captions_and_compare_distributions() -> None:
    from tokenmerge.reference import scenes
    from tokenmerge.reference.data import make_batch

    images, prompts = make_batch(scenes.HELD_OUT_SEED, 5, 16)
    other = make_batch(scenes.HELD_OUT_SEED, 6, 16)[0]
    noise = torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    acc, fd = scene_metrics()
    assert acc.higher_is_better and not fd.higher_is_better
    assert acc.score(images, images, prompts) > 0.95 > 0.6 > acc.score(images, images, prompts[1:] + prompts[:1])
    assert fd.score(images, images, prompts) < 1e-3
    assert fd.score(other, images, prompts) < fd.score(noise, images, prompts)
