"""Loading what the harness measures: a diffusers pipeline (hub id or local folder), a denoiser saved alone in a
folder, or a built-in architecture with random weights; and random inputs for a bare denoiser call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tokenmerge.harness.registry import HarnessError

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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_pipeline(name_or_path: str, dtype: torch.dtype) -> Any:
    """``DiffusionPipeline.from_pretrained`` of a hub id or local folder, progress bars off."""
    from diffusers import DiffusionPipeline

    if looks_like_path(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise HarnessError(f"model path {name_or_path!r} does not exist")
    try:
        pipe = DiffusionPipeline.from_pretrained(str(Path(name_or_path).expanduser()), torch_dtype=dtype)
    except (OSError, ValueError, TypeError) as exc:
        raise HarnessError(f"cannot load pipeline {name_or_path!r}: {_first_line(exc)}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
    try:
        return getattr(diffusers, cls_name).from_pretrained(str(Path(path).expanduser()), torch_dtype=dtype).eval()
    except (OSError, ValueError, TypeError) as exc:
        raise HarnessError(f"cannot load {cls_name} from {path!r}: {_first_line(exc)}") from None


def denoiser_inputs(
    model: torch.nn.Module, batch: int, height: int, width: int, seed: int = 0, text: int = 16
) -> dict[str, Any]:
    """Random keyword inputs for one call of a UNet, Flux, SD3 or PixArt denoiser on a ``height x width`` latent
    (Flux: the packed token grid), with ``text`` text tokens (UNets: always 77)."""
    from tokenmerge.archs import unet_inputs

    kind = type(model).__name__
    if kind == "UNet2DConditionModel":
        return unet_inputs(model, batch, height, width, seed=seed)
    cfg, dtype = model.config, model.dtype
    g = torch.Generator().manual_seed(seed)
    timestep = torch.full((batch,), 500.0 if kind != "FluxTransformer2DModel" else 0.5)
    if kind == "FluxTransformer2DModel":
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
        inputs: dict[str, Any] = dict(
            hidden_states=torch.randn(batch, height * width, cfg.in_channels, generator=g).to(dtype),
            encoder_hidden_states=torch.randn(batch, text, cfg.joint_attention_dim, generator=g).to(dtype),
            pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(dtype),
            timestep=timestep.to(dtype),
            img_ids=img_ids,
            txt_ids=torch.zeros(text, 3),
        )
        if cfg.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), 3.5).to(dtype)
        return inputs
    sample = torch.randn(batch, cfg.in_channels, height, width, generator=g).to(dtype)
    if kind == "SD3Transformer2DModel":
        return dict(
            hidden_states=sample,
            encoder_hidden_states=torch.randn(batch, text, cfg.joint_attention_dim, generator=g).to(dtype),
            pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(dtype),
            timestep=timestep,
        )
    if kind == "PixArtTransformer2DModel":
        return dict(
            hidden_states=sample,
            encoder_hidden_states=torch.randn(batch, text, cfg.caption_channels, generator=g).to(dtype),
            timestep=timestep,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )
    raise HarnessError(f"no input builder for {kind}; supported: {', '.join(DENOISERS)}")
