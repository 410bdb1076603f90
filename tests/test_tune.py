"""``tm.tune`` / ``tokenmerge tune``: the search's logic on a tiny UNet with a deterministic clock (target met,
unreachable, ``min_fidelity``, budget), the cache (hit, invalidated by a version or weight change, ``load_tuned``),
the lazy export on a slim install, and the API and command end to end.

The clock is injected (``timing.time_call``): a call takes ``1 / (1 + saved / 4)`` seconds, ``saved`` summing over
the patched blocks the fraction of tokens removed times the sub-modules merged (from ``tm.summary`` after the call),
so speeds depend on what a setting merges, never on the machine.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import tokenmerge as tm
from tokenmerge.archs import build_unet, unet_inputs
from tokenmerge.cli import main
from tokenmerge.errors import HarnessError
from tokenmerge.harness import timing, tune, tune_cache
from tokenmerge.harness.pareto import Point, standard_metrics
from tokenmerge.harness.runners import ImageSet
from tokenmerge.harness.sweep import SWEEPS, Selection, build_settings, layout_of
from tokenmerge.harness.timing import Schedule
from tokenmerge.harness.tune import Goal, Search, method_from_record, method_record, tune_runner

from .test_install import _without

PSNR = standard_metrics()[0]


def saved_fraction(target: Any) -> float:
    """Tokens removed, weighted by the sub-modules that run merged, summed over the patched blocks."""
    if not tm.is_applied(target):
        return 0.0
    blocks = tm.summary(target).blocks
    return sum(len(b.roles) * (1 - b.tokens_out / b.tokens_in) for b in blocks if b.tokens_in and b.tokens_out)


@pytest.fixture
def token_clock(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Installs the deterministic clock; append the target it reads to the returned list."""
    targets: list[Any] = []

    def clock(run: Any, device: torch.device) -> float:
        run()
        return 1.0 / (1.0 + saved_fraction(targets[0]) / 4)

    monkeypatch.setattr(timing, "time_call", clock)
    return targets


@dataclass
class UNetRunner:
    """One call of a tiny SD 1.5 UNet on a fixed 16x16 latent; its first 3 channels, squashed to [0, 1], are the
    'images'."""

    target: torch.nn.Module = field(default_factory=lambda: build_unet("tiny-sd15"))
    name: str = "tiny-unet"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    images: ImageSet = field(default_factory=lambda: ImageSet(("a",), (0,), steps=1))
    method_defaults: dict[str, Any] = field(default_factory=dict)
    calls: int = 0

    def __post_init__(self) -> None:
        self.inputs = unet_inputs(self.target, 1, 16, 16)

    def generate(self) -> torch.Tensor:
        self.calls += 1
        with torch.no_grad():
            out = self.target(**self.inputs).sample
        return torch.sigmoid(out[:, :3]).float()


TWO = Selection(["toma", "todo"])
#: A lighter search than the default (fewer calls; the logic is the same).
LIGHT = Search(refine_rounds=2, probes=2, confirm=2, rounds=2)


@pytest.fixture
def runner(token_clock: list[Any]) -> UNetRunner:
    r = UNetRunner()
    token_clock.append(r.target)
    return r


def test_target_met_most_faithful_setting_fast_enough(runner: UNetRunner) -> None:
    result = tune_runner(runner, Goal(1.3, None, PSNR), TWO, plan=LIGHT, progress=False)
    assert result.reached and result.speedup >= 1.3 and isinstance(result.method, tm.ToMA | tm.ToDo)
    fast = [t for t in result.trials if t.speedup >= 1.3]
    assert result.scores["psnr"] == max(t.scores["psnr"] for t in fast)  # the clock is exact: every phase agrees
    assert {t.phase for t in result.trials} == {"coarse", "refine", "confirm"}
    refined = [t for t in result.trials if t.phase == "refine"]
    grid = {v for name in ("toma", "todo") for v in SWEEPS[name].quick_values}
    assert any(t.options.get("ratio", t.options.get("factor")) not in grid for t in refined)
    best_coarse = max(t.scores["psnr"] for t in fast if t.phase == "coarse")
    assert result.scores["psnr"] >= best_coarse
    assert result.label in result.front and result.reason.startswith(f"{result.label}: ")
    assert "the highest psnr at >= 1.3x" in result.report()
    assert not tm.is_applied(runner.target)  # apply=False leaves the model bare


def test_unreachable_target_says_the_best_speed(runner: UNetRunner) -> None:
    result = tune_runner(runner, Goal(50.0, None, PSNR), TWO, plan=LIGHT, progress=False)
    assert not result.reached and result.method is None and result.fastest is not None
    label, speed = result.fastest
    assert speed == max(t.speedup for t in result.trials) < 50
    assert result.reason.startswith(f"no setting reaches 50x on this pipeline: the fastest measured is {label} at ")
    with pytest.raises(HarnessError, match="no setting reaches 50x"):
        result.apply(runner.target)
    with pytest.raises(HarnessError, match="no setting reaches 50x"):
        tune_runner(runner, Goal(50.0, None, PSNR), TWO, plan=LIGHT, progress=False, apply=True)
    assert not tm.is_applied(runner.target)


def test_min_fidelity_the_fastest_faithful_setting(runner: UNetRunner) -> None:
    floor = 30.0
    result = tune_runner(runner, Goal(None, floor, PSNR), TWO, plan=LIGHT, progress=False)
    faithful = [t for t in result.trials if t.scores["psnr"] >= floor]
    assert result.reached and result.scores["psnr"] >= floor
    assert result.speedup == max(t.speedup for t in faithful) > 1.0
    both = tune_runner(runner, Goal(result.speedup + 0.5, floor, PSNR), TWO, plan=LIGHT, progress=False)
    assert not both.reached and "no setting" in both.reason


def test_next_candidates_confirmed_when_retiming_rejects_every_one(runner: UNetRunner, monkeypatch) -> None:
    """The machine is busy during the first confirmation run (every call takes as long as the baseline's): it
    rejects its candidates, a second run confirms the next ones; with ``attempts=1`` nothing is picked."""
    busy = [False]
    honest, sweep = timing.time_call, tune.run_sweep

    def clock(run: Any, device: torch.device) -> float:
        seconds = honest(run, device)
        return 1.0 if busy[0] else seconds

    def first_confirmation_busy(runner: Any, settings: Any, schedule: Schedule, **kwargs: Any) -> Any:
        busy[0] = schedule.seed == 100
        try:
            return sweep(runner, settings, schedule=schedule, **kwargs)
        finally:
            busy[0] = False

    monkeypatch.setattr(timing, "time_call", clock)
    monkeypatch.setattr(tune, "run_sweep", first_confirmation_busy)
    plan = Search(refine_rounds=0, confirm=2, rounds=2)
    result = tune_runner(runner, Goal(1.3, None, PSNR), TWO, plan=plan, progress=False)
    confirmed = [t for t in result.trials if t.phase == "confirm"]
    first = {t.label for t in confirmed if t.speedup == 1.0}
    second = {t.label for t in confirmed} - first
    assert 2 <= len(first) <= 3 and second  # two candidates (and the safe fallback), then the next ones
    assert result.reached and result.label in second and result.speedup >= 1.3
    once = tune_runner(runner, Goal(1.3, None, PSNR), TWO, plan=dataclasses.replace(plan, attempts=1), progress=False)
    assert not once.reached and len({t.label for t in once.trials if t.phase == "confirm"}) == len(first)


def test_search_space_skips_ablations_and_repeated_curves() -> None:
    coarse = tune._coarse(None)
    assert "kvnolocal" not in coarse.presets["toma"] and "kv" in coarse.presets["toma"] and coarse.quick
    layout = layout_of(build_unet("tiny-sd15"))
    plan = build_settings(layout, Selection(["toma"], {"toma": ["kv"]}, quick=True))
    assert sorted(s.value for s in plan.settings if s.preset == "kv") == [0.5, 0.75, 0.9375]
    settings = build_settings(layout, Selection(["toma"], {"toma": ["default", "attn"]}, {"toma": [0.25, 0.5]}))
    points = [
        Point(s, [1.0], 1.0 + s.value, {"psnr": 40 - 10 * s.value}, 0.0, False, f"{s.value}")
        for s in settings.settings[1:]
    ]  # the attn curve repeats the default curve's images
    assert list(tune._curves(points, Goal(1.3, None, PSNR))) == [("toma", "default")]
    candidates = tune._candidates(points, Goal(1.3, None, PSNR), Search())
    assert [p.label for p in candidates] == ["toma:ratio=0.25", "toma:ratio=0.5"]  # not their attn repeats
    points[-1] = dataclasses.replace(points[-1], digest="other")
    assert list(tune._curves(points, Goal(1.3, None, PSNR))) == [("toma", "default"), ("toma", "attn")]


def test_budget_and_goal_errors(runner: UNetRunner) -> None:
    with pytest.raises(HarnessError, match=r"budget_s=3 is too small: the coarse sweep alone takes ~\d+ s"):
        tune_runner(runner, Goal(1.3, None, PSNR), TWO, budget_s=3, progress=False)
    small = tune_runner(runner, Goal(1.3, None, PSNR), Selection(["todo"]), budget_s=12, progress=False)
    assert small.reached and not any(t.phase == "refine" for t in small.trials)  # no room left to refine
    for goal, message in [
        (lambda: Goal(None, None, PSNR), "give a speed-up target"),
        (lambda: Goal(0.9, None, PSNR), "speedup must be a number > 1"),
    ]:
        with pytest.raises(HarnessError, match=message):
            goal()
    with pytest.raises(TypeError, match=r"speedup must be a number or None, got str '1\.3'"):
        tm.tune(runner.target, speedup="1.3")
    with pytest.raises(TypeError, match="min_fidelity must be a number or None, got bool"):
        Goal(None, True, PSNR)
    with pytest.raises(HarnessError, match="a method is applied"):
        tm.apply(runner.target, tm.ToDo())
        try:
            tm.tune(runner.target)
        finally:
            tm.remove(runner.target)


def test_cache_hit_load_tuned_and_invalidation(runner: UNetRunner, tmp_path: Path, monkeypatch) -> None:
    goal, todo = Goal(1.3, None, PSNR), Selection(["todo"])
    first = tune_runner(runner, goal, todo, plan=LIGHT, progress=False, cache=tmp_path)
    (path,) = tmp_path.glob("tune-UNet2DConditionModel-*.json")
    data = json.loads(path.read_text())
    assert data["key"]["versions"]["torch"] == torch.__version__ and data["pick"]["label"] == first.label
    calls = runner.calls
    again = tune_runner(runner, goal, todo, plan=LIGHT, progress=False, cache=tmp_path)
    assert runner.calls == calls and again.from_cache and again.method == first.method
    assert again.trials == first.trials and again.speedup == first.speedup
    loaded = tm.load_tuned(tmp_path, runner.target)
    assert tm.is_applied(runner.target) and loaded.method == first.method
    tm.remove(runner.target)
    with pytest.raises(HarnessError, match=r"images.steps: 1 in the file vs 20 here"):
        tm.load_tuned(path, runner.target, steps=20)

    newer = {**tune_cache.versions(), "torch": "99.0"}
    monkeypatch.setattr(tune_cache, "versions", lambda: newer)
    with pytest.raises(HarnessError, match=r"tuned for another setup: versions.torch: '.*' in the file vs '99.0' here"):
        tm.load_tuned(path, runner.target)
    with pytest.raises(HarnessError, match=r"no result in .* was tuned for this setup"):
        tm.load_tuned(tmp_path, runner.target)
    retuned = tune_runner(
        runner, goal, todo, plan=LIGHT, progress=False, cache=path
    )  # the same file: stale, measured again
    assert runner.calls > calls and not retuned.from_cache
    assert json.loads(path.read_text())["key"]["versions"]["torch"] == "99.0"
    with torch.no_grad():
        next(runner.target.parameters()).view(-1)[0] += 1.0  # other weights: another model
    with pytest.raises(HarnessError, match=r"model.weights: "):
        tm.load_tuned(path, runner.target)


def test_method_records_round_trip() -> None:
    for method in (
        tm.ToMA(ratio=0.3, merge_mlp=False, blocks={"double": (1, None)}),
        tm.ToDo(factor=3, max_downsample=2),
        tm.CAToMe(threshold=0.6),
        tm.ToMeSD(ratio=0.4),
    ):
        name, options = method_record(method)
        assert method_from_record(name, json.loads(json.dumps(options))) == method


def test_lazy_export_needs_the_harness_extra(tmp_path: Path) -> None:
    env = _without(tmp_path, ("torchmetrics",))
    script = "import tokenmerge as tm\ntry:\n    tm.tune\nexcept ImportError as e:\n    print(e)\nprint(tm.ToMA)"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = proc.stdout.splitlines()[0]
    assert first == 'tokenmerge.tune needs the harness extra (torchmetrics missing): pip install "tokenmerge[harness]"'
    assert proc.stdout.splitlines()[1] == "<class 'tokenmerge.methods.toma.ToMA'>"  # the core still works


def test_api_on_a_pipeline_applies_the_pick(token_clock: list[Any], tmp_path: Path) -> None:
    from tokenmerge.archs import tiny_pipeline

    pipe = tiny_pipeline("tiny-sd15")
    token_clock.append(pipe)
    result = tm.tune(
        pipe, 1.1, prompts=["a red cube"], steps=1, height=32, width=32, methods=["todo"], apply=True, progress=False
    )
    assert (
        result.reached and tm.is_applied(pipe) and result.key["images"] == dict(height=32, width=32, steps=1, count=1)
    )
    tm.remove(pipe)


def test_api_on_the_reference_flux_pipeline(token_clock: list[Any]) -> None:
    from tokenmerge.reference.pipeline import load_pipeline

    pipe = load_pipeline("flux")
    token_clock.append(pipe)
    result = tm.tune(pipe, 1.05, prompts=["red circle on blue checks"], steps=1, methods=["todo"], progress=False)
    assert result.reached and isinstance(result.method, tm.ToDo) and not tm.is_applied(pipe)


def test_command_end_to_end(token_clock: list[Any], tmp_path: Path, capsys, monkeypatch) -> None:
    from tokenmerge.harness import runners

    opened: list[Any] = []
    real = runners.open_runner

    def recording(*args: Any, **kwargs: Any) -> Any:
        opened.append(real(*args, **kwargs))
        token_clock.append(opened[-1].target)
        return opened[-1]

    monkeypatch.setattr(runners, "open_runner", recording)
    argv = ["tune", "--model", "reference-unet", "--methods", "todo", "--num-prompts", "1", "--steps", "1"]
    argv += ["--device", "cpu", "--quiet", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "r.json")]
    assert main([*argv, "--speedup", "1.05"]) == 0
    out = capsys.readouterr().out
    assert "pick: todo:factor=" in out and "front (psnr):" in out and "64x64, 1 steps, cpu" in out
    assert json.loads((tmp_path / "r.json").read_text())["reached"]
    assert main([*argv, "--speedup", "40"]) == 2  # --out exists: refused before any work
    assert "r.json already exists (pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--speedup", "40", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tokenmerge: error: no setting reaches 40x on this pipeline: ")
    assert main(["tune", "--model", "reference-unet", "--speedup", "fast"]) == 2
    assert "--speedup: 'fast' is not a number" in capsys.readouterr().err


def test_setup_lines_name_the_default_size() -> None:
    """A pipeline without a known default size: the report says so instead of ``NonexNone``."""
    key = dict(model=dict(cls="d.UNet", name_or_path="m", weights="w"), device="cpu", dtype="float32", versions={})
    line = tune_cache.describe_key({**key, "images": dict(height=None, width=None, steps=2)})[0]
    assert "the pipeline's default size, 2 steps" in line and "None" not in line
    assert "64x48, 2 steps" in tune_cache.describe_key({**key, "images": dict(height=64, width=48, steps=2)})[0]
