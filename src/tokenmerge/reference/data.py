"""Procedural scenes for the reference models: a shape on a background, soft lighting, a five-word caption.

Every scene is ``"<color> <shape> on <color> <background>"``, e.g. ``"red circle on blue gradient"``:

- shape: circle, square (rotated), triangle (rotated) or ring, anti-aliased, shaded by a linear light ramp;
- background: plain, or a gradient (along a random direction), stripes or checks between the background colour and a
  lighter or darker shade of it;
- lighting: the whole image times ``0.7 + 0.5 * exp(-|p - l|^2 / 0.18)`` for a random light position ``l``.

A batch is a pure function of ``(seed, index, batch, size)``: training reads batch ``index`` at step ``index``, so the
data order is fixed. Images are float32 ``(B, 3, size, size)`` in ``[0, 1]``.
"""

from __future__ import annotations

import math

import torch

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.16, 0.14),
    "orange": (0.96, 0.56, 0.10),
    "yellow": (0.96, 0.86, 0.20),
    "green": (0.18, 0.68, 0.26),
    "blue": (0.14, 0.32, 0.86),
    "purple": (0.56, 0.24, 0.76),
    "white": (0.94, 0.94, 0.94),
    "black": (0.08, 0.08, 0.08),
}
SHAPES = ("circle", "square", "triangle", "ring")
BACKGROUNDS = ("plain", "gradient", "stripes", "checks")
PAD = "<pad>"
#: Word-level vocabulary; id 0 is the padding token (the null prompt is all padding).
VOCAB: tuple[str, ...] = (PAD, *COLORS, *SHAPES, *BACKGROUNDS, "on")
MAX_TOKENS = 5


def caption(color: str, shape: str, bg_color: str, background: str) -> str:
    return f"{color} {shape} on {bg_color} {background}"


def tokenize(prompts: list[str], vocab: tuple[str, ...] = VOCAB, max_tokens: int = MAX_TOKENS) -> torch.Tensor:
    """Word ids ``(B, max_tokens)``, padded with 0; ``""`` is the null prompt. Unknown words raise ``ValueError``."""
    index = {w: i for i, w in enumerate(vocab)}
    rows = []
    for prompt in prompts:
        words = prompt.lower().split()
        unknown = [w for w in words if w not in index or w == PAD]
        if unknown:
            raise ValueError(f"prompt {prompt!r}: unknown words {unknown}; the vocabulary is {', '.join(vocab[1:])}")
        if len(words) > max_tokens:
            raise ValueError(f"prompt {prompt!r} has {len(words)} words; at most {max_tokens}")
        rows.append([index[w] for w in words] + [0] * (max_tokens - len(words)))
    return torch.tensor(rows, dtype=torch.long).reshape(len(prompts), max_tokens)


def _rotate(x: torch.Tensor, y: torch.Tensor, angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c, s = torch.cos(angle), torch.sin(angle)
    return c * x + s * y, -s * x + c * y


def shape_sdf(kind: torch.Tensor, x: torch.Tensor, y: torch.Tensor, r: torch.Tensor, angle: torch.Tensor):
    """Signed distance (negative inside) of each sample's shape, centred at the origin of ``(x, y)`` ``(B, S, S)``;
    ``kind`` ``(B,)`` indexes :data:`SHAPES`, ``r`` ``(B, 1, 1)`` is its radius."""
    u, v = _rotate(x, y, angle)
    circle = torch.sqrt(u * u + v * v) - r
    square = torch.maximum(u.abs(), v.abs()) - 0.8 * r
    # equilateral triangle: max of three half-plane distances at 120 degrees
    planes = [u * math.cos(a) + v * math.sin(a) for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, -math.pi / 6)]
    triangle = torch.stack(planes).amax(0) - 0.55 * r
    ring = (circle + 0.35 * r).abs() - 0.3 * r
    sdfs = torch.stack((circle, square, triangle, ring), 1)  # (B, 4, S, S)
    return sdfs.gather(1, kind.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[1:])).squeeze(1)


def _background(kind: torch.Tensor, color: torch.Tensor, x: torch.Tensor, y: torch.Tensor, g: torch.Generator):
    """Backgrounds ``(B, 3, S, S)`` of ``kind`` ``(B,)`` (indexes :data:`BACKGROUNDS`) in ``color`` ``(B, 3)``."""
    b = kind.shape[0]
    angle = torch.rand(b, 1, 1, generator=g) * 2 * math.pi
    u, _ = _rotate(x - 0.5, y - 0.5, angle)
    freq = 3 + 4 * torch.rand(b, 1, 1, generator=g)
    lighter = torch.rand(b, 1, 1, 1, generator=g) < 0.5
    shade = torch.where(lighter, 0.55 + 0.45 * color[..., None, None], 0.45 * color[..., None, None])
    base = color[..., None, None]
    t_plain = torch.zeros_like(u)
    t_gradient = (u + 0.71) / 1.42
    t_stripes = torch.sigmoid(6 * torch.sin(2 * math.pi * freq * u))
    t_checks = torch.sigmoid(6 * torch.sin(math.pi * freq * x) * torch.sin(math.pi * freq * y))
    t = torch.stack((t_plain, t_gradient, t_stripes, t_checks), 1).gather(
        1, kind.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[1:])
    )
    return base + (shade - base) * t


def make_batch(seed: int, index: int, batch: int, size: int = 32) -> tuple[torch.Tensor, list[str]]:
    """Batch ``index`` of the dataset of ``seed``: images ``(batch, 3, size, size)`` in ``[0, 1]`` and captions."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    names = list(COLORS)
    palette = torch.tensor(list(COLORS.values()))
    fg = torch.randint(len(names), (batch,), generator=g)
    bg = (fg + 1 + torch.randint(len(names) - 1, (batch,), generator=g)) % len(names)
    shape = torch.randint(len(SHAPES), (batch,), generator=g)
    backdrop = torch.randint(len(BACKGROUNDS), (batch,), generator=g)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    x, y = x.expand(batch, -1, -1), y.expand(batch, -1, -1)

    image = _background(backdrop, palette[bg], x, y, g)
    center = 0.3 + 0.4 * torch.rand(batch, 2, 1, 1, generator=g)
    radius = 0.16 + 0.14 * torch.rand(batch, 1, 1, generator=g)
    angle = torch.rand(batch, 1, 1, generator=g) * 2 * math.pi
    dx, dy = x - center[:, 0], y - center[:, 1]
    sdf = shape_sdf(shape, dx, dy, radius, angle)
    alpha = (0.5 - sdf * size).clamp(0, 1)[:, None]  # one-pixel anti-aliased edge
    ramp = 0.85 + 0.3 * ((dx * torch.cos(angle) + dy * torch.sin(angle)) / (2 * radius) + 0.5).clamp(0, 1)[:, None]
    image = image * (1 - alpha) + (palette[fg][..., None, None] * ramp).clamp(0, 1) * alpha

    light = torch.rand(batch, 2, 1, 1, generator=g)
    glow = torch.exp(-((x - light[:, 0]) ** 2 + (y - light[:, 1]) ** 2) / 0.18)
    image = (image * (0.7 + 0.5 * glow[:, None])).clamp(0, 1)
    prompts = [
        caption(names[int(f)], SHAPES[int(s)], names[int(c)], BACKGROUNDS[int(k)])
        for f, s, c, k in zip(fg, shape, bg, backdrop, strict=True)
    ]
    return image, prompts
