"""Image fidelity and quality metrics, all against the unaccelerated images of the same prompt and seed.

- PSNR / SSIM: ``torchmetrics`` on images in ``[0, 1]`` (data range 1), per image.
- LPIPS (AlexNet, v0.1): ``tokenmerge.harness.lpips``, from a torchvision AlexNet state dict and the LPIPS linear
  weights; per image, at the images' own resolution (at least 31 pixels a side; smaller images get no LPIPS).
- DINO delta: ``1 - cos`` between the DINOv2 CLS embeddings (``Dinov2Model`` pooler output) of the accelerated and the
  unaccelerated image; 0 for identical images, at most 2.
- CLIP-T: ``100 * max(cos(image, text), 0)`` with ``CLIPModel`` (the usual CLIPScore scaling).
- FD-DINOv2: the Fréchet distance between the two image sets in DINOv2 feature space, computed by ``torchmetrics``'
  ``FrechetInceptionDistance`` with DINOv2 as its feature extractor (Inception weights cannot be fetched offline; pass
  a DINOv2 checkpoint). Small sets give a biased, high-variance estimate: compare methods only at equal set sizes.

Metric models load with ``from_pretrained`` from a local folder or a hub id (cached, or reachable).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from tokenmerge.errors import HarnessError, describe

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_tensor(images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` float32 in ``[0, 1]`` from PIL images (or a tensor, passed through as float)."""
    if isinstance(images, torch.Tensor):
        return images.float()
    arrays = [np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0 for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def psnr(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of ``[0, 1]`` images (``inf`` where identical)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5) of ``[0, 1]`` images; needs sides of at least 11 pixels."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(preds, target, data_range=1.0, reduction="none")


def _prepare(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Resize ``[0, 1]`` images to ``size x size`` (bicubic, antialiased) and normalise."""
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    mean_t = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x.clamp(0, 1) - mean_t) / std_t


def _load(cls: Any, name_or_path: str, what: str) -> Any:
    try:
        return cls.from_pretrained(name_or_path).eval()
    except (OSError, ValueError, TypeError) as exc:
        raise HarnessError(f"cannot load {what} model {name_or_path!r}: {describe(exc)}") from exc


class DinoFeatures(nn.Module):
    """DINOv2 CLS embeddings of ``[0, 1]`` images; also a feature extractor for ``FrechetInceptionDistance``."""

    def __init__(self, name_or_path: str, image_size: int | None = None) -> None:
        from transformers import Dinov2Model

        super().__init__()
        self.model = _load(Dinov2Model, name_or_path, "DINOv2")
        self.image_size = image_size or int(self.model.config.image_size)
        self.num_features = int(self.model.config.hidden_size)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        x = _prepare(images.to(device), self.image_size, IMAGENET_MEAN, IMAGENET_STD)
        return self.model(pixel_values=x).pooler_output.float()


def dino_delta(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image ``1 - cos`` between two sets of embeddings of the same prompts and seeds."""
    return (1 - F.cosine_similarity(features.double(), reference.double(), dim=-1)).clamp_min(0).float()


def frechet_distance(features: torch.Tensor, reference: torch.Tensor) -> float:
    """Fréchet distance between two feature sets (``(N, D)``, N >= 2 each), via torchmetrics' FID."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(features) < 2 or len(reference) < 2:
        raise ValueError("the Fréchet distance needs at least two images per set")

    class _Identity(nn.Module):
        num_features = features.shape[1]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    fid = FrechetInceptionDistance(feature=_Identity(), normalize=True)
    fid.update(reference.double(), real=True)
    fid.update(features.double(), real=False)
    return max(float(fid.compute()), 0.0)


class ClipScorer(nn.Module):
    """CLIP-T: ``100 * max(cos(image, text), 0)`` per image-prompt pair."""

    def __init__(self, name_or_path: str) -> None:
        from transformers import AutoTokenizer, CLIPModel

        super().__init__()
        self.model = _load(CLIPModel, name_or_path, "CLIP")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError, TypeError) as exc:
            raise HarnessError(f"cannot load the CLIP tokenizer from {name_or_path!r}: {describe(exc)}") from exc
        self.image_size = int(self.model.config.vision_config.image_size)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        pixels = _prepare(images.to(device), self.image_size, CLIP_MEAN, CLIP_STD)
        max_length = int(self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(device)
        image_emb = self.model.get_image_features(pixel_values=pixels)
        text_emb = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        image_emb = getattr(image_emb, "pooler_output", image_emb)
        text_emb = getattr(text_emb, "pooler_output", text_emb)
        return 100 * F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1).clamp_min(0)


def batched(fn: Any, images: torch.Tensor, *extra: Sequence[Any], batch: int = 16) -> torch.Tensor:
    """``fn`` over ``images`` (and matching ``extra`` sequences) in chunks of ``batch``, concatenated."""
    outs = [fn(images[i : i + batch], *(e[i : i + batch] for e in extra)) for i in range(0, len(images), batch)]
    return torch.cat(outs) if outs else torch.empty(0)
