"""Procedural 64x64 scenes for the reference models: two or three lit objects, with occlusion and shadows, on a
textured background, and a caption that names every object, colour and the background.

Caption grammar (fixed): ``"<color> <shape> and <color> <shape> [and <color> <shape>] on <color> <texture>"``, e.g.
``"red circle and blue square on green stripes"``. Objects are named back to front (a later one may occlude an earlier
one); every object and the background have distinct colours.

- objects: circle, square or triangle (rotated), radius 14-20% of the side (smaller in the rare crowded image),
  shaded by a ramp towards the light, with
  a dark one-pixel rim and a soft drop shadow away from the light; each one overlaps an earlier one with probability
  0.6, by at most about 10% of its area (centres at least 0.8 times the sum of the radii apart), so every object stays
  readable;
- background textures at four spatial frequencies: ``gradient`` (one ramp across the image), ``checks`` (period 10-20
  pixels at 64), ``stripes`` (period 5-10 pixels, any direction), ``noise`` (per-pixel speckle over a coarse 8x8 value
  noise), each between the background colour and a lighter or darker shade of it;
- lighting: the whole image times ``0.7 + 0.5 * exp(-|p - l|^2 / 0.25)`` around a light position ``l`` just outside
  the centre region in the light's direction.

A batch is a pure function of ``(seed, index, batch, size)``: training reads batch ``index`` at step ``index``, so the
data order is fixed. Images are float32 ``(B, 3, size, size)`` in ``[0, 1]``. :func:`parse` reads a caption back into
a :class:`Scene`, the labels of the scene classifier (:mod:`tokenmerge.reference.scenes`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.14, 0.12),
    "yellow": (0.96, 0.84, 0.16),
    "green": (0.16, 0.66, 0.24),
    "blue": (0.14, 0.30, 0.88),
    "purple": (0.58, 0.22, 0.74),
    "white": (0.94, 0.94, 0.94),
}
SHAPES = ("circle", "square", "triangle")
TEXTURES = ("gradient", "checks", "stripes", "noise")
PAD = "<pad>"
#: Word-level vocabulary; id 0 is the padding token (the null prompt is all padding).
VOCAB: tuple[str, ...] = (PAD, *COLORS, *SHAPES, *TEXTURES, "and", "on")
MIN_OBJECTS, MAX_OBJECTS = 2, 3
MAX_TOKENS = 3 * MAX_OBJECTS + 2  # "c s and c s and c s on c t"
IMAGE_SIZE = 64


@dataclass(frozen=True)
class Scene:
    """What a caption says: objects ``(color, shape)`` back to front, the background colour and texture."""

    objects: tuple[tuple[str, str], ...]
    background: str
    texture: str

    @property
    def caption(self) -> str:
        names = " and ".join(f"{c} {s}" for c, s in self.objects)
        return f"{names} on {self.background} {self.texture}"


def parse(prompt: str) -> Scene:
    """The :class:`Scene` of a caption in the fixed grammar; anything else raises ``ValueError``."""
    words = prompt.lower().split()
    fail = ValueError(
        f"caption {prompt!r} is not '<color> <shape> and <color> <shape> [and <color> <shape>] on <color> <texture>' "
        f"(colors: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)}; textures: {', '.join(TEXTURES)}; distinct colors)"
    )
    if len(words) < 5 or words[-3] != "on" or (len(words) - 2) % 3:
        raise fail
    parts = " ".join(words[:-3]).split(" and ")
    objects = tuple(tuple(p.split()) for p in parts)
    colors = [o[0] for o in objects if len(o) == 2] + [words[-2]]
    ok = (
        MIN_OBJECTS <= len(objects) <= MAX_OBJECTS
        and all(len(o) == 2 and o[0] in COLORS and o[1] in SHAPES for o in objects)
        and words[-2] in COLORS
        and words[-1] in TEXTURES
        and len(set(colors)) == len(colors)
    )
    if not ok:
        raise fail
    return Scene(objects, words[-2], words[-1])  # type: ignore[arg-type]


def sample_captions(count: int, seed: int = 0) -> list[str]:
    """``count`` distinct captions drawn from the grammar with the distribution of :func:`make_batch` (2 or 3
    objects, distinct colours; a seeded draw of captions only, no images)."""
    rng = random.Random(seed)
    drawn: dict[str, None] = {}
    while len(drawn) < count:
        colors = rng.sample(list(COLORS), MAX_OBJECTS + 1)
        objects = tuple((c, rng.choice(SHAPES)) for c in colors[1 : 1 + rng.randint(MIN_OBJECTS, MAX_OBJECTS)])
        drawn.setdefault(Scene(objects, colors[0], rng.choice(TEXTURES)).caption, None)
    return list(drawn)


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
    """Signed distance (negative inside; exact for the circle, a bound for the polygons) of each sample's shape,
    centred at the origin of ``(x, y)`` ``(B, S, S)``; ``kind`` ``(B,)`` indexes :data:`SHAPES`, ``r`` ``(B, 1, 1)``
    is its radius (square: half-side ``0.8 r``; triangle: equilateral, inradius ``0.6 r``)."""
    u, v = _rotate(x, y, angle)
    circle = torch.sqrt(u * u + v * v) - r
    square = torch.maximum(u.abs(), v.abs()) - 0.8 * r
    planes = [u * math.cos(a) + v * math.sin(a) for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, -math.pi / 6)]
    triangle = torch.stack(planes).amax(0) - 0.6 * r
    sdfs = torch.stack((circle, square, triangle), 1)  # (B, 3, S, S)
    return sdfs.gather(1, kind.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[1:])).squeeze(1)


def _background(kind: torch.Tensor, color: torch.Tensor, x: torch.Tensor, y: torch.Tensor, g: torch.Generator):
    """Backgrounds ``(B, 3, S, S)`` of ``kind`` ``(B,)`` (indexes :data:`TEXTURES`) in ``color`` ``(B, 3)``."""
    b, size = kind.shape[0], x.shape[-1]
    angle = torch.rand(b, 1, 1, generator=g) * 2 * math.pi
    u, _ = _rotate(x - 0.5, y - 0.5, angle)
    lighter = torch.rand(b, 1, 1, 1, generator=g) < 0.5
    base = color[..., None, None]
    shade = torch.where(lighter, 0.55 + 0.45 * base, 0.4 * base)
    t_gradient = (u + 0.71) / 1.42
    period = (10 + 10 * torch.rand(b, 1, 1, generator=g)) / 64
    t_checks = torch.sigmoid(8 * torch.sin(math.pi * x / period) * torch.sin(math.pi * y / period))
    period = (5 + 5 * torch.rand(b, 1, 1, generator=g)) / 64
    t_stripes = torch.sigmoid(8 * torch.sin(2 * math.pi * u / period))
    coarse = F.interpolate(torch.rand(b, 1, 8, 8, generator=g), size=(size, size), mode="bilinear")[:, 0]
    t_noise = (0.45 * coarse + 0.55 * torch.rand(b, size, size, generator=g)).clamp(0, 1)
    t = torch.stack((t_gradient, t_checks, t_stripes, t_noise), 1)
    t = t.gather(1, kind.view(-1, 1, 1, 1).expand(-1, 1, size, size))
    return base + (shade - base) * t


def _layout(g: torch.Generator, count: int, radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres ``(count, 2)`` and radii ``(count,)`` of objects of ``radius`` ``(count,)``, inside the image, each at
    least 0.8 times the sum of the radii from the earlier ones, and touching one of them (overlapping) with
    probability 0.6. When 200 tries find no room (one image in about 2,500), the object shrinks by 15% per
    further 200 tries."""
    radius = radius.clone()
    centres: list[torch.Tensor] = []
    for i in range(count):
        r = float(radius[i])
        touch = bool(torch.rand(1, generator=g) < 0.6) and i > 0
        for attempt in range(1000):
            if attempt and attempt % 200 == 0:
                r = 0.85 * r
                radius[i] = r
            if touch:
                j = int(torch.randint(i, (1,), generator=g))
                d = (0.8 + 0.2 * torch.rand(1, generator=g)) * (r + float(radius[j]))
                a = torch.rand(1, generator=g) * 2 * math.pi
                c = centres[j] + d * torch.cat((torch.cos(a), torch.sin(a)))
            else:
                c = r + 0.03 + (1 - 2 * r - 0.06) * torch.rand(2, generator=g)
            inside = bool(((c >= r + 0.02) & (c <= 1 - r - 0.02)).all())
            apart = all(float((c - o).norm()) >= 0.8 * (r + float(radius[k])) for k, o in enumerate(centres))
            if inside and apart:
                break
            touch = touch and bool(torch.rand(1, generator=g) < 0.9)  # fall back to a free place eventually
        else:  # pragma: no cover - a 44% smaller object always fits
            raise RuntimeError("no room for the objects")
        centres.append(c)
    return torch.stack(centres), radius


def make_batch(seed: int, index: int, batch: int, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, list[str]]:
    """Batch ``index`` of the dataset of ``seed``: images ``(batch, 3, size, size)`` in ``[0, 1]`` and captions."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    names, palette = list(COLORS), torch.tensor(list(COLORS.values()))
    # distinct colours: background first, then the objects, from one random permutation per image
    perm = torch.stack([torch.randperm(len(names), generator=g) for _ in range(batch)])
    count = MIN_OBJECTS + torch.randint(MAX_OBJECTS - MIN_OBJECTS + 1, (batch,), generator=g)
    kind = torch.randint(len(SHAPES), (batch, MAX_OBJECTS), generator=g)
    texture = torch.randint(len(TEXTURES), (batch,), generator=g)
    radius = 0.14 + 0.06 * torch.rand(batch, MAX_OBJECTS, generator=g)
    angle = torch.rand(batch, MAX_OBJECTS, generator=g) * 2 * math.pi
    layouts = [_layout(g, MAX_OBJECTS, radius[i]) for i in range(batch)]
    centre = torch.stack([c for c, _ in layouts])  # (B, K, 2)
    radius = torch.stack([r for _, r in layouts])
    light = torch.rand(batch, generator=g) * 2 * math.pi
    light_dir = torch.stack((torch.cos(light), torch.sin(light)), 1)  # (B, 2), towards the light

    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    x, y = x.expand(batch, -1, -1), y.expand(batch, -1, -1)
    image = _background(texture, palette[perm[:, 0]], x, y, g)
    lx, ly = light_dir[:, 0, None, None], light_dir[:, 1, None, None]
    for k in range(MAX_OBJECTS):
        present = (k < count).float()[:, None, None, None]
        r, a = radius[:, k, None, None], angle[:, k, None, None]
        dx, dy = x - centre[:, k, 0, None, None], y - centre[:, k, 1, None, None]
        shadow = (0.5 - shape_sdf(kind[:, k], dx + 0.05 * lx, dy + 0.05 * ly, r, a) * size / 3).clamp(0, 1)
        image = image * (1 - 0.4 * present * shadow[:, None])
        sdf = shape_sdf(kind[:, k], dx, dy, r, a) * size  # in pixels
        alpha = present * (0.5 - sdf).clamp(0, 1)[:, None]
        ramp = 0.8 + 0.35 * ((dx * lx + dy * ly) / (2 * r) + 0.5).clamp(0, 1)
        rim = 1 - 0.45 * (1.5 + sdf).clamp(0, 1)  # dark outline: the outer 1.5 pixels
        fill = (palette[perm[:, k + 1]][..., None, None] * (ramp * rim)[:, None]).clamp(0, 1)
        image = image * (1 - alpha) + fill * alpha

    glow_at = 0.5 + 0.45 * light_dir
    glow = torch.exp(-((x - glow_at[:, 0, None, None]) ** 2 + (y - glow_at[:, 1, None, None]) ** 2) / 0.25)
    image = (image * (0.7 + 0.5 * glow[:, None])).clamp(0, 1)
    prompts = [
        Scene(
            tuple((names[int(perm[i, k + 1])], SHAPES[int(kind[i, k])]) for k in range(int(count[i]))),
            names[int(perm[i, 0])],
            TEXTURES[int(texture[i])],
        ).caption
        for i in range(batch)
    ]
    return image, prompts
