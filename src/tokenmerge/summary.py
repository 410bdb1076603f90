"""What a patch did: counters the hooks keep (plain Python ints, no device reads) and ``tm.summary``'s report.

Under ``torch.compile`` the hooks run inside the graph: what they store per block (tokens in and out of the last
call) is replayed by the compiled code, but the call and step counters (increments) are only kept in eager mode.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum

from tokenmerge.adapters.base import CallShape, Site
from tokenmerge.hooks import BlockRun
from tokenmerge.methods.base import ROLES, Method


class Unmerged(Enum):
    """Why a block call ran on every token."""

    STEPS = "the step is not in steps="
    GRID = "the input is not one H x W token grid"
    PLAN = "the method has nothing to merge on this grid (smaller than a cell, or ratio * tokens < 1)"
    KEEPS_ALL = "the plan keeps every token (a ratio too small for the tile, a threshold no pair reaches)"
    NO_BLOCKS = "no block is patched (max_downsample= / blocks=)"
    SKIPPED = "a step cache skipped every patched block (their outputs came from its cache)"


@dataclass(eq=False)
class Counters:
    """Denoiser calls and steps since ``apply`` (eager mode), and the call in progress."""

    calls: int = 0
    merged_calls: int = 0
    unmerged: Counter = field(default_factory=Counter)  # Unmerged -> calls that merged nothing for that reason
    generations: int = 0
    generation_calls: int = 0  # calls of the current (or last) generation
    generation_merged: int = 0
    steps_run: set[int] = field(default_factory=set)  # steps of the current (or last) generation
    steps_merged: set[int] = field(default_factory=set)
    call_merged: bool = False
    call_reasons: set[Unmerged] = field(default_factory=set)
    planned: bool = False  # a block of the call in progress was planned
    merged_tokens: int = 0  # tokens the current (or last) generation's merged block calls merged away
    mergeable_tokens: int = 0  # at most how many they could have merged away (Method.mergeable)

    def start_generation(self) -> None:
        self.generations += 1
        self.generation_calls = self.generation_merged = 0
        self.steps_run, self.steps_merged = set(), set()
        self.merged_tokens = self.mergeable_tokens = 0

    def merged(self, tokens_in: int, tokens_out: int, mergeable: int) -> None:
        """A block call merged ``tokens_in`` tokens into ``tokens_out`` of at most ``mergeable`` it could remove."""
        self.merged_tokens += tokens_in - tokens_out
        self.mergeable_tokens += mergeable

    def begin_call(self) -> None:
        self.call_merged, self.call_reasons, self.planned = False, set(), False

    def block(self, merged: bool, reason: Unmerged | None) -> None:
        self.planned = True
        self.call_merged |= merged
        if reason is not None:
            self.call_reasons.add(reason)

    def end_call(self, step: int) -> None:
        self.calls += 1
        self.generation_calls += 1
        self.steps_run.add(step)
        if self.call_merged:
            self.merged_calls += 1
            self.generation_merged += 1
            self.steps_merged.add(step)
        else:
            for reason in self.call_reasons or {Unmerged.NO_BLOCKS}:
                self.unmerged[reason] += 1

    def take_generation_reasons(self) -> list[Unmerged]:
        """Why the current generation merged nothing (empty if it merged, ran no call, or was taken before)."""
        calls, self.generation_calls = self.generation_calls, 0
        if not calls or self.generation_merged:
            return []
        return sorted(self.call_reasons or {Unmerged.NO_BLOCKS}, key=lambda r: r.name)


@dataclass(frozen=True)
class BlockSummary:
    """One patched block: where it is, which sub-modules run merged, and its last call's image tokens: ``tokens_in``
    in, ``tokens_out`` what the merged sub-modules ran on (keys/values for ToDo; ``tokens_in`` when unmerged);
    ``kernel``: which implementation built its last plan, where the method has several (ToMA: ``"triton"`` or
    ``"torch"``, with why the kernels were not used), else ``None``."""

    name: str
    group: str
    downsample: int
    roles: tuple[str, ...]
    tokens_in: int | None
    tokens_out: int | None
    kernel: str | None = None


@dataclass(frozen=True)
class FlopCut:
    """FLOPs of the last denoiser call (of ``shape``) as it ran (``merged``) and unpatched (``full``), counted exactly
    on the model's weightless twin (:mod:`tokenmerge.cost`) from the call's shapes (content-adaptive methods: at the
    fraction of tokens their blocks merged)."""

    shape: CallShape
    full: int
    merged: int

    @property
    def cut(self) -> float:
        """The fraction of the FLOPs saved, ``1 - merged / full``."""
        return 1 - self.merged / self.full if self.full else 0.0

    def __str__(self) -> str:
        h, w = self.shape.latent
        return (
            f"FLOPs of the last call ({self.shape.batch} x {h}x{w} latent): {self.merged / 1e9:.4g} of "
            f"{self.full / 1e9:.4g} GFLOP unmerged ({100 * self.cut:.1f}% cut)"
        )


@dataclass(frozen=True)
class Summary:
    """What ``tm.apply`` patched and what the patched model did (see :func:`tokenmerge.summary`).

    ``calls``: denoiser calls since ``apply``, ``merged_calls`` of them with at least one block on fewer tokens, and
    ``unmerged``: why the others merged nothing (reason -> calls). ``steps_run`` / ``steps_merged``: steps of the
    current or last generation. Call and step counters are kept in eager mode only (``counted`` is False when calls
    ran compiled: blocks reported tokens but no call was counted). ``flops``: the FLOP cut of the last call (eager
    mode; ``None`` before a call or where the model's twin cannot be counted). ``merged_fraction``: of the tokens
    the current or last generation's merged block calls could merge away (:meth:`Method.mergeable`), the share they
    did (``None`` before any). ``parallel``: under context parallelism, which rank of which group this is and the
    band of image rows it holds (the block tokens are this rank's).
    """

    model: str
    method: str | None
    blocks: tuple[BlockSummary, ...] = ()
    calls: int = 0
    merged_calls: int = 0
    unmerged: dict[str, int] = field(default_factory=dict)
    generations: int = 0
    steps_run: int = 0
    steps_merged: int = 0
    counted: bool = True
    merged_fraction: float | None = None
    flops: FlopCut | None = None
    parallel: str | None = None

    @property
    def applied(self) -> bool:
        return self.method is not None

    def blocks_per_group(self) -> dict[str, int]:
        """Patched blocks per reuse group (UNet level and path, or transformer block kind), in call order."""
        return dict(Counter(b.group for b in self.blocks))

    def kernels(self) -> dict[str, int]:
        """Which implementation built the blocks' last plans (ToMA: ``"triton"``, ``"torch"`` or why the Triton
        kernels were not used) -> blocks; empty for methods with one implementation or before a merged call."""
        return dict(Counter(b.kernel for b in self.blocks if b.kernel is not None))

    def __str__(self) -> str:
        if self.method is None:
            return f"tokenmerge: {self.model} is not patched"
        groups = ", ".join(f"{g} {n}" for g, n in self.blocks_per_group().items()) or "none"
        lines = [f"tokenmerge: {self.method} on {self.model}", f"patched blocks: {len(self.blocks)} ({groups})"]
        if self.parallel is not None:
            lines.append(f"context parallel: {self.parallel}; tokens below are this rank's")
        if not self.counted:
            lines.append("calls: not counted (compiled: the hooks run inside the graph)")
        else:
            why = "; ".join(f"{n} x {reason}" for reason, n in self.unmerged.items())
            lines.append(f"calls: {self.calls}, merged: {self.merged_calls}" + (f", unmerged: {why}" if why else ""))
            lines.append(f"last generation: {self.steps_merged} of {self.steps_run} steps merged")
        if self.flops is not None:
            lines.append(str(self.flops))
        kernels = self.kernels()
        if kernels:
            lines.append("plans built by: " + "; ".join(f"{k} ({n} blocks)" for k, n in kernels.items()))
        if self.blocks:
            rows = [("block", "group", "down", "merged", "tokens in", "tokens out")]
            rows += [
                (b.name, b.group, str(b.downsample), ",".join(b.roles), _count(b.tokens_in), _count(b.tokens_out))
                for b in self.blocks
            ]
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            for row in rows:  # text columns left-aligned, counts right-aligned
                cells = (c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
                lines.append("  ".join(cells))
        return "\n".join(line.rstrip() for line in lines)


def _count(n: int | None) -> str:
    return "-" if n is None else str(n)


def summarize(
    model: str, described: str, method: Method, runs: list[BlockRun], counters: Counters, parallel: str | None = None
) -> Summary:
    """The :class:`Summary` of a patch: ``method`` (``described`` so) on the ``runs`` of a ``model``, with its
    ``counters`` (and the rank's band under context parallelism)."""
    blocks = tuple(
        BlockSummary(
            name=run.site.name,
            group=run.site.group,
            downsample=run.site.downsample,
            roles=merged_roles(run.site, method),
            tokens_in=run.tokens_in,
            tokens_out=run.tokens_out,
            kernel=run.kernel,
        )
        for run in runs
    )
    return Summary(
        model=model,
        method=described,
        blocks=blocks,
        calls=counters.calls,
        merged_calls=counters.merged_calls,
        unmerged={reason.value: n for reason, n in counters.unmerged.items()},
        generations=counters.generations,
        steps_run=len(counters.steps_run),
        steps_merged=len(counters.steps_merged),
        counted=counters.calls > 0 or all(run.tokens_in is None for run in runs),
        merged_fraction=counters.merged_tokens / counters.mergeable_tokens if counters.mergeable_tokens else None,
        parallel=parallel,
    )


def merged_roles(site: Site, method: Method) -> tuple[str, ...]:
    """The sub-modules of ``site`` that run on fewer tokens (``attn:keys/values`` for keys/values methods)."""
    if method.keys_values:
        return ("attn:keys/values",)
    present = site.roles()
    return tuple(role for role in ROLES if role in method.roles and role in present)
