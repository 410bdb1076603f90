"""The two reference models: configs, the word-level text encoder, and fp16 safetensors save/load.

- ``unet``: a pixel-space ``UNet2DConditionModel`` laid out like SD 1.5 on 64x64 images: self- and cross-attention
  at the top level (64x64 = 4096 tokens, the token count of SD 1.5 at 512px), at 32x32 and at 16x16, a plain 8x8
  level and a cross-attention mid block at 8x8; v-prediction.
- ``flux``: a ``FluxTransformer2DModel`` on 2x2-packed pixels (12 channels, 32x32 = 1024 image tokens), rotary
  positions, 4 double- and 8 single-stream blocks, flow matching.

Each file ``<name>.safetensors`` holds the denoiser (``denoiser.*``) and its text encoder (``text_encoder.*``) in
fp16; its metadata holds the configs and the vocabulary as JSON, so a file is self-describing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenmerge.reference.data import IMAGE_SIZE, MAX_TOKENS, VOCAB

WEIGHTS = Path(__file__).parent / "weights"
MODELS = ("unet", "flux")
TEXT_DIM = 64

CONFIGS: dict[str, dict[str, Any]] = {
    "unet": dict(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=(1, 2, 4, 4),  # diffusers' UNet reads this as the number of heads: 32 channels each
        norm_num_groups=8,
    ),
    "flux": dict(
        patch_size=1,
        in_channels=12,  # 2x2-packed RGB
        num_layers=4,
        num_single_layers=8,
        attention_head_dim=32,
        num_attention_heads=3,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    ),
}


class TextEncoder(nn.Module):
    """Word ids ``(B, L)`` -> token states ``(B, L, dim)`` and a pooled vector ``(B, dim)`` (their mean): embedding
    plus learned position, one pre-norm transformer layer (4 heads, MLP ``2 dim``; no padding mask, so the all-padding
    null prompt is an ordinary input), LayerNorm. The layer lets each word see the others, so that a shape word
    carries its colour (``"red circle and blue square"``) before the denoiser reads it."""

    def __init__(self, vocab_size: int = len(VOCAB), dim: int = TEXT_DIM, max_tokens: int = MAX_TOKENS) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.zeros(max_tokens, dim))
        self.mix = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(self.mix(self.token(ids) + self.position[: ids.shape[1]]))
        return h, h.mean(1)


def build(name: str, seed: int = 0, **overrides: Any) -> tuple[nn.Module, TextEncoder]:
    """A freshly initialised (seeded) denoiser of reference model ``name`` (config ``overrides`` applied) and its
    text encoder, in train mode."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    if name not in MODELS:
        raise ValueError(f"unknown reference model {name!r}; choose from {', '.join(MODELS)}")
    config = {**CONFIGS[name], **overrides}
    torch.manual_seed(seed)
    cls = UNet2DConditionModel if name == "unet" else FluxTransformer2DModel
    denoiser = cls(**config)
    text_dim = config["cross_attention_dim"] if name == "unet" else config["joint_attention_dim"]
    return denoiser, TextEncoder(dim=text_dim)


def save(path: Path, name: str, denoiser: nn.Module, text_encoder: TextEncoder, info: dict[str, Any]) -> None:
    """Write ``denoiser`` and ``text_encoder`` as fp16 safetensors; configs, vocabulary and ``info`` as metadata."""
    from safetensors.torch import save_file

    tensors = {f"denoiser.{k}": v for k, v in denoiser.state_dict().items()}
    tensors |= {f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()}
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in tensors.items()}
    config = {k: v for k, v in dict(denoiser.config).items() if not k.startswith("_")}
    meta = dict(model=name, config=config, text_dim=text_encoder.token.embedding_dim, vocab=list(VOCAB), **info)
    save_file(tensors, str(path), metadata={"tokenmerge": json.dumps(meta)})


def read_metadata(path: Path) -> dict[str, Any]:
    """The JSON metadata of a reference-model file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["tokenmerge"])


def weights_path(name: str) -> Path:
    if name not in MODELS:
        raise ValueError(f"unknown reference model {name!r}; choose from {', '.join(MODELS)}")
    return WEIGHTS / f"{name}.safetensors"


def load(name: str, path: Path | None = None) -> tuple[nn.Module, TextEncoder, dict[str, Any]]:
    """Denoiser and text encoder of reference model ``name`` from its fp16 file (default: the packaged one), as
    float32 modules in eval mode, and the file's metadata."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else weights_path(name)
    if not path.is_file():
        raise ValueError(f"no reference weights at {path}; train them with python -m tokenmerge.reference.train")
    meta = read_metadata(path)
    if meta["model"] != name:
        raise ValueError(f"{path} holds the {meta['model']!r} reference model, not {name!r}")
    if tuple(meta["vocab"]) != VOCAB:
        raise ValueError(f"{path} was trained with another vocabulary")
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    with torch.device("meta"):
        denoiser, text_encoder = build(name, **config)
    tensors = {k: v.float() for k, v in load_file(str(path)).items()}
    denoiser.load_state_dict(_part(tensors, "denoiser."), assign=True)
    text_encoder.load_state_dict(_part(tensors, "text_encoder."), assign=True)
    return denoiser.eval(), text_encoder.eval(), meta


def _part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
