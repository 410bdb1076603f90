"""Which implementation builds a ToMA merge: the fused Triton kernels (:mod:`tokenmerge.ops.triton_toma`) or the
torch path (:func:`tokenmerge.ops.toma.toma_merge_torch`), by the environment variable ``TOKENMERGE_TRITON``:

- ``check`` (default): *trust, then verify*. The first time the kernels meet a new :func:`signature` (input shape,
  strides, dtype and device; grid and tile; options; destinations given or selected), both paths build the merge of
  that same input and are compared (:func:`disagreement`): the same destinations, and merge / unmerge matrices,
  merged and unmerged tokens within :data:`TOLERANCE`. If they agree, the kernels build that signature's merges
  from then on; on a mismatch, a compile or a launch error, the torch path does, with one warning naming the error
  and ``TOKENMERGE_TRITON``, and the first merge returned is the torch one too: a broken kernel never changes an
  output.
- ``1``: the kernels, unchecked (their errors propagate).
- ``0``: the torch path only.

The kernels run on CUDA tensors (or on the CPU under ``TRITON_INTERPRET=1``, set before triton is imported), never
inside a ``torch.compile`` trace (inductor fuses the torch path itself), and only where
:func:`~tokenmerge.ops.triton_toma.kernels_apply`. Each plan says which path built it (``TileMerge.kernel``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch

from tokenmerge.ops.tiles import TileGrid
from tokenmerge.ops.toma import MergeOptions, TileMerge, toma_merge_torch

logger = logging.getLogger("tokenmerge")

ENV = "TOKENMERGE_TRITON"
MODES = ("check", "1", "0")
#: Largest difference the check accepts between the two paths, per input dtype: on matrix entries (in ``[0, 1]``),
#: and relative to the largest reference value on merged and unmerged tokens. The kernels accumulate in float32 like
#: torch but round differently: a few float32 ulps of the softmax at ``tau`` 100, one 16-bit rounding of a matrix
#: entry in float16 / bfloat16 (2^-8 = 0.004 in bfloat16).
TOLERANCE = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def triton_mode() -> str:
    """``TOKENMERGE_TRITON`` (read at every merge built, so it can change at run time): ``check``, ``1`` or ``0``."""
    mode = os.environ.get(ENV, "check").strip().lower()
    if mode not in MODES:
        raise ValueError(f"{ENV} must be one of {', '.join(MODES)}, got {os.environ[ENV]!r}")
    return mode


@dataclass(frozen=True)
class Verdict:
    """The check's outcome for one signature: kernels ``trusted``, else the ``error`` that made the torch path take
    over."""

    trusted: bool
    error: str | None = None


#: signature -> verdict, for this process (a kernel that works for a signature keeps working for it).
VERDICTS: dict[tuple, Verdict] = {}
_warned: set[str] = set()


def signature(x: torch.Tensor, grid: TileGrid, options: MergeOptions, dest: list[torch.Tensor] | None) -> tuple:
    """What the kernels are compiled and launched for: the input's shape, strides, dtype and device, the grid and
    tile, the options and whether destinations are given."""
    return (
        tuple(x.shape),
        x.stride(),
        x.dtype,
        x.device,
        (grid.height, grid.width, grid.tile_h, grid.tile_w),
        options,
        None if dest is None else tuple(d.shape for d in dest),
    )


def toma_merge(
    x: torch.Tensor, grid: TileGrid, options: MergeOptions, dest: list[torch.Tensor] | None = None
) -> tuple[TileMerge, list[torch.Tensor]]:
    """The ToMA merge of ``x`` ``(B, N, C)`` on ``grid`` (arguments and result as
    :func:`~tokenmerge.ops.toma.toma_merge_torch`), built by the kernels or the torch path (see the module doc)."""
    if torch.compiler.is_compiling():  # inductor fuses the torch path itself (and no environment read in a graph)
        return toma_merge_torch(x, grid, options, dest)
    mode = triton_mode()
    kernels = None if mode == "0" else fused_kernels(x, grid)
    if kernels is None:
        return toma_merge_torch(x, grid, options, dest)
    if mode == "1":
        return kernels.toma_merge_triton(x, grid, options, dest)
    key = signature(x, grid, options, dest)
    verdict = VERDICTS.get(key)
    if verdict is None:
        plan, found, verdict = first_meeting(kernels, x, grid, options, dest)
        VERDICTS[key] = verdict
        return plan, found
    if verdict.trusted:
        return kernels.toma_merge_triton(x, grid, options, dest)
    plan, found = toma_merge_torch(x, grid, options, dest)
    return _fell_back(plan, verdict.error), found


def fused_kernels(x: torch.Tensor, grid: TileGrid) -> ModuleType | None:
    """The kernels' module if they can build the merge of ``x`` on ``grid`` here, else ``None``: not on the CPU
    (unless interpreted), not without triton."""
    interpreted = x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if not (x.is_cuda or interpreted) or importlib.util.find_spec("triton") is None:
        return None
    try:
        from tokenmerge.ops import triton_toma
    except Exception as exc:  # a broken triton install: the torch path, said once
        error = _describe(exc)
        _warn_once(error, f"ToMA's Triton kernels cannot be imported ({error}): the torch path builds every merge")
        return None
    return triton_toma if triton_toma.kernels_apply(x, grid) else None


def first_meeting(
    kernels: ModuleType, x: torch.Tensor, grid: TileGrid, options: MergeOptions, dest: list[torch.Tensor] | None
) -> tuple[TileMerge, list[torch.Tensor], Verdict]:
    """Build the merge of ``x`` both ways and compare: the kernels' merge if they agree, else the torch one (and
    the warning)."""
    reference, ref_dest = toma_merge_torch(x, grid, options, dest)
    try:
        fused, fused_dest = kernels.toma_merge_triton(x, grid, options, dest)
        error = disagreement(x, reference, ref_dest, fused, fused_dest)
    except Exception as exc:  # compile and launch errors of any kind: the torch path takes over
        error = _describe(exc)
    if error is None:
        logger.debug("ToMA's Triton kernels agree with torch on %s", signature(x, grid, options, dest))
        return fused, fused_dest, Verdict(True)
    _warn_once(
        error,
        f"ToMA's Triton kernels failed their check against the torch path on a {tuple(x.shape)} {x.dtype} input "
        f"({grid.height}x{grid.width} grid, {grid.tile_h}x{grid.tile_w} tiles): {error}; the torch path builds these "
        f"merges from now on ({ENV}=0: always the torch path, {ENV}=1: the kernels unchecked)",
    )
    return _fell_back(reference, error), ref_dest, Verdict(False, error)


def disagreement(
    x: torch.Tensor,
    reference: TileMerge,
    ref_dest: list[torch.Tensor],
    fused: TileMerge,
    fused_dest: list[torch.Tensor],
) -> str | None:
    """Why the kernels' merge of ``x`` differs from the torch one, or ``None``: destinations must be identical;
    matrices, merged tokens ``M x`` and unmerged tokens ``A^T (M x)`` within :data:`TOLERANCE` (NaN never
    passes)."""
    if len(fused_dest) != len(ref_dest) or any(
        not torch.equal(a, b) for a, b in zip(ref_dest, fused_dest, strict=True)
    ):
        return "the selected destinations differ"
    if not torch.equal(reference.dest, fused.dest):
        return "the destinations' grid positions differ"
    tol = TOLERANCE.get(x.dtype, TOLERANCE[torch.float32])
    pairs = zip(reference.merge_mats + reference.unmerge_mats, fused.merge_mats + fused.unmerge_mats, strict=True)
    for ref, got in pairs:
        err = _max_error(ref, got, 1.0)
        if not err <= tol:
            return f"merge/unmerge matrices differ by {err:.3g} (tolerance {tol:g})"
    merged = reference.merge(x)
    for what, ref, got in (
        ("merged tokens", merged, fused.merge(x)),
        ("unmerged tokens", reference.unmerge(merged), fused.unmerge(merged)),
    ):
        err = _max_error(ref, got, float(ref.abs().max()))
        if not err <= tol:
            return f"{what} differ by {err:.3g} relative to their largest value (tolerance {tol:g})"
    return None


def _max_error(ref: torch.Tensor, got: torch.Tensor, scale: float) -> float:
    """``max |got - ref| / scale`` in float32 (``inf`` on a shape mismatch, NaN if ``got`` has one)."""
    if got.shape != ref.shape:
        return float("inf")
    return float((got.float() - ref.float()).abs().max()) / max(scale, 1e-30) if ref.numel() else 0.0


def _fell_back(plan: TileMerge, error: str | None) -> TileMerge:
    plan.kernel = f"torch (Triton failed its check: {error})"
    return plan


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def _warn_once(error: str, message: str) -> None:
    """Warn (and log) ``message`` the first time an error like ``error`` (numbers aside) is met in this process."""
    kind = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", error)
    if kind in _warned:
        return
    _warned.add(kind)
    logger.warning("%s", message)
    warnings.warn(f"tokenmerge: {message}", RuntimeWarning, stacklevel=4)
