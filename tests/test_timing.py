"""Shared timing: warm-up calls are never timed, configurations run in a shuffled order per round; eval follows it.

Fake clocks and call logs only: no real timing is asserted anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import tokenmerge as tm
from tokenmerge.harness import eval as ev
from tokenmerge.harness import timing
from tokenmerge.harness.registry import BASELINE, parse_method
from tokenmerge.harness.timing import Call, Schedule


def test_schedule_warms_up_untimed_then_shuffles_every_round() -> None:
    calls = Schedule(rounds=6, warmup=2, seed=3).calls(4)
    assert calls[:8] == [Call(i, None) for _ in range(2) for i in range(4)]
    assert not any(c.timed for c in calls[:8]) and all(c.timed for c in calls[8:])
    orders = [[c.config for c in calls[8:] if c.round == r] for r in range(6)]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)  # every configuration once per round
    assert len({tuple(o) for o in orders}) > 1  # not one fixed order
    assert {o[0] for o in orders} != {0}  # the first configuration (the baseline) does not always lead
    assert Schedule(rounds=6, warmup=2, seed=3).calls(4) == calls  # seeded: reproducible
    assert Schedule(rounds=6, warmup=2, seed=4).calls(4) != calls
    with pytest.raises(ValueError, match="rounds"):
        Schedule(rounds=0)


def test_timed_returns_result_and_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timing, "time_call", lambda run, device: (run(), 2.5)[1])
    assert timing.timed(lambda: "x", torch.device("cpu")) == ("x", 2.5)


def test_eval_warms_up_untimed_and_shuffles_configurations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every configuration's first call is an untimed warm-up; then each item runs every configuration once, in
    an order that changes between items; the speed-up is the ratio of the (fake) clock's medians."""
    log: list[tuple[str, str, int, bool]] = []  # (event, configuration, seed, inside the clock)
    current = ["baseline"]
    in_clock = [False]
    seconds = {"baseline": 4.0, "toma:ratio=0.5": 2.0, "todo:factor=2": 1.0}
    real_apply, real_remove = tm.apply, tm.remove

    def apply(pipe: Any, method: Any) -> Any:
        current[0] = "toma:ratio=0.5" if isinstance(method, tm.ToMA) else "todo:factor=2"
        return real_apply(pipe, method)

    def remove(pipe: Any) -> Any:
        current[0] = "baseline"
        return real_remove(pipe)

    def generate(pipe: Any, prompt: str, seed: int, cfg: ev.EvalConfig) -> Image.Image:
        log.append(("generate", current[0], seed, in_clock[0]))
        return Image.new("RGB", (16, 16), (seed, 0, 0))

    def clock(run: Any, device: torch.device) -> float:
        in_clock[0] = True
        try:
            run()
        finally:
            in_clock[0] = False
        log.append(("timed", current[0], -1, False))
        return seconds[current[0]]

    monkeypatch.setattr(tm, "apply", apply)
    monkeypatch.setattr(tm, "remove", remove)
    monkeypatch.setattr(ev, "_generate", generate)
    monkeypatch.setattr(timing, "time_call", clock)
    specs = [BASELINE, parse_method("toma:ratio=0.5"), parse_method("todo:factor=2")]
    cfg = ev.EvalConfig(prompts=["a", "b", "c"], seeds=[0, 1], steps=1)
    meta = dict(model="tiny-sd15")
    rows = ev.run_eval(lambda device: _tiny(), specs, cfg, tmp_path / "out", device="cpu", meta=meta, progress=False)

    warm, timed = log[:3], [e for e in log[3:] if e[0] == "generate"]
    assert [(c, inside) for _, c, _, inside in warm] == [(s.label, False) for s in specs]
    assert len(timed) == 6 * 3 and all(inside for *_, inside in timed)
    orders = [[c for _, c, _, _ in timed[3 * i : 3 * i + 3]] for i in range(6)]
    assert all(sorted(o) == sorted(seconds) for o in orders)
    assert len({tuple(o) for o in orders}) > 1
    assert [r["speedup"] for r in rows] == [1.0, 2.0, 4.0]
    shard = json.loads((tmp_path / "out" / "shards" / "rank000.json").read_text())
    assert shard["times"]["toma:ratio=0.5"] == [2.0] * 6


def _tiny() -> Any:
    from tokenmerge.archs import tiny_pipeline

    pipe = tiny_pipeline("tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    return pipe
