"""Adapter for diffusers' ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL and their img2img/inpaint/ControlNet pipes)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenmerge.adapters.base import Adapter, GridSlot, Site


class UNetAdapter(Adapter):
    """Down block ``i`` and up block ``n-1-i`` are at downsample ``2**i``, the mid block at ``2**(n-1)``.

    Every ``Transformer2DModel`` records its input's ``(H, W)`` for its blocks; reuse groups are one per level and
    path (``down1``, ``mid4``, ``up2``, ...).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._owners: dict[int, nn.Module] = {}

    def sites(self) -> list[Site]:
        unet = self.model
        n = len(unet.down_blocks)
        stages = [(f"down_blocks.{i}", b, "down", 2**i) for i, b in enumerate(unet.down_blocks)]
        if unet.mid_block is not None:
            stages.append(("mid_block", unet.mid_block, "mid", 2 ** (n - 1)))
        stages += [(f"up_blocks.{i}", b, "up", 2 ** (n - 1 - i)) for i, b in enumerate(unet.up_blocks)]
        sites = []
        for name, stage, path, downsample in stages:
            for j, attention in enumerate(getattr(stage, "attentions", None) or ()):
                slot = GridSlot()
                self._owners[id(slot)] = attention
                for k, block in enumerate(getattr(attention, "transformer_blocks", ())):
                    modules = {"attn": block.attn1, "mlp": block.ff}
                    if getattr(block, "attn2", None) is not None:
                        modules["cross"] = block.attn2
                    label = f"{name}.attentions.{j}.transformer_blocks.{k}"
                    group = f"{path}{downsample}"
                    sites.append(Site(label, block, modules, group, downsample, slot, self_attention=[block.attn1]))
        return sites

    def install_grid_hooks(self, sites: list[Site]) -> list[RemovableHandle]:
        handles = []
        for slot in {id(s.grid): s.grid for s in sites}.values():

            def record(module: nn.Module, args: tuple, kwargs: dict, slot: GridSlot = slot) -> None:
                x = args[0] if args else kwargs["hidden_states"]
                slot.hw = tuple(x.shape[-2:]) if isinstance(x, torch.Tensor) and x.ndim == 4 else None

            handles.append(self._owners[id(slot)].register_forward_pre_hook(record, with_kwargs=True))
        return handles

    def call_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple[int, ...], Any]:
        sample = args[0] if args else kwargs["sample"]
        return tuple(sample.shape), args[1] if len(args) > 1 else kwargs["timestep"]
