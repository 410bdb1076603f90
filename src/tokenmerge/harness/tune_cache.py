"""The cache of :func:`tokenmerge.harness.tune.tune`: a JSON file per (setup, goal) that a user can commit and load.

A result is valid only where it was measured, so its file holds a *key*:

- ``model``: the denoiser's class, a hash of its config, a hash of a sample of its weights (the first 256 values of
  every tensor, and each tensor's name, shape and dtype) and its ``_name_or_path``;
- ``images``: height and width (of the images generated), steps, the number of calibration images;
- ``device`` (its name: the GPU model, or ``cpu``), ``dtype``;
- ``versions`` of torch, diffusers and tokenmerge;
- ``goal``: the target speed-up, ``min_fidelity``, the metric and the methods searched.

:func:`load_tuned` checks everything it can see on the pipeline (model, device, dtype, versions; resolution and
steps when given) and refuses a file that differs, naming the differences.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import tokenmerge as tm
from tokenmerge.errors import HarnessError
from tokenmerge.patch import find_denoiser

logger = logging.getLogger(__name__)

#: Format of the cache files; a file of another version is re-measured (tune) or refused (load_tuned).
FORMAT = 1
#: Weights sampled per tensor for the model fingerprint.
SAMPLE = 256


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def model_fingerprint(target: Any) -> dict[str, Any]:
    """Class, config hash, sampled-weights hash and ``_name_or_path`` of ``target``'s denoiser."""
    denoiser = find_denoiser(target)
    config = dict(getattr(denoiser, "config", {}) or {})
    name = config.pop("_name_or_path", None) or None
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    weights = hashlib.sha256()
    with torch.no_grad():
        for pname, tensor in [*denoiser.named_parameters(), *denoiser.named_buffers()]:
            weights.update(f"{pname}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            sample = tensor.detach().flatten()[:SAMPLE].to("cpu", torch.float64)
            weights.update(sample.numpy().tobytes())
    return dict(
        cls=f"{type(denoiser).__module__}.{type(denoiser).__qualname__}",
        config=_sha(json.dumps(config, sort_keys=True, default=str).encode()),
        weights=weights.hexdigest()[:16],
        name_or_path=name,
    )


def device_name(device: torch.device) -> str:
    """The GPU's model name, or ``cpu`` with the processor's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


def versions() -> dict[str, str]:
    import diffusers

    return dict(torch=torch.__version__, diffusers=diffusers.__version__, tokenmerge=tm.__version__)


def environment_key(target: Any) -> dict[str, Any]:
    """What the pipeline itself says about the setup: model, device, dtype, library versions."""
    param = next(find_denoiser(target).parameters())
    return dict(
        model=model_fingerprint(target), device=device_name(param.device), dtype=str(param.dtype), versions=versions()
    )


def cache_key(runner: Any, goal: Any, selection: Any) -> dict[str, Any]:
    """The full key of a tuning run: :func:`environment_key`, the image settings and the goal."""
    from tokenmerge.harness.sweep import SWEEPS

    images = runner.images
    height, width = images.height, images.width
    if height is None or width is None:  # the pipeline's default size
        height, width = _default_size(runner.target, height, width)
    return dict(
        format=FORMAT,
        **environment_key(runner.target),
        images=dict(height=height, width=width, steps=images.steps, count=len(images.prompts)),
        goal=dict(
            speedup=goal.speedup,
            min_fidelity=goal.min_fidelity,
            metric=goal.metric.name,
            methods=selection.chosen() if selection is not None else list(SWEEPS),
        ),
    )


def _default_size(pipe: Any, height: int | None, width: int | None) -> tuple[int | None, int | None]:
    size = getattr(pipe, "size", None)  # the reference pipelines
    if size is None and hasattr(pipe, "default_sample_size") and hasattr(pipe, "vae_scale_factor"):
        size = pipe.default_sample_size * pipe.vae_scale_factor
    return height or size, width or size


def cache_path(cache: str | Path, key: dict[str, Any]) -> Path:
    """``cache`` itself when it names a ``.json`` file, else ``cache/tune-<model class>-<key hash>.json``."""
    path = Path(cache).expanduser()
    if path.suffix == ".json":
        return path
    cls = key["model"]["cls"].rpartition(".")[2]
    return path / f"tune-{cls}-{_sha(json.dumps(key, sort_keys=True).encode())}.json"


def check_cache(cache: str | Path) -> None:
    """A :class:`HarnessError`, before anything is measured, when a result could not be written to ``cache`` (a
    folder, or a ``.json`` file)."""
    from tokenmerge.harness.report import check_writable

    path = Path(cache).expanduser()
    try:
        check_writable(path if path.suffix == ".json" else path / "tune.json")
    except HarnessError as exc:
        raise HarnessError(f"--cache / cache=: {exc}") from None


def differences(have: dict[str, Any], want: dict[str, Any], prefix: str = "") -> list[str]:
    """``"path: file value vs this value"`` for every leaf of ``want`` that ``have`` holds differently."""
    out = []
    for k, v in want.items():
        h = have.get(k) if isinstance(have, dict) else None
        if isinstance(v, dict) and isinstance(h, dict):
            out += differences(h, v, f"{prefix}{k}.")
        elif h != v:
            out.append(f"{prefix}{k}: {h!r} in the file vs {v!r} here")
    return out


def write(path: Path, result: Any) -> None:
    """Write ``result`` (a :class:`tokenmerge.harness.tune.TuneResult`) as JSON, atomically."""
    from tokenmerge.harness.tune import method_record

    name, options = method_record(result.method)
    data = dict(
        key=result.key,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        goal=result.goal,
        reached=result.reached,
        pick=dict(
            method=name, options=options, label=result.label, speedup=_num(result.speedup), scores=_nums(result.scores)
        ),
        reason=result.reason,
        fastest=list(result.fastest) if result.fastest else None,
        front=result.front,
        elapsed_s=round(result.elapsed_s, 3),
        trials=[dict(asdict(t), speedup=_num(t.speedup), scores=_nums(t.scores)) for t in result.trials],
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def _num(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)  # inf / nan as strings: strict JSON


def _nums(scores: dict[str, float]) -> dict[str, float | str]:
    return {k: _num(v) for k, v in scores.items()}


def read(path: str | Path) -> Any:
    """The :class:`tokenmerge.harness.tune.TuneResult` stored in ``path``."""
    from tokenmerge.harness.tune import Trial, TuneResult, method_from_record

    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text())
        pick = data["pick"]
        method = method_from_record(pick["method"], pick["options"]) if pick["method"] else None
        trials = [
            Trial(**dict(t, speedup=float(t["speedup"]), scores={k: float(v) for k, v in t["scores"].items()}))
            for t in data["trials"]
        ]
        return TuneResult(
            goal=data["goal"],
            reached=data["reached"],
            method=method,
            label=pick["label"],
            speedup=float(pick["speedup"]),
            scores={k: float(v) for k, v in pick["scores"].items()},
            reason=data["reason"],
            front=data["front"],
            trials=trials,
            key=data["key"],
            elapsed_s=data["elapsed_s"],
            fastest=tuple(data["fastest"]) if data["fastest"] else None,
            from_cache=True,
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise HarnessError(f"{path} is not a tokenmerge tune result: {exc}") from None


def read_matching(path: Path, key: dict[str, Any]) -> Any | None:
    """The result in ``path`` if its key is ``key``; ``None`` (with a log line naming the differences) otherwise."""
    if not path.is_file():
        return None
    try:
        result = read(path)
    except HarnessError as exc:
        logger.warning("tune: ignoring the cache file: %s", exc)
        return None
    diff = differences(result.key, key)
    if diff:
        logger.warning("tune: %s was tuned for another setup (%s): tuning again", path, "; ".join(diff))
        return None
    return result


def load_tuned(
    path: str | Path,
    pipe: Any,
    *,
    apply: bool = True,
    speedup: float | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
) -> Any:
    """The tuned result stored at ``path`` (a file, or a folder of them) for ``pipe``, applied to it unless
    ``apply=False``. Refuses (:class:`HarnessError`, naming the differences) a result measured on another model,
    device, dtype or library versions, or with other ``height`` / ``width`` / ``steps`` / ``speedup`` when given."""
    path = Path(path).expanduser()
    want = environment_key(pipe)
    images = {k: v for k, v in dict(height=height, width=width, steps=steps).items() if v is not None}
    if images:
        want["images"] = images
    if speedup is not None:
        want["goal"] = dict(speedup=speedup)
    want["format"] = FORMAT
    if path.is_dir():
        files = sorted(path.glob("tune-*.json"))
        if not files:
            raise HarnessError(f"no tune-*.json result in {path}")
        matching = [(f, r) for f, r in ((f, read(f)) for f in files) if not differences(r.key, want)]
        if not matching:
            diff = differences(read(files[0]).key, want)
            raise HarnessError(
                f"no result in {path} was tuned for this setup (e.g. {files[0].name}: {'; '.join(diff)})"
            )
        if len(matching) > 1:
            targets = sorted(str(r.goal.get("speedup")) for _, r in matching)
            raise HarnessError(
                f"{len(matching)} results in {path} fit this pipeline (speedups {', '.join(targets)}): give speedup="
            )
        result = matching[0][1]
    elif path.is_file():
        result = read(path)
        diff = differences(result.key, want)
        if diff:
            raise HarnessError(f"{path} was tuned for another setup: {'; '.join(diff)}; run tm.tune again")
    else:
        raise HarnessError(f"no tuned result at {path}")
    if apply:
        result.apply(pipe)
    return result


def describe_key(key: dict[str, Any]) -> Sequence[str]:
    """Lines for a report: the setup a result holds for."""
    m, i = key["model"], key["images"]
    size = f"{i['height']}x{i['width']}" if i["height"] and i["width"] else "the pipeline's default size"
    return [
        f"model {m['cls'].rpartition('.')[2]} ({m['name_or_path'] or 'weights ' + m['weights']}), "
        f"{size}, {i['steps']} steps, {key['device']}, {key['dtype']}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in key["versions"].items()),
    ]
