"""What every merge method provides to the shared adapters."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Hashable, Mapping
from typing import Any, ClassVar, Protocol

import torch

#: Sub-modules of a transformer block a method can run on merged tokens.
ROLES = ("attn", "cross", "mlp")


class Plan(Protocol):
    """A merge for one block call: ``merge`` ``(B, N, C) -> (B, K, C)``, ``unmerge`` ``(B, K, C) -> (B, N, C)``.

    Optional: ``key_bias`` ``(B, 1, K)`` (or ``None``), an additive bias on the self-attention keys (``attn`` role),
    e.g. to mask padding rows of merges whose ``K`` differs per sample.
    """

    def merge(self, x: torch.Tensor) -> torch.Tensor: ...

    def unmerge(self, y: torch.Tensor) -> torch.Tensor: ...


class KVPlan(Protocol):
    """A keys/values plan (ToDo): every query is kept; the self-attention projects its keys and values from
    ``kv(x)`` ``(B, N, C) -> (B, M, C)`` of the image tokens; nothing to unmerge. ``kv_index`` ``(M,)``: the grid
    positions of the kept tokens (rotary embeddings of the keys)."""

    kv_index: torch.Tensor

    def kv(self, x: torch.Tensor) -> torch.Tensor: ...


class Method(ABC):
    """A token-merging method: a configuration that turns a block's tokens into a :class:`Plan`.

    Subclasses are frozen dataclasses (configuration only); state that lives across blocks and steps is kept in the
    ``cache`` dict the adapter hands to :meth:`plan` (one per reuse group, emptied at every new generation).
    """

    #: Downsampling levels (1 = full latent resolution) this method patches; blocks at larger ones run unmerged.
    max_downsample: int
    #: Step indices (0-based, per generation) on which merging is active; ``None``: every step.
    steps: Collection[int] | None
    #: Diffusion transformers: block kind -> merged index ranges (see :func:`parse_blocks`); ``None``: the
    #: adapter's default placement.
    blocks: Mapping[str, tuple[tuple[int, int | None], ...]] | None = None
    #: ``"group"``: one ``cache`` per reuse group (a level's blocks share plans); ``"block"``: one per block.
    #: Every cache also holds ``cache["generation"]``, a dict shared by all blocks for the current generation, with
    #: ``num_steps`` (the steps this generation runs: the scheduler's count less those an img2img ``strength``
    #: skips; ``None`` for a bare denoiser).
    cache_scope: ClassVar[str] = "group"
    #: True for keys/values methods (plans are :class:`KVPlan`): hooked at the self-attention's key and value
    #: projections instead of merging sub-module inputs.
    keys_values: ClassVar[bool] = False

    @property
    @abstractmethod
    def roles(self) -> frozenset[str]:
        """The block sub-modules (a subset of :data:`ROLES`) that run on merged tokens."""

    @property
    def is_identity(self) -> bool:
        """True when the configuration changes nothing (e.g. ratio 0): the model is left unpatched."""
        return False

    def check_placement(self) -> None:
        """Validate the roles (flag methods: at least one flag set), ``max_downsample`` and ``steps``, normalise
        ``blocks`` (the end of every ``__post_init__``)."""
        if not self.roles <= set(ROLES):
            raise ValueError(f"roles must be a subset of {ROLES}, got {sorted(self.roles)}")
        check_common(self.max_downsample, self.steps)
        object.__setattr__(self, "blocks", parse_blocks(self.blocks))

    def active(self, step: int) -> bool:
        return self.steps is None or step in self.steps

    def phase(self, step: int, num_steps: int | None) -> Hashable:
        """What a plan at 0-based ``step`` of a ``num_steps`` generation depends on, handed to :meth:`plan`.

        A compiled model specialises on it (one graph per distinct value), so methods keep few values: ToMA whether
        destinations / weights are due, CA-ToMe whether the step is a checkpoint, ``None`` for methods that do not
        depend on the step. Default: the step itself.
        """
        return step

    @abstractmethod
    def plan(
        self, x: torch.Tensor, grid: tuple[int, int], cache: dict[str, Any], phase: Hashable
    ) -> Plan | KVPlan | None:
        """Plan the merge of block tokens ``x`` ``(B, H*W, C)`` on an ``H x W`` grid in the current step's ``phase``.

        ``cache["fresh"]`` is removed at every new step: a method that computed a plan for the rest of a step (the
        first block of a reuse group) marks it there.
        """


class FlagRoles:
    """Mixin of methods whose ``merge_attn`` / ``merge_crossattn`` / ``merge_mlp`` flags choose the merged roles."""

    merge_attn: bool
    merge_crossattn: bool
    merge_mlp: bool

    @property
    def roles(self) -> frozenset[str]:
        return flag_roles(self.merge_attn, self.merge_crossattn, self.merge_mlp)


def check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")


def flag_roles(merge_attn: bool, merge_crossattn: bool, merge_mlp: bool) -> frozenset[str]:
    """The roles switched on by the ``merge_attn`` / ``merge_crossattn`` / ``merge_mlp`` flags (at least one)."""
    roles = frozenset(role for role, on in zip(ROLES, (merge_attn, merge_crossattn, merge_mlp), strict=True) if on)
    if not roles:
        raise ValueError("at least one of merge_attn, merge_crossattn, merge_mlp must be set")
    return roles


def check_common(max_downsample: int, steps: Collection[int] | None) -> None:
    """Validate the options all methods share."""
    if max_downsample < 1 or max_downsample & (max_downsample - 1):
        raise ValueError(f"max_downsample must be a power of two >= 1, got {max_downsample}")
    if steps is not None and any(int(s) != s or s < 0 for s in steps):
        raise ValueError(f"steps must be non-negative integers, got {steps!r}")


def parse_blocks(blocks: Mapping[str, Any] | None) -> dict[str, tuple[tuple[int, int | None], ...]] | None:
    """Normalise block placement ``{kind: ranges}`` to half-open ``(start, stop)`` pairs (``stop`` None = to the end).

    A kind's ranges are a ``range`` (step 1), a ``(start, stop)`` pair or a list of them, e.g.
    ``{"double": (5, None), "single": [range(0, 4), (10, 20)]}``; an empty list merges none of that kind.
    """
    if blocks is None:
        return None
    if not isinstance(blocks, Mapping):
        raise ValueError(f"blocks must be a mapping of block kind to index ranges, got {type(blocks).__name__}")
    out = {}
    for kind, spec in blocks.items():
        items = [spec] if isinstance(spec, range) or _is_pair(spec) else spec
        if not isinstance(items, list | tuple):
            raise ValueError(f"blocks[{kind!r}] must be a range, a (start, stop) pair or a list of them, got {spec!r}")
        pairs = []
        for item in items:
            if isinstance(item, range):
                if item.step != 1:
                    raise ValueError(f"blocks[{kind!r}]: ranges must have step 1, got {item!r}")
                item = (item.start, item.stop)
            if not _is_pair(item):
                raise ValueError(f"blocks[{kind!r}]: expected (start, stop), got {item!r}")
            start, stop = item
            if start < 0 or (stop is not None and stop <= start):
                raise ValueError(f"blocks[{kind!r}]: need 0 <= start < stop, got ({start}, {stop})")
            pairs.append((int(start), None if stop is None else int(stop)))
        out[str(kind)] = tuple(pairs)
    return out


def _is_pair(item: Any) -> bool:
    return (
        isinstance(item, tuple | list)
        and len(item) == 2
        and isinstance(item[0], int)
        and not isinstance(item[0], bool)
        and (item[1] is None or (isinstance(item[1], int) and not isinstance(item[1], bool)))
    )
