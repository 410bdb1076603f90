"""FLOP counting: matmuls, convolutions and attention (a multiply-add counts as 2), with the formulas of
``torch.utils.flop_counter``, including the CPU flash-attention kernel it misses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry, sdpa_flop_count


def _cpu_flash_flops(query: torch.Size, key: torch.Size, value: torch.Size, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


FORMULAS: dict[Any, Callable[..., int]] = dict(flop_registry)
"""``torch.utils.flop_counter``'s formulas by op, plus the CPU flash-attention kernel (which it counts as zero)."""
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_flops


def _shape(x: Any) -> Any:
    return x.shape if isinstance(x, torch.Tensor) else x


class FlopCounter(TorchDispatchMode):
    """Counts the FLOPs of every op dispatched while active (``total``); the formulas take shapes only, so meta
    tensors count like real ones. No per-module tracking: cheaper than ``FlopCounterMode``."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        formula = FORMULAS.get(func._overloadpacket)
        if formula is None:  # a composite op that reached the mode whole (e.g. linear under inference_mode)
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if formula is not None:
            self.total += formula(*tree_map(_shape, args), **tree_map(_shape, kwargs), out_val=out)
        return out


def count_flops(fn: Callable[[], Any]) -> int:
    """Total FLOPs of ``fn()``."""
    with FlopCounter() as counter:
        fn()
    return counter.total
