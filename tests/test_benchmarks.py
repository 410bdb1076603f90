"""The CPU benchmark scripts run end to end at tiny size and write well-formed results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
