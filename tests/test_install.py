"""The slim install: the core (``tokenmerge.apply`` / ``remove`` and the methods) needs torch and diffusers only, and
the command line says in one line that it needs the ``harness`` extra when one of its modules is missing.

A missing package is simulated in a subprocess by a ``sitecustomize`` that hides it from every import finder (so
``importlib.util.find_spec`` answers ``None`` and ``import`` raises ``ModuleNotFoundError``, as when it is not
installed); no virtual environment is created.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from packaging.requirements import Requirement

from tokenmerge.cli import HARNESS_MODULES, INSTALL_HARNESS

#: Packages only the harness extra installs (the rest of it, e.g. numpy, Pillow, tqdm, come with diffusers).
HARNESS_ONLY = ("transformers", "accelerate", "torchmetrics", "matplotlib", "psutil")
#: Test-extra packages that need transformers, so a slim install cannot have them (diffusers imports peft if present).
NEED_TRANSFORMERS = ("peft",)

HIDE = """
import sys

HIDDEN = set({hidden!r})


class Hidden:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [Hidden(finder) for finder in sys.meta_path]
"""


def _without(tmp_path: Path, hidden: tuple[str, ...]) -> dict[str, str]:
    """Environment of a subprocess in which ``hidden`` top-level packages cannot be imported."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE.format(hidden=list(hidden)))
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")


def test_dependencies_core_and_harness_extra() -> None:
    """pyproject.toml: torch and diffusers for the core; the harness extra holds what the CLI checks for."""
    requirements = [Requirement(r) for r in importlib.metadata.requires("tokenmerge") or []]
    core = {r.name.lower() for r in requirements if r.marker is None}
    assert core == {"torch", "diffusers"}

    def extra(name: str) -> list[Requirement]:
        return [r for r in requirements if r.marker is not None and r.marker.evaluate({"extra": name})]

    module = {"pillow": "PIL"}
    assert {module.get(r.name.lower(), r.name.lower()) for r in extra("harness")} == set(HARNESS_MODULES)
    assert any(r.name == "tokenmerge" and "harness" in r.extras for r in extra("test"))


def test_core_runs_without_harness_packages(tmp_path: Path) -> None:
    """Every method applies, runs and is removed exactly with no harness package importable, and none is imported."""
    script = textwrap.dedent(
        """
        import sys

        import torch

        import tokenmerge as tm
        from tokenmerge.archs import build_unet, unet_inputs

        unet = build_unet("tiny-sd15")
        inputs = unet_inputs(unet, 2, 16, 16)
        with torch.no_grad():
            base = unet(**inputs).sample
            for method in (tm.ToMA(0.5), tm.ToMeSD(0.5), tm.CAToMe(0.5), tm.ToDo(2)):
                tm.apply(unet, method)
                merged = unet(**inputs).sample
                tm.remove(unet)
                assert not torch.equal(merged, base), method
                assert torch.equal(unet(**inputs).sample, base), method
        loaded = sorted({m.partition(".")[0] for m in sys.modules} & {HIDDEN} | {
            m for m in sys.modules if m.startswith(("tokenmerge.harness", "tokenmerge.analysis", "tokenmerge.cli"))
        })
        print("loaded:", loaded)
        """
    ).replace("{HIDDEN}", repr(set(HARNESS_ONLY)))
    env = _without(tmp_path, HARNESS_ONLY + NEED_TRANSFORMERS)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "loaded: []"


def test_cli_without_harness_extra_says_so_in_one_line(tmp_path: Path) -> None:
    """The console script starts, prints one line naming the extra and exits with 2; ``list`` (the core's registry
    only) still works."""
    env = _without(tmp_path, ("matplotlib", "torchmetrics"))
    script = Path(sys.executable).with_name("tokenmerge")
    assert script.is_file(), "the tokenmerge console script is not installed next to this Python"
    out = tmp_path / "bench"
    argv = ["bench", "--arch", "tiny-sd15", "--method", "toma", "--rounds", "1", "--latent", "8", "--device", "cpu"]
    proc = subprocess.run([str(script), *argv, "--out", str(out)], capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"tokenmerge: error: the command line needs the harness extra (torchmetrics, matplotlib missing): "
        f"{INSTALL_HARNESS}"
    ], proc.stderr[-3000:]
    assert not out.exists()
    listing = subprocess.run([str(script), "list"], capture_output=True, text=True, env=env, timeout=180)
    assert listing.returncode == 0 and "toma:" in listing.stdout, listing.stderr[-3000:]
