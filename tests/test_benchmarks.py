"""The CPU benchmark scripts run end to end at tiny size and write well-formed results."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

import tokenmerge as tm
from tokenmerge.harness.models import denoiser_inputs

ROOT = Path(__file__).resolve().parents[1]


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


def run_gpu_benchmark(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu.json"
    cmd = [sys.executable, str(ROOT / "benchmarks/gpu.py"), "--tiny", "--device", "cpu", "--rounds", "1", *args]
    done = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done, json.loads(out.read_text())


def test_gpu_benchmark_tiny(tmp_path: Path) -> None:
    done, result = run_gpu_benchmark(tmp_path, "--no-compile")
    meta = result["meta"]
    assert result["complete"] and meta["tiny"] and meta["dtype"] == "float32" and meta["gpu"] is None
    assert {"torch", "diffusers", "date", "machine", "wall_s"} <= meta.keys()
    assert any("flash-attn configurations skipped" in note for note in meta["notes"])
    rows = {(r["model"], r["batch"], r["config"]): r for r in result["results"]}
    configs = ("baseline", "toma-0.5", "tomesd-0.5", "todo-2")
    sdxl_only = {("sdxl", b, "toma-kv-0.5") for b in (1, 2)}  # ToMA's default on UNets; on Flux toma-0.5 is
    assert rows.keys() == {(m, b, c) for m in ("sdxl", "flux") for b in (1, 2) for c in configs} | sdxl_only
    for (*_, config), row in rows.items():
        assert "error" not in row, row
        assert math.isfinite(row["median_s"]) and row["median_s"] > 0 and row["mode"] == "eager"
        assert (row["speedup"] == 1.0) == (config == "baseline")
        assert (row["rel_l2_deviation"] > 0) == (config != "baseline")
        if config in ("toma-0.5", "tomesd-0.5"):
            overhead = row["overhead"]
            assert 0 < row["overhead_share"] < 1
            assert overhead["plan_calls"] > 0 and overhead["merge_calls"] == overhead["unmerge_calls"] > 0
            assert overhead["plan_s"] > 0 and overhead["merge_s"] > 0 and overhead["unmerge_s"] > 0
        elif config == "toma-kv-0.5":
            overhead = row["overhead"]
            assert 0 < row["overhead_share"] < 1 and "merge_s" not in overhead
            assert overhead["plan_calls"] > 0 and overhead["kv_calls"] > 0 and overhead["kv_s"] > 0
        else:
            assert "overhead" not in row
    # ToMA merges 3 sub-modules per UNet block and 1 per Flux block (attention; single-stream: a span)
    unet, flux = rows["sdxl", 1, "toma-0.5"]["overhead"], rows["flux", 2, "toma-0.5"]["overhead"]
    assert unet["merge_calls"] == 3 * unet["plan_calls"] and flux["merge_calls"] == flux["plan_calls"]
    targets = {(t["model"], t["batch"]): t for t in result["targets"]}
    assert targets.keys() == {(m, b) for m in ("sdxl", "flux") for b in (1, 2)}
    assert targets["flux", 1]["toma_speedup"] == rows["flux", 1, "toma-0.5"]["speedup"]
    assert targets["flux", 1]["compiled_ok"] is None
    assert "overhead_share" in done.stdout and "tiny-flux, batch 2" in done.stdout


def test_gpu_benchmark_tiny_compiled(tmp_path: Path) -> None:
    _, result = run_gpu_benchmark(tmp_path, "--models", "sdxl", "--batches", "1", "--configs", "baseline@compiled")
    rows = {r["config"]: r for r in result["results"]}
    assert rows.keys() == {"baseline", "baseline@compiled"}
    compiled = rows["baseline@compiled"]
    assert compiled["mode"] == "compiled" and "error" not in compiled, compiled
    assert math.isfinite(compiled["median_s"]) and compiled["compile_s"] > 0 and compiled["compile_calls"] >= 1
    assert compiled["rel_l2_vs_eager"] < 1e-4 and compiled["speedup"] == 1.0


def test_gpu_benchmark_records_failures_and_goes_on(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    gpu = importlib.import_module("gpu")
    device = torch.device("cpu")
    model = gpu.build_model("tiny-flux", device, torch.float32)
    inputs = denoiser_inputs(model, 1, 8, 8, text=4)
    configs = [
        gpu.Config("baseline", None),
        gpu.Config("toma-0.5", tm.ToMA(ratio=0.5, blocks={"double": (0, 9)})),  # out of range: apply raises
        gpu.Config("tomesd-0.5", tm.ToMeSD(ratio=0.5, blocks=gpu.FLUX_ALL)),
    ]
    rows = {r["config"]: r for r in gpu.bench_group(model, inputs, configs, device, rounds=1)}
    assert rows["toma-0.5"]["error"].startswith("ValueError") and "median_s" not in rows["toma-0.5"]
    assert "error" not in rows["tomesd-0.5"] and 0 < rows["tomesd-0.5"]["overhead_share"] < 1
    assert not hasattr(model, "_tokenmerge") and "plan" not in vars(configs[2].method)


def test_gpu_benchmark_bad_input() -> None:
    script = str(ROOT / "benchmarks/gpu.py")
    done = subprocess.run([sys.executable, script, "--tiny", "--configs", "nope"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown configurations ['nope']" in done.stderr
    if not torch.cuda.is_available():
        done = subprocess.run([sys.executable, script, "--models", "sdxl"], capture_output=True, text=True)
        assert done.returncode == 2 and "need a CUDA GPU" in done.stderr


def test_gpu_benchmark_builds_in_dtype(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    gpu = importlib.import_module("gpu")
    model = gpu.build_model("tiny-flux", torch.device("cpu"), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and not model.training
    assert torch.get_default_dtype() == torch.float32
