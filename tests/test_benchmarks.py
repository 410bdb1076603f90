"""The CPU benchmark scripts run end to end at tiny size and write well-formed results."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tokenmerge as tm
from tokenmerge.harness.models import denoiser_inputs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The GPU check's modules (they import their helpers, ``_common`` and ``gpu_models``, by name)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return SimpleNamespace(check=importlib.import_module("gpu_check"), models=importlib.import_module("gpu_models"))


def test_unet_benchmark_tiny(tmp_path: Path) -> None:
    out = tmp_path / "unet.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/unet_cpu.py"), "--arch", "tiny-sd15", "--size", "16"]
    cmd += ["--rounds", "1", "--configs", "toma-0.5", "tomesd-0.5", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    rows = {r["config"]: r for r in result["results"]}
    assert rows.keys() == {"baseline", "toma-0.5", "tomesd-0.5"}
    assert rows["baseline"]["speedup"] == 1.0 and rows["baseline"]["rel_l2_deviation"] == 0.0
    assert rows["toma-0.5"]["flop_ratio"] > 1.2 and rows["toma-0.5"]["rel_l2_deviation"] > 0
    assert result["meta"]["arch"] == "tiny-sd15" and "toma-0.5" in done.stdout


def test_gpu_check_cpu_smoke(tmp_path: Path, gpu: SimpleNamespace) -> None:
    """The GPU check's plumbing end to end on the CPU (``--tiny --device cpu``), through its shell entry: every method
    x every tiny pipeline runs, merges and is removed exactly; compile (dynamo) runs; the tiny denoisers are timed in
    every configuration; each JSON names the device."""
    env = {**os.environ, "PYTHON": sys.executable, "WHEELS": str(tmp_path / "no-wheels")}
    env["OMP_NUM_THREADS"] = "1"  # tiny models gain nothing from a second thread, which spin-waits on a busy machine
    cmd = ["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--tiny", "--device", "cpu", "--rounds", "1"]
    done = subprocess.run([*cmd, "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "all ok" in done.stdout, done.stdout[-3000:]
    pipelines = json.loads((tmp_path / "gpu_pipelines.json").read_text())
    assert pipelines["meta"]["device_type"] == "cpu" and pipelines["meta"]["device"] and pipelines["dtype"] == "float32"
    rows = pipelines["results"]
    assert {(r["model"], r["config"]) for r in rows} == {
        (m, c) for m in gpu.check.PIPELINES for c in ("toma", "toma-tokens-0.5", "tomesd", "catome", "todo")
    }
    assert all(r["ok"] and r["remove_exact"] and r["merged_calls"] > 0 for r in rows), rows
    assert all(r["kernels"] == {"torch": r["kernels"]["torch"]} for r in rows if r["config"].startswith("toma"))
    assert {(r["model"], r["mode"]) for r in pipelines["compiled"]} == {
        ("tiny-sd15", "default"),
        ("tiny-flux", "default"),
    }
    assert all(r["ok"] and r["rel_l2_vs_eager"] < 1e-5 for r in pipelines["compiled"]), pipelines["compiled"]
    models = json.loads((tmp_path / "gpu_models.json").read_text())
    assert models["complete"] and models["meta"]["tiny"] and not (tmp_path / "gpu_kernels.json").exists()
    by = {(r["model"], r["batch"], r["config"]): r for r in models["results"]}
    configs = list(gpu.models.methods())  # flash: CUDA only
    assert by.keys() == {(m, b, c) for m, batches in gpu.models.BATCHES.items() for b in batches for c in configs}
    for (*_, config), row in by.items():
        assert "error" not in row and math.isfinite(row["median_s"]) and row["median_s"] > 0, row
        assert (row["speedup"] == 1.0) == config.startswith("baseline")
        assert ("overhead" in row) == (config.split("@")[0] in gpu.models.OVERHEAD), row
    assert {(t["model"], t["batch"]) for t in models["targets"]} == {("sdxl", 2), ("flux", 1)}
    assert any("flash configurations skipped" in note for note in models["notes"])


def test_gpu_models_record_failures_and_go_on(gpu: SimpleNamespace) -> None:
    device = torch.device("cpu")
    model = gpu.models.build_model("tiny-flux", device, torch.float32)
    inputs = denoiser_inputs(model, 1, 8, 8, text=4)
    configs = [
        gpu.models.Config("baseline", None),
        gpu.models.Config("toma", tm.ToMA(ratio=0.5, blocks={"double": (0, 9)})),  # out of range: apply raises
        gpu.models.Config("tomesd", tm.ToMeSD(ratio=0.5, blocks=gpu.models.FLUX_ALL)),
    ]
    rows = {r["config"]: r for r in gpu.models.bench_group(model, inputs, configs, device, rounds=1)}
    assert rows["toma"]["error"].startswith("ValueError") and "median_s" not in rows["toma"]
    assert "error" not in rows["tomesd"] and 0 < rows["tomesd"]["overhead_share"] < 1
    assert not hasattr(model, "_tokenmerge") and "plan" not in vars(configs[2].method)


def test_gpu_check_records_a_failing_method_and_goes_on(gpu: SimpleNamespace) -> None:
    """A method that raises in part (a) gets a row with its error; the pipeline is left unpatched and exact."""
    pipe = gpu.check.load("tiny-sd15", torch.device("cpu"), torch.float32)
    base = gpu.check.generate(pipe, 1, 16)
    row = gpu.check.check_method(pipe, "bad", tm.ToMA(blocks={"double": (0, 1)}), base, 1, 16)
    assert not row["ok"] and row["error"].startswith("ValueError") and row["remove_exact"]


def test_gpu_check_bad_input() -> None:
    script = str(ROOT / "benchmarks/gpu_check.py")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "benchmarks")}
    done = subprocess.run([sys.executable, script, "--parts", "nope"], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "invalid choice: 'nope'" in done.stderr
    if not torch.cuda.is_available():
        done = subprocess.run([sys.executable, script, "--parts", "models"], capture_output=True, text=True, env=env)
        assert done.returncode == 2 and "need a CUDA GPU" in done.stderr


def test_gpu_models_build_in_dtype(gpu: SimpleNamespace) -> None:
    model = gpu.models.build_model("tiny-flux", torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and not model.training
    assert torch.get_default_dtype() == torch.float32
