"""What a method's plan is: the two plan types the patch and the adapters act on.

A *plan* is what a method decides for one block call from the block's image tokens ``x`` ``(B, N, C)`` on an
``H x W`` grid (``N = H * W``). Methods return one of two kinds:

- :class:`MergePlan`: the block's merged sub-modules run on ``K < N`` tokens: ``merge`` before, ``unmerge`` after;
- :class:`KVPlan`: every query is kept; the self-attention takes its keys and values from ``M < N`` tokens.

The patch installs the hooks of the kind a method declares (``Method.keys_values``) and checks every plan against
it; adapters read the positions a plan gives (rotary embeddings). Both are abstract base classes (not structural
protocols) so that ``isinstance`` is a type check, which ``torch.compile`` traces for plans made inside the graph.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class MergePlan(ABC):
    """A merge of ``N`` image tokens into ``K = num_merged`` rows.

    ``merge`` ``(B, N, C) -> (B, K, C)``; ``unmerge`` ``(B, K, C) -> (B, N, C)``. ``dest`` ``(B, K)``: the grid index
    whose position every row takes (rotary embeddings). ``key_bias`` ``(B, 1, K)`` or ``None``: an additive bias on
    the self-attention keys (``-inf``-like on padding rows when ``K`` differs per sample); a plan that has one needs
    an attention that takes a mask (``Method.key_mask_option``). ``kernel``: which implementation built the plan
    where a method has several (ToMA: ``"triton"`` or ``"torch"``, and why the kernels were not used), for
    ``tm.summary``; ``None`` where it has one.
    """

    dest: torch.Tensor
    key_bias: torch.Tensor | None = None
    kernel: str | None = None

    @property
    @abstractmethod
    def num_merged(self) -> int: ...

    @abstractmethod
    def merge(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def unmerge(self, y: torch.Tensor) -> torch.Tensor: ...


class KVPlan(ABC):
    """Keys and values from ``M = num_kv`` of the ``N`` image tokens: ``kv`` ``(B, N, C) -> (B, M, C)``;
    ``kv_index`` ``(M,)``: their grid positions (rotary embeddings of the keys). Nothing to unmerge. ``kernel``: as
    :class:`MergePlan`'s."""

    kv_index: torch.Tensor
    kernel: str | None = None

    @property
    @abstractmethod
    def num_kv(self) -> int: ...

    @abstractmethod
    def kv(self, x: torch.Tensor) -> torch.Tensor: ...
