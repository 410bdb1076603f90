"""Adapter for diffusers' ``FluxTransformer2DModel`` (Flux dev/schnell and their img2img/inpaint/fill pipelines).

Double-stream blocks (kind ``double``): the image tokens are merged for the joint attention only; the text tokens
are never merged, so the attention runs over ``[text, merged image]`` and the output is unmerged after the image
output projection (the first element of the attention's ``(image, text)`` output).

Single-stream blocks (kind ``single``): the block runs on ``[text, image]``, its attention and MLP in parallel from
one norm. With both merged (``merge_attn`` and ``merge_mlp``, ToMA's default) the image suffix of the norm's output
is merged, so both run on ``[text, merged image]``, and the image suffix of ``proj_out``'s output is unmerged before
the gate and residual add; with one of them, that branch alone runs merged (the attention's input to its output, or
``proj_mlp``'s input to ``act_mlp``'s output) and ``proj_out`` sees full rows.

The double-stream MLPs always stay full (``merge_mlp`` acts on single-stream blocks): the ToMA reference merges the
double-stream attention only, and so does the measured default.

Rotary positions: a merged token takes its destination's position. Destinations differ per sample, so the rotary
tables differ per sample too, which diffusers' ``apply_rotary_emb`` cannot take (its tables are ``(S, D)``). While a
block runs merged, the attention gets ``image_rotary_emb=None`` and the rotation is applied instead by output hooks on
the attention's query/key norms (``norm_q``/``norm_k`` and the text ``norm_added_q``/``norm_added_k``), which in
Flux's processor come right before the rotation; the attention itself still goes through the model's processor and
diffusers' attention dispatch, unchanged.

Token grid: from ``img_ids`` (row, column per packed token); a layout that is not one row-major ``H x W`` grid
(e.g. Kontext's extra reference-image tokens) is left unmerged.

Context parallelism (``enable_parallelism``, diffusers' ``_cp_plan``): the model's input hook splits
``hidden_states``, ``encoder_hidden_states``, ``img_ids`` and ``txt_ids`` along the sequence inside its forward, so
the torch pre-hook still sees the whole grid, and ``x_embedder`` (this rank's image token count) and ``pos_embed``
(this rank's ``[text, image]`` ids, hence its rotary tables) see the rank's part. The blocks then run on this rank's
band (:class:`~tokenmerge.parallel.Band`): the grid is the band's, found by locating the rank's image ids in the
whole grid's.

Default placement scales with depth: the first ``round(5 * n / 19)`` of ``n`` double-stream blocks and the first
``round(5 * n / 38)`` of ``n`` single-stream blocks stay full (Flux.1's 19 + 38 blocks: five of each, the ToMA
reference placement; a 2 + 4-block model: one of each; a kind of one block: none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tokenmerge.adapters.base import Adapter, Blocks, CallShape, GridSlot, Point, Site, call_arg, example_tensor
from tokenmerge.parallel import Band, ContextParallel, context_parallel
from tokenmerge.plans import KVPlan


class RotarySlot(GridSlot):
    """The grid plus the model's rotary tables ``(cos, sin)``, each ``(T + H*W, D)`` (text first), for one call."""

    def __init__(self) -> None:
        super().__init__()
        self.freqs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.image: tuple[int, int] | None = None  # the whole image grid
        self.current = False  # image was read from this generation's img_ids
        self.split: Split | None = None  # this call runs context parallel: its band is still to be found
        self._memo: dict[str, tuple[Any, Any, tuple[torch.Tensor, torch.Tensor]]] = {}

    def image_freqs(self, plan: Any, side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Image rotary tables of the tokens the attention sees as queries (``side="q"``) or keys (``"k"``).

        A merge plan: ``(B, K, D)``, row ``k`` of sample ``b`` the table row of destination ``plan.dest[b, k]`` (both
        sides). A keys/values plan: the full ``(H*W, D)`` tables for the queries, rows ``plan.kv_index`` ``(M, D)``
        for the keys. Memoised per plan and side (blocks of a group share one plan).
        """
        memo = self._memo.get(side)
        if memo is not None and memo[0] is plan and memo[1] is self.freqs:
            return memo[2]
        n = self.hw[0] * self.hw[1]
        image = tuple(f[f.shape[0] - n :] for f in self.freqs)
        if isinstance(plan, KVPlan):
            out = image if side == "q" else tuple(f[plan.kv_index.to(f.device)] for f in image)
        else:
            out = tuple(f[plan.dest.to(f.device)] for f in image)
        self._memo[side] = (plan, self.freqs, out)
        return out

    def text_freqs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Text rows ``(T, D)`` of the rotary tables."""
        n = self.hw[0] * self.hw[1]
        return tuple(f[: f.shape[0] - n] for f in self.freqs)  # type: ignore[return-value]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` ``(B, S, heads, D)`` with tables ``(S, D)`` or ``(B, S, D)``, channel pairs
    ``(2i, 2i+1)`` rotated: ``x * cos + r(x) * sin`` with ``r(x)_{2i} = -x_{2i+1}``, ``r(x)_{2i+1} = x_{2i}``;
    computed in float32 (as the model does)."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    turned = torch.stack((-odd, even), dim=-1).flatten(-2)
    cos, sin = cos.unsqueeze(-2).to(x.device), sin.unsqueeze(-2).to(x.device)
    return (x.float() * cos + turned.float() * sin).to(x.dtype)


def grid_from_ids(ids: torch.Tensor, n: int) -> tuple[int, int] | None:
    """``(H, W)`` of packed image tokens from their position ids ``(N, 3)`` (``[_, row, column]``), or ``None``
    unless they form one row-major grid of ``n`` tokens."""
    if ids.ndim == 3:
        ids = ids[0]
    if ids.ndim != 2 or ids.shape[0] != n or ids.shape[1] < 3 or n == 0:
        return None
    rows, cols = ids[:, 1].float(), ids[:, 2].float()
    r0, c0 = rows.min(), cols.min()
    h, w = int(rows.max() - r0) + 1, int(cols.max() - c0) + 1
    if h * w != n:
        return None
    r = torch.arange(h, device=ids.device, dtype=rows.dtype).repeat_interleave(w) + r0
    c = torch.arange(w, device=ids.device, dtype=cols.dtype).repeat(h) + c0
    return (h, w) if torch.equal(rows, r) and torch.equal(cols, c) else None


#: Full blocks at the start of each kind on Flux.1 (19 double-stream, 38 single-stream blocks): the ToMA reference.
REFERENCE_FULL = {"double": (5, 19), "single": (5, 38)}


def default_full(kind: str, count: int) -> int:
    """How many of the first ``count`` blocks of ``kind`` stay full by default: Flux.1's five of 19 (double) and five
    of 38 (single), scaled to the model's depth, ``round(5 * count / 19)`` and ``round(5 * count / 38)``."""
    full, depth = REFERENCE_FULL[kind]
    return round(full * count / depth)


@dataclass(eq=False)
class Split:
    """A call under context parallelism, until its band is found: the setting, the whole image grid and ids (as the
    model was called) and the number of image tokens this rank holds (``x_embedder``'s input)."""

    setting: ContextParallel
    image: tuple[int, int]
    ids: torch.Tensor
    tokens: int | None = None


class FluxAdapter(Adapter):
    """Sites ``transformer_blocks.i`` (kind/group ``double``) and ``single_transformer_blocks.i`` (``single``),
    at downsample 1; by default the first blocks of each kind stay full (:func:`default_full`). Under context
    parallelism the blocks see this rank's band of image rows.

    Position ids on the meta device (FLOP counting on a weightless twin) carry no values: the grid of the last
    :meth:`example_inputs` built there stands in for theirs."""

    finds_bands = True
    pixels_per_cell = 16
    text_tokens = 512

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.slot = RotarySlot()
        self.meta_grid: tuple[int, int] | None = None

    def example_inputs(
        self, shape: CallShape, generator: torch.Generator | None = None, device: Any = None, dtype: Any = None
    ) -> dict[str, Any]:
        """Packed latent tokens, T5 text, pooled CLIP text, timestep 0.5, row-major ``img_ids`` (and ``guidance``
        3.5 for guidance-distilled models)."""
        cfg, b, (h, w) = self.model.config, shape.batch, shape.latent
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
        if torch.device(device or "cpu").type == "meta":
            self.meta_grid = (h, w)
        inputs: dict[str, Any] = dict(
            hidden_states=example_tensor((b, h * w, cfg.in_channels), generator, device, dtype),
            encoder_hidden_states=example_tensor((b, shape.text, cfg.joint_attention_dim), generator, device, dtype),
            pooled_projections=example_tensor((b, cfg.pooled_projection_dim), generator, device, dtype),
            timestep=torch.full((b,), 0.5, device=device, dtype=dtype),
            img_ids=img_ids.to(device),
            txt_ids=torch.zeros(shape.text, 3, device=device),
        )
        if cfg.guidance_embeds:
            inputs["guidance"] = torch.full((b,), 3.5, device=device, dtype=dtype)
        return inputs

    def default_blocks(self) -> Blocks:
        counts = {"double": len(self.model.transformer_blocks), "single": len(self.model.single_transformer_blocks)}
        return {kind: ((default_full(kind, n), None),) for kind, n in counts.items()}

    def find_sites(self) -> list[Site]:
        slot = self.slot
        attention_kwargs = AttentionKwargs(slot)
        img_q, img_k, txt = RotaryMap(slot, "image", "q"), RotaryMap(slot, "image", "k"), RotaryMap(slot, "text", "q")
        joint_q, joint_k = RotaryMap(slot, "joint", "q"), RotaryMap(slot, "joint", "k")
        sites = []
        for i, block in enumerate(self.model.transformer_blocks):
            attn = block.attn
            norms = [getattr(attn, n, None) for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")]
            maps = list(zip(norms, (img_q, img_k, txt, txt), strict=True))
            sites.append(
                Site(
                    name=f"transformer_blocks.{i}",
                    block=block,
                    modules={"attn": attn},
                    group="double",
                    downsample=1,
                    grid=slot,
                    kind="double",
                    index=i,
                    kwarg_maps={"attn": [(attn, attention_kwargs)]},
                    output_maps={"attn": _checked(maps)},
                    masks_keys=True,
                    self_attention=[attn],
                )
            )
        for i, block in enumerate(self.model.single_transformer_blocks):
            attn = block.attn
            maps = [(getattr(attn, "norm_q", None), joint_q), (getattr(attn, "norm_k", None), joint_k)]
            sites.append(
                Site(
                    name=f"single_transformer_blocks.{i}",
                    block=block,
                    modules={},
                    group="single",
                    downsample=1,
                    grid=slot,
                    kind="single",
                    index=i,
                    spans={
                        frozenset({"attn", "mlp"}): (Point(block, "norm"), Point(block, "proj_out")),
                        frozenset({"attn"}): (Point(block, "attn", "input"), Point(block, "attn")),
                        frozenset({"mlp"}): (Point(block, "proj_mlp", "input"), Point(block, "act_mlp")),
                    },
                    kwarg_maps={"attn": [(attn, attention_kwargs)]},
                    output_maps={"attn": _checked(maps)},
                    masks_keys=True,
                    self_attention=[attn],
                )
            )
        return sites

    def install_grid_hooks(self, sites: list[Site]) -> list[RemovableHandle]:
        return [
            self.model.register_forward_pre_hook(self.record_grid, with_kwargs=True),
            self.model.x_embedder.register_forward_pre_hook(self.record_tokens),
            self.model.pos_embed.register_forward_hook(self.record_freqs),
        ]

    def record_grid(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook of the model: the grid from ``img_ids`` (compiled: once per generation). Under context
        parallelism the blocks' grid is left unknown until ``pos_embed`` shows this rank's band."""
        slot = self.slot
        x, ids = call_arg(args, kwargs, "hidden_states", 0), call_arg(args, kwargs, "img_ids", 4)
        if not (isinstance(x, torch.Tensor) and x.ndim == 3 and isinstance(ids, torch.Tensor)):
            slot.image = None
        elif ids.is_meta:
            meta = self.meta_grid
            slot.image = meta if meta and meta[0] * meta[1] == x.shape[1] else None
        elif not slot.current or not torch.compiler.is_compiling():
            slot.image, slot.current = _eager_grid(ids, x.shape[1]), True
        slot.hw, slot.freqs, slot.band, slot.split = slot.image, None, None, None
        setting = context_parallel(self.model)
        if setting is not None and slot.image is not None:
            slot.hw, slot.split = None, Split(setting, slot.image, ids[0] if ids.ndim == 3 else ids)

    def record_tokens(self, module: nn.Module, args: tuple) -> None:
        """Pre-hook of ``x_embedder`` under context parallelism: how many image tokens this rank holds."""
        split = self.slot.split
        if split is not None and args and isinstance(args[0], torch.Tensor) and args[0].ndim == 3:
            split.tokens = args[0].shape[1]

    def record_freqs(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Forward hook of ``pos_embed``: the rotary tables ``(cos, sin)`` of this call; under context parallelism
        also this rank's band, from the image part of the ids it got (``[text, image]``)."""
        slot = self.slot
        ok = isinstance(output, tuple) and len(output) == 2 and all(isinstance(f, torch.Tensor) for f in output)
        slot.freqs = output if ok and output[0].ndim == 2 else None
        split, slot.split = slot.split, None
        if split is not None and split.tokens is not None and slot.freqs is not None:
            slot.band = _eager_band(split, args[0][args[0].shape[0] - split.tokens :], split.tokens)
            slot.hw = slot.band.grid if slot.band.whole_rows else None

    def start_generation(self) -> None:
        self.slot.current = False

    def call_shape(self, args: tuple, kwargs: dict) -> CallShape | None:
        """Packed tokens ``(B, N, C)`` on the grid read from ``img_ids`` for this call, and the T5 text length."""
        x, text = call_arg(args, kwargs, "hidden_states", 0), call_arg(args, kwargs, "encoder_hidden_states", 1)
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or self.slot.hw is None:
            return None
        tokens = text.shape[1] if isinstance(text, torch.Tensor) and text.ndim == 3 else 0
        return CallShape(x.shape[0], self.slot.hw, tokens)

    def call_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple[int, ...], Any]:
        x, t = call_arg(args, kwargs, "hidden_states", 0), call_arg(args, kwargs, "timestep", 3)
        if not isinstance(x, torch.Tensor) or t is None:
            raise ValueError("FluxTransformer2DModel call without hidden_states or timestep")
        return tuple(x.shape), t


@torch.compiler.disable
def _eager_grid(ids: torch.Tensor, n: int) -> tuple[int, int] | None:
    """:func:`grid_from_ids`, always eager: it reads the ids' values, which a compiled graph cannot branch on. A
    compiled denoiser reads them at the first call of a generation only (a graph break there, none later; within a
    generation the ids stay the same), an eager one at every call."""
    return grid_from_ids(ids, n)


@torch.compiler.disable
def _eager_band(split: Split, ids: torch.Tensor, n: int) -> Band:
    """The band of a rank's ``n`` image ids ``(n, 3)`` in the whole grid's (eager: it reads their values). Raises
    ``ValueError`` unless they are one contiguous run of the row-major grid's tokens, as diffusers' sequence split
    makes them."""
    h, w = split.image
    whole, ids = split.ids, ids.to(split.ids.dtype)
    start = int(ids[0, 1] - whole[0, 1]) * w + int(ids[0, 2] - whole[0, 2])
    if not 0 <= start <= h * w - n or not torch.equal(whole[start : start + n], ids):
        raise ValueError(
            f"context parallelism ({split.setting.describe()}): the {n} image tokens of rank {split.setting.rank} are "
            f"not one contiguous run of the {h}x{w} token grid, so their rows are unknown; token merging needs "
            "diffusers' sequence split of the image tokens"
        )
    return Band(start, n, h, w, split.setting)


@dataclass(eq=False)
class AttentionKwargs:
    """Keyword map of a merged block's attention: no rotary tables (the norm hooks rotate per sample instead), and a
    plan's ``key_bias`` ``(B, 1, K)`` as an ``attention_mask`` ``(B, 1, 1, T + K)`` over ``[text, image]`` keys."""

    slot: RotarySlot

    def __call__(self, kwargs: dict, plan: Any) -> dict:
        slot = self.slot
        if kwargs.get("image_rotary_emb") is None:
            return kwargs
        if slot.freqs is None or slot.hw is None:
            raise ValueError("Flux rotary tables were not recorded from pos_embed; cannot merge this call")
        kwargs = {**kwargs, "image_rotary_emb": None}
        bias = None if isinstance(plan, KVPlan) else plan.key_bias
        if bias is not None:
            text = slot.freqs[0].shape[0] - slot.hw[0] * slot.hw[1]
            kwargs["attention_mask"] = torch.cat((bias.new_zeros(bias.shape[0], 1, text), bias), -1).unsqueeze(1)
        return kwargs


@dataclass(eq=False)
class RotaryMap:
    """Output map of a query (``side="q"``) or key (``"k"``) norm ``(B, S, heads, D)``: rotate ``image``
    (``S`` image tokens as the attention sees them), ``text`` (``S = T``) or ``joint`` (``S = T + image``, text
    first) tokens by their positions (see :meth:`RotarySlot.image_freqs`)."""

    slot: RotarySlot
    part: str
    side: str

    def __call__(self, out: torch.Tensor, plan: Any) -> torch.Tensor:
        slot = self.slot
        if slot.freqs is None or slot.hw is None:
            return out
        if self.part == "text":
            return rotate(out, *slot.text_freqs())
        cos, sin = slot.image_freqs(plan, self.side)
        if self.part == "joint":
            t_cos, t_sin = slot.text_freqs()
            if out.shape[1] != t_cos.shape[0] + cos.shape[-2]:
                raise ValueError(f"joint sequence of {out.shape[1]} tokens does not hold {t_cos.shape[0]} text tokens")
            if cos.ndim == 3:
                t_cos, t_sin = (t.expand(cos.shape[0], -1, -1) for t in (t_cos, t_sin))
            cos, sin = torch.cat((t_cos, cos), -2), torch.cat((t_sin, sin), -2)
        return rotate(out, cos, sin)


def _checked(maps: list[tuple[Any, Any]]) -> list[tuple[nn.Module, Any]]:
    for module, _ in maps:
        if not isinstance(module, nn.Module):
            raise ValueError("Flux attention without query/key norm modules is not supported (rotary hooks need them)")
    return maps
