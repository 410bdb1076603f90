"""Adapters for patchified diffusion transformers whose blocks take the image tokens alone:
``SD3Transformer2DModel`` (SD3/SD3.5, ``JointTransformerBlock``) and ``PixArtTransformer2DModel`` (PixArt-alpha/sigma,
``BasicTransformerBlock`` with ``ada_norm_single``).

Both run the UNet path: each merged sub-module's input is merged and its output unmerged before the residual add.
SD3's joint attention takes the (merged) image tokens and the full text and returns ``(image, text)``: only the image
part is unmerged, so every text token attends to all merged image tokens and keeps its own output. SD3.5's extra
self-attention (``attn2``) shares the block's plan. The token grid is the patch grid ``(H // p, W // p)`` of the 4D
latent the model is called with (patch size ``p`` from the model config).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenmerge.adapters.base import Adapter, Blocks, CallShape, GridSlot, Site, call_arg, example_tensor


class _PatchGridAdapter(Adapter):
    """Blocks ``transformer_blocks.i`` of one kind, reuse group and patch-grid slot; subclasses name the modules."""

    kind = "blocks"
    timestep_index = 3

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.slot = GridSlot()

    def block_modules(self, block: nn.Module) -> tuple[dict[str, nn.Module], dict[str, list[nn.Module]]]:
        raise NotImplementedError

    def find_sites(self) -> list[Site]:
        sites = []
        for i, block in enumerate(self.model.transformer_blocks):
            modules, extra = self.block_modules(block)
            name = f"transformer_blocks.{i}"
            attention = [modules["attn"], *extra.get("attn", ())]
            sites.append(
                Site(
                    name=name,
                    block=block,
                    modules=modules,
                    group=self.kind,
                    downsample=1,
                    grid=self.slot,
                    kind=self.kind,
                    index=i,
                    extra_modules=extra,
                    self_attention=attention,
                )
            )
        return sites

    def default_blocks(self) -> Blocks:
        return {self.kind: ((0, None),)}  # every block

    def install_grid_hooks(self, sites: list[Site]) -> list[RemovableHandle]:
        return [self.model.register_forward_pre_hook(self.record_grid, with_kwargs=True)]

    def record_grid(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook of the model: the patch grid of its 4D latent."""
        x, p = call_arg(args, kwargs, "hidden_states", 0), int(self.model.config.patch_size)
        ok = isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[-2] >= p and x.shape[-1] >= p
        self.slot.hw = (x.shape[-2] // p, x.shape[-1] // p) if ok else None

    def call_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple[int, ...], Any]:
        x, t = call_arg(args, kwargs, "hidden_states", 0), call_arg(args, kwargs, "timestep", self.timestep_index)
        if not isinstance(x, torch.Tensor) or t is None:
            raise ValueError(f"{type(self.model).__name__} call without hidden_states or timestep")
        return tuple(x.shape), t


class SD3Adapter(_PatchGridAdapter):
    """SD3/SD3.5: kind and group ``joint``; roles ``attn`` (joint attention, plus SD3.5's ``attn2`` where present)
    and ``mlp`` (the image feed-forward). Every block by default."""

    kind = "joint"
    text_tokens = 333  # 77 CLIP + 256 T5 tokens

    def example_inputs(
        self, shape: CallShape, generator: torch.Generator | None = None, device: Any = None, dtype: Any = None
    ) -> dict[str, Any]:
        cfg, b = self.model.config, shape.batch
        return dict(
            hidden_states=example_tensor((b, cfg.in_channels, *shape.latent), generator, device, dtype),
            encoder_hidden_states=example_tensor((b, shape.text, cfg.joint_attention_dim), generator, device, dtype),
            pooled_projections=example_tensor((b, cfg.pooled_projection_dim), generator, device, dtype),
            timestep=torch.full((b,), 500.0, device=device),
        )

    def block_modules(self, block: nn.Module) -> tuple[dict[str, nn.Module], dict[str, list[nn.Module]]]:
        extra = {"attn": [block.attn2]} if getattr(block, "attn2", None) is not None else {}
        return {"attn": block.attn, "mlp": block.ff}, extra


class PixArtAdapter(_PatchGridAdapter):
    """PixArt-alpha/sigma: kind and group ``blocks``; roles ``attn`` (self-attention), ``cross`` (queries of the
    text cross-attention) and ``mlp``. Every block by default."""

    kind = "blocks"
    timestep_index = 2
    text_tokens = 300  # PixArt-Sigma's T5 prompt length

    def example_inputs(
        self, shape: CallShape, generator: torch.Generator | None = None, device: Any = None, dtype: Any = None
    ) -> dict[str, Any]:
        """Latent, caption, timestep 500 and ``added_cond_kwargs`` (image size and aspect ratio where the model takes
        them)."""
        cfg, b, (h, w) = self.model.config, shape.batch, shape.latent
        added = {"resolution": None, "aspect_ratio": None}
        if self.model.use_additional_conditions:
            added = {
                "resolution": torch.tensor([[h * 8.0, w * 8.0]] * b, device=device, dtype=dtype),
                "aspect_ratio": torch.tensor([[h / w]] * b, device=device, dtype=dtype),
            }
        return dict(
            hidden_states=example_tensor((b, cfg.in_channels, h, w), generator, device, dtype),
            encoder_hidden_states=example_tensor((b, shape.text, cfg.caption_channels), generator, device, dtype),
            timestep=torch.full((b,), 500.0, device=device),
            added_cond_kwargs=added,
        )

    def block_modules(self, block: nn.Module) -> tuple[dict[str, nn.Module], dict[str, list[nn.Module]]]:
        modules = {"attn": block.attn1, "mlp": block.ff}
        if getattr(block, "attn2", None) is not None:
            modules["cross"] = block.attn2
        return modules, {}
