"""Loading what the harness measures: a diffusers pipeline (hub id or local folder), a denoiser saved alone in a
folder, or a built-in architecture with random weights; and random inputs for a bare denoiser call."""

from __future__ import annotations

import contextlib
import inspect
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tokenmerge.adapters.base import CallShape
from tokenmerge.errors import HarnessError, describe
from tokenmerge.patch import adapter_for

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DENOISERS = ("UNet2DConditionModel", "FluxTransformer2DModel", "SD3Transformer2DModel", "PixArtTransformer2DModel")


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HarnessError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError(f"device {name!r} requested but CUDA is not available")
    return device


def looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1 or "\\" in name


def _load_errors() -> tuple[type[BaseException], ...]:
    """What diffusers, transformers, safetensors and torch raise on model files they cannot read: missing or
    malformed files and configs, unknown classes, mismatched shapes, packages a component needs."""
    from safetensors import SafetensorError

    return (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError, ImportError, SafetensorError)


@contextlib.contextmanager
def _loading(what: str, name_or_path: str) -> Iterator[None]:
    """Turn load errors into one :class:`HarnessError` naming ``what`` and ``name_or_path``; quiet diffusers'
    warnings while loading (the hub fallback notice, the ``torch_dtype`` deprecation: the call stays valid for
    diffusers 0.32 on)."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.* is deprecated", category=FutureWarning)
            yield
    except _load_errors() as exc:
        local = "" if Path(name_or_path).expanduser().exists() else " (no such folder; tried as a hub id)"
        raise HarnessError(f"cannot load {what} {name_or_path!r}{local}: {describe(exc)}") from exc
    finally:
        diffusers_logging.set_verbosity(verbosity)


def load_pipeline(name_or_path: str, dtype: torch.dtype) -> Any:
    """``DiffusionPipeline.from_pretrained`` of a hub id or local folder, progress bars off."""
    from diffusers import DiffusionPipeline

    if looks_like_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise HarnessError(f"model path {name_or_path!r} does not exist")
    with _loading("pipeline", name_or_path):
        pipe = DiffusionPipeline.from_pretrained(str(Path(name_or_path).expanduser()), torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image_multiple(pipe: Any) -> int:
    """What image sides must be a multiple of: the VAE's downscale times the denoiser's patch (Flux packs 2x2
    latents; SD3 and PixArt: ``config.patch_size``; UNets: 1)."""
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    patch = getattr(getattr(denoiser, "config", None), "patch_size", None) or 1
    patch = 2 if type(denoiser).__name__.startswith("Flux") else patch
    return int(getattr(pipe, "vae_scale_factor", 1)) * int(patch)


def _default_side(pipe: Any) -> int | None:
    """The side of the pipeline's default image (what its call uses without ``height`` / ``width``)."""
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    sample = getattr(pipe, "default_sample_size", None) or getattr(getattr(denoiser, "config", None), "sample_size", 0)
    sample = sample[0] if isinstance(sample, list | tuple) else sample
    return int(sample) * int(getattr(pipe, "vae_scale_factor", 1)) or None


def check_image_size(pipe: Any, height: int | None, width: int | None) -> None:
    """:class:`HarnessError` naming the option when ``pipe`` cannot make ``height x width`` images, before anything
    is generated: each given side must be a multiple of :func:`image_multiple` (Flux would silently resize), and
    the size must pass the pipeline's own ``check_inputs`` (SD and PixArt ask for multiples of 8 whatever the VAE)."""
    if height is None and width is None:
        return
    multiple = image_multiple(pipe)
    for option, value in (("height", height), ("width", width)):
        if value is not None and value % multiple:
            nearest = max(multiple, value - value % multiple)
            raise HarnessError(
                f"--{option} {value}: {type(pipe).__name__} takes multiples of {multiple} "
                f"(VAE downscale x patch), e.g. {nearest}"
            )
    check = getattr(pipe, "check_inputs", None)
    params = inspect.signature(check).parameters if callable(check) else {}
    if not {"prompt", "height", "width"} <= params.keys():
        return
    empty, named = inspect.Parameter.empty, (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    defaults: dict[str, Any] = {}  # what the call passes them by default (a subclass' defaults first)
    for cls in reversed(type(pipe).__mro__):
        if "__call__" in vars(cls) and cls is not object:
            call = inspect.signature(vars(cls)["__call__"]).parameters
            defaults.update({n: p.default for n, p in call.items() if p.default is not empty})
    kwargs: dict[str, Any] = {n: defaults.get(n) for n, p in params.items() if p.default is empty and p.kind in named}
    side = _default_side(pipe)
    kwargs.update(prompt="", height=height or side or width, width=width or side or height)
    try:
        check(**kwargs)
    except ValueError as exc:
        given = " ".join(f"--{k} {v}" for k, v in dict(height=height, width=width).items() if v is not None)
        raise HarnessError(f"{given}: {describe(exc)}") from exc
    except TypeError:  # a check that needs more than a prompt and a size: the pipeline's call still runs it
        return


def saved_denoiser_class(path: str) -> str | None:
    """The diffusers class name of a denoiser saved alone in folder ``path`` (``config.json``), else ``None``."""
    config = Path(path).expanduser() / "config.json"
    if not config.is_file() or (Path(path).expanduser() / "model_index.json").exists():
        return None
    try:
        name = json.loads(config.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HarnessError(f"malformed config file {config}") from None
    return name if name in DENOISERS else None


def load_denoiser(path: str, dtype: torch.dtype) -> torch.nn.Module:
    """A denoiser saved alone in a folder (``save_pretrained``), loaded with its class' ``from_pretrained``."""
    import diffusers

    cls_name = saved_denoiser_class(path)
    if cls_name is None:
        raise HarnessError(f"{path!r} holds no saved denoiser ({', '.join(DENOISERS)})")
    with _loading(cls_name, path):
        return getattr(diffusers, cls_name).from_pretrained(str(Path(path).expanduser()), torch_dtype=dtype).eval()


def denoiser_inputs(
    model: torch.nn.Module, batch: int, height: int, width: int, seed: int = 0, text: int = 16
) -> dict[str, Any]:
    """Random keyword inputs for one call of a UNet, Flux, SD3 or PixArt denoiser on a ``height x width`` latent
    (Flux: the packed token grid), with ``text`` text tokens (UNets: always 77)."""
    try:
        adapter = adapter_for(model)
    except ValueError:
        raise HarnessError(f"no input builder for {type(model).__name__}; supported: {', '.join(DENOISERS)}") from None
    text = 77 if adapter.family == "unet" else text
    generator = torch.Generator().manual_seed(seed)
    return adapter.example_inputs(CallShape(batch, (height, width), text), generator, dtype=model.dtype)
