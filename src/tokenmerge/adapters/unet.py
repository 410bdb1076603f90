"""Adapter for diffusers' ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL and their img2img/inpaint/ControlNet pipes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenmerge.adapters.base import Adapter, CallShape, GridSlot, Site, example_tensor


@dataclass(eq=False)
class GridRecorder:
    """Pre-hook of a ``Transformer2DModel``: its 4D input's ``(H, W)`` into ``slot`` (``None`` for other inputs)."""

    slot: GridSlot

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        self.slot.hw = tuple(x.shape[-2:]) if isinstance(x, torch.Tensor) and x.ndim == 4 else None


class UNetAdapter(Adapter):
    """Down block ``i`` and up block ``n-1-i`` are at downsample ``2**i``, the mid block at ``2**(n-1)``.

    Every ``Transformer2DModel`` records its input's ``(H, W)`` for its blocks; reuse groups are one per level and
    path (``down1``, ``mid4``, ``up2``, ...).
    """

    family = "unet"
    text_index = 2

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._owners: list[tuple[GridSlot, nn.Module]] = []  # each slot and the Transformer2DModel that fills it

    def find_sites(self) -> list[Site]:
        unet = self.model
        n = len(unet.down_blocks)
        stages = [(f"down_blocks.{i}", b, "down", 2**i) for i, b in enumerate(unet.down_blocks)]
        if unet.mid_block is not None:
            stages.append(("mid_block", unet.mid_block, "mid", 2 ** (n - 1)))
        stages += [(f"up_blocks.{i}", b, "up", 2 ** (n - 1 - i)) for i, b in enumerate(unet.up_blocks)]
        sites, self._owners = [], []
        for name, stage, path, downsample in stages:
            for j, attention in enumerate(getattr(stage, "attentions", None) or ()):
                slot = GridSlot()
                self._owners.append((slot, attention))
                for k, block in enumerate(getattr(attention, "transformer_blocks", ())):
                    modules = {"attn": block.attn1, "mlp": block.ff}
                    if getattr(block, "attn2", None) is not None:
                        modules["cross"] = block.attn2
                    sites.append(
                        Site(
                            name=f"{name}.attentions.{j}.transformer_blocks.{k}",
                            block=block,
                            modules=modules,
                            group=f"{path}{downsample}",
                            downsample=downsample,
                            grid=slot,
                            self_attention=[block.attn1],
                        )
                    )
        return sites

    def install_grid_hooks(self, sites: list[Site]) -> list[RemovableHandle]:
        used = {id(s.grid) for s in sites}
        return [
            owner.register_forward_pre_hook(GridRecorder(slot), with_kwargs=True)
            for slot, owner in self._owners
            if id(slot) in used
        ]

    def example_inputs(
        self, shape: CallShape, generator: torch.Generator | None = None, device: Any = None, dtype: Any = None
    ) -> dict[str, Any]:
        """``sample``, ``timestep`` 500, ``encoder_hidden_states`` and, for SDXL's text_time embedding,
        ``added_cond_kwargs`` (pooled text and the size ``time_ids``)."""
        cfg, b, (h, w) = self.model.config, shape.batch, shape.latent

        def tensor(*size: int) -> torch.Tensor:
            return example_tensor(size, generator, device, dtype)

        inputs: dict[str, Any] = dict(
            sample=tensor(b, cfg.in_channels, h, w),
            timestep=torch.tensor(500, device=device),
            encoder_hidden_states=tensor(b, shape.text, cfg.cross_attention_dim),
        )
        if cfg.addition_embed_type == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            size = [h * 8, w * 8, 0, 0, h * 8, w * 8]
            inputs["added_cond_kwargs"] = dict(
                text_embeds=tensor(b, pooled), time_ids=torch.tensor([size] * b, device=device, dtype=dtype)
            )
        return inputs

    def call_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple[int, ...], Any]:
        sample = args[0] if args else kwargs["sample"]
        return tuple(sample.shape), args[1] if len(args) > 1 else kwargs["timestep"]
