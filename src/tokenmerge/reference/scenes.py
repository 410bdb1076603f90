"""Scene-aware metrics for the reference models: a small classifier that reads every caption attribute back from an
image, giving caption accuracy (an offline CLIP-T) and a Fréchet distance over its features (an offline FID).

The classifier (:class:`SceneClassifier`: a CNN and a query per colour, ~0.45 M parameters) is trained on the scene
generator's own images (:func:`tokenmerge.reference.data.make_batch`, dataset seed 3) to predict, per image,

- the background colour (one of :data:`~tokenmerge.reference.data.COLORS`) and texture (one of ``TEXTURES``);
- for every colour, the shape of the object of that colour, or *absent* (objects have distinct colours).

**Caption accuracy** of an image and its caption ``"c1 s1 and c2 s2 [and c3 s3] on b t"``: the share of the caption's
``2k + 2`` content words that the classifier reads back, i.e. the background colour ``b``, the texture ``t``, and for
each of the ``k`` objects its colour (the head of ``ci`` says *present*) and its shape (the head of ``ci`` says
``si``). **Exact match**: every head agrees with the caption, including *absent* for the colours it does not name
(so an extra object counts against it). Order (which object is in front) is not read.

**Scene Fréchet distance**: :func:`tokenmerge.harness.metrics.frechet_distance` between two image sets' 64-d
penultimate classifier features (:func:`scene_features`); against the held-out real scenes (dataset seed 2,
:func:`real_features`) it is an offline FID, between accelerated and unaccelerated images a distribution-level
fidelity. Like FID it is biased upwards for small sets: compare only at equal set sizes.

    python -m tokenmerge.reference.train --model classifier --out DIR --steps 1500 --batch 64   # the packaged one

``caption_accuracy``, ``exact_match``, ``scene_features`` and ``read`` use the packaged classifier
(``weights/classifier.safetensors``, loaded once) unless given another one.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmerge.reference.data import COLORS, IMAGE_SIZE, SHAPES, TEXTURES, Scene, make_batch, parse

WEIGHTS = Path(__file__).parent / "weights" / "classifier.safetensors"
SCENE_FEATURES, OBJECT_FEATURES = 16, 8
FEATURES = SCENE_FEATURES + OBJECT_FEATURES * len(COLORS)  # 64
TRAIN_SEED, HELD_OUT_SEED = 3, 2
_COLORS, _ABSENT = list(COLORS), len(SHAPES)  # object heads: class s < len(SHAPES) = that shape, len(SHAPES) = absent


def labels(prompts: Sequence[str]) -> torch.Tensor:
    """Class indices ``(B, 2 + len(COLORS))`` of captions: background colour, texture, then per colour the shape of
    the object of that colour or ``len(SHAPES)`` (absent)."""
    rows = []
    for prompt in prompts:
        scene = parse(prompt)
        shape_of = dict(scene.objects)
        row = [_COLORS.index(scene.background), TEXTURES.index(scene.texture)]
        rows.append(row + [SHAPES.index(shape_of[c]) if c in shape_of else _ABSENT for c in _COLORS])
    return torch.tensor(rows, dtype=torch.long).reshape(len(prompts), 2 + len(_COLORS))


class SceneClassifier(nn.Module):
    """``[0, 1]`` images ``(B, 3, 64, 64)`` -> features ``(B, 64)`` -> logits of the background colour
    ``(B, len(COLORS))``, the texture ``(B, len(TEXTURES))`` and each colour's object ``(B, len(COLORS),
    len(SHAPES) + 1)``. Other square sizes are resized to 64 (bilinear, antialiased).

    A CNN trunk (6 convolutions with BatchNorm, 64 -> 8x8 x ``4 width``) feeds two readouts: the scene (mean- and
    max-pooled trunk -> 16 features -> background colour and texture) and the objects (one learned query per colour
    attends over the 64 trunk positions, ``softmax(k(F) q_c / sqrt(d))``, to pool "the object of that colour" -> 8
    features each -> shape or absent, one head shared by the colours). The features are the two readouts' inputs to
    their last layers concatenated: ``16 + 8 len(COLORS) = 64``.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = (width, 2 * width, 2 * width, 4 * width, 4 * width, 4 * width)
        layers: list[nn.Module] = [nn.Conv2d(3, w[0], 4, stride=2, padding=1)]  # 32x32
        for i in range(1, len(w)):  # strides 1, 2, 1, 2, 1: 32, 16, 16, 8, 8
            layers += [nn.BatchNorm2d(w[i - 1]), nn.SiLU(), nn.Conv2d(w[i - 1], w[i], 3, stride=2 - i % 2, padding=1)]
        self.trunk = nn.Sequential(*layers, nn.BatchNorm2d(w[-1]), nn.SiLU())
        dim = w[-1]
        self.scene = nn.Sequential(nn.Linear(2 * dim, SCENE_FEATURES), nn.SiLU())
        self.queries = nn.Parameter(torch.randn(len(COLORS), dim) / math.sqrt(dim))
        self.keys = nn.Linear(dim, dim)
        self.object = nn.Sequential(nn.Linear(dim, OBJECT_FEATURES), nn.SiLU())
        self.scene_head = nn.Linear(SCENE_FEATURES, len(COLORS) + len(TEXTURES))
        self.object_head = nn.Linear(OBJECT_FEATURES, len(SHAPES) + 1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, 64)`` of ``[0, 1]`` images."""
        x = images.float()
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False)
        tokens = self.trunk(x * 2 - 1).flatten(2).transpose(1, 2)  # (B, 64, dim)
        scene = self.scene(torch.cat((tokens.mean(1), tokens.amax(1)), 1))
        weights = torch.softmax(self.keys(tokens) @ self.queries.T / math.sqrt(tokens.shape[-1]), dim=1)  # (B, 64, C)
        objects = self.object(weights.transpose(1, 2) @ tokens)  # (B, C, OBJECT_FEATURES)
        return torch.cat((scene, objects.flatten(1)), 1)

    def logits(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Background-colour, texture and object logits of :meth:`features`."""
        scene = self.scene_head(features[:, :SCENE_FEATURES])
        objects = self.object_head(features[:, SCENE_FEATURES:].view(-1, len(COLORS), OBJECT_FEATURES))
        return scene[:, : len(COLORS)], scene[:, len(COLORS) :], objects

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted class indices ``(B, 2 + len(COLORS))``, laid out as :func:`labels`."""
        background, texture, objects = self.logits(self.features(images))
        return torch.cat((background.argmax(1, keepdim=True), texture.argmax(1, keepdim=True), objects.argmax(2)), 1)

    def loss(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of the three readouts against :func:`labels` ``target``."""
        background, texture, objects = self.logits(self.features(images))
        return (
            F.cross_entropy(background, target[:, 0])
            + F.cross_entropy(texture, target[:, 1])
            + F.cross_entropy(objects.flatten(0, 1), target[:, 2:].flatten())
        )


@dataclass(frozen=True)
class CaptionScores:
    """Per-image caption accuracy (share of content words read back) and exact match, ``(N,)`` each."""

    accuracy: torch.Tensor
    exact: torch.Tensor


def score(predicted: torch.Tensor, target: torch.Tensor) -> CaptionScores:
    """:class:`CaptionScores` of predicted class indices against :func:`labels` ``target``, both ``(N, 2 + C)``."""
    named = target[:, 2:] != _ABSENT  # the caption's object colours
    hits = predicted[:, 2:] == target[:, 2:]
    present = predicted[:, 2:] != _ABSENT
    words = (predicted[:, :2] == target[:, :2]).sum(1) + ((present & named).sum(1) + (hits & named).sum(1))
    accuracy = words.float() / (2 + 2 * named.sum(1)).float()
    return CaptionScores(accuracy, (predicted == target).all(1))


def save(path: Path, model: SceneClassifier, info: dict[str, Any]) -> None:
    """Write the classifier as safetensors (floating-point tensors in fp16) with ``info`` and the label vocabulary as
    metadata."""
    from safetensors.torch import save_file

    state = model.state_dict()
    tensors = {k: (v.half() if v.is_floating_point() else v).detach().contiguous() for k, v in state.items()}
    meta = dict(model="classifier", colors=_COLORS, shapes=list(SHAPES), textures=list(TEXTURES), **info)
    save_file(tensors, str(path), metadata={"tokenmerge": json.dumps(meta)})


def load(path: Path | None = None) -> SceneClassifier:
    """The classifier from its fp16 file (default: the packaged one), float32, eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else WEIGHTS
    if not path.is_file():
        raise ValueError(f"no scene classifier at {path}; train it with python -m tokenmerge.reference.train")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["tokenmerge"])
    vocab = (meta.get("colors"), meta.get("shapes"), meta.get("textures"))
    if meta.get("model") != "classifier" or vocab != (_COLORS, list(SHAPES), list(TEXTURES)):
        raise ValueError(f"{path} is not a scene classifier of this vocabulary")
    model = SceneClassifier(width=meta.get("width", 32))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()})
    return model.eval()


@functools.cache
def _packaged() -> SceneClassifier:
    return load()


@torch.no_grad()
def _batched(fn: Any, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([fn(images[i : i + batch].cpu()) for i in range(0, len(images), batch)])


def read(images: torch.Tensor, classifier: SceneClassifier | None = None) -> list[Scene | None]:
    """What the classifier sees in ``[0, 1]`` images ``(N, 3, H, W)``: a :class:`Scene` per image (objects in
    colour order), or ``None`` where it reads fewer than two or more than three objects."""
    predicted = _batched(classifier or _packaged(), images)
    scenes: list[Scene | None] = []
    for row in predicted.tolist():
        objects = tuple((c, SHAPES[s]) for c, s in zip(_COLORS, row[2:], strict=True) if s != _ABSENT)
        ok = 2 <= len(objects) <= 3 and _COLORS[row[0]] not in dict(objects)
        scenes.append(Scene(objects, _COLORS[row[0]], TEXTURES[row[1]]) if ok else None)
    return scenes


def caption_scores(
    images: torch.Tensor, prompts: Sequence[str], classifier: SceneClassifier | None = None
) -> CaptionScores:
    """Caption accuracy and exact match of ``[0, 1]`` images ``(N, 3, H, W)`` against their captions."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} captions")
    return score(_batched(classifier or _packaged(), images), labels(prompts))


def caption_accuracy(
    images: torch.Tensor, prompts: Sequence[str], classifier: SceneClassifier | None = None
) -> torch.Tensor:
    """Per-image share ``(N,)`` of caption content words the classifier reads back (see the module docstring)."""
    return caption_scores(images, prompts, classifier).accuracy


def exact_match(
    images: torch.Tensor, prompts: Sequence[str], classifier: SceneClassifier | None = None
) -> torch.Tensor:
    """Per-image ``(N,)`` bool: every attribute of the caption read back and no other object seen."""
    return caption_scores(images, prompts, classifier).exact


def scene_features(images: torch.Tensor, classifier: SceneClassifier | None = None) -> torch.Tensor:
    """Penultimate classifier features ``(N, 64)`` of ``[0, 1]`` images."""
    model = classifier or _packaged()
    return _batched(model.features, images)


def frechet_distance(features: torch.Tensor, reference: torch.Tensor) -> float:
    """Scene Fréchet distance between two feature sets ``(N, 64)`` (:func:`scene_features`)."""
    from tokenmerge.harness.metrics import frechet_distance as fd

    return fd(features, reference)


@functools.cache
def _real_features(count: int, seed: int) -> torch.Tensor:
    images = torch.cat([make_batch(seed, i, min(64, count - 64 * i))[0] for i in range((count + 63) // 64)])
    return scene_features(images)


def real_features(count: int = 1024, seed: int = HELD_OUT_SEED) -> torch.Tensor:
    """Packaged-classifier features ``(count, 64)`` of held-out real scenes (dataset ``seed``, batches of 64),
    computed once per process."""
    return _real_features(count, seed)


def train_classifier(
    steps: int,
    batch: int = 64,
    images: int = 12_288,
    lr: float = 2e-3,
    seed: int = TRAIN_SEED,
    width: int = 32,
    progress: bool = True,
) -> tuple[SceneClassifier, list[float]]:
    """Train a :class:`SceneClassifier` on ``images`` scenes of dataset ``seed`` (rendered once, batches of 64),
    ``steps`` AdamW steps of ``batch`` with random flips, 90-degree turns, Gaussian blur (sigma up to 1 pixel, half
    of the images) and noise (std up to 0.05), so that it reads blurred or noisy generations too. Deterministic for
    a given thread count. Returns the model (eval mode) and the loss of every step."""
    from tqdm import tqdm

    pool, prompts = [], []
    for i in tqdm(range((images + 63) // 64), desc="render scenes", disable=not progress):
        x, p = make_batch(seed, i, 64)
        pool.append((x * 255).round().to(torch.uint8))
        prompts += p
    data, target = torch.cat(pool)[:images], labels(prompts[:images])
    torch.manual_seed(seed)
    model = SceneClassifier(width).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)  # linear warm-up, then cosine decay to 0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))),
    )
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for _ in (bar := tqdm(range(steps), desc="train classifier", disable=not progress)):
        idx = torch.randint(len(data), (batch,), generator=g)
        x = augment(data[idx].float() / 255, g)
        loss = model.loss(x, target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    return model.eval(), losses


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Label-preserving augmentations of ``[0, 1]`` images ``(B, 3, S, S)``: a random flip and quarter turn per
    batch, Gaussian blur of half of the images (sigma uniform in [0.3, 1] pixel), Gaussian noise (std uniform in
    [0, 0.05])."""
    b = x.shape[0]
    if bool(torch.rand(1, generator=g) < 0.5):
        x = x.flip(-1)
    x = torch.rot90(x, int(torch.randint(4, (1,), generator=g)), (-2, -1))
    sigma = 0.3 + 0.7 * torch.rand(b, 1, generator=g)
    taps = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # (B, 5)
    blurred = _separable(x, kernel)
    x = torch.where((torch.rand(b, 1, 1, 1, generator=g) < 0.5), blurred, x)
    noise = torch.randn(x.shape, generator=g) * 0.05 * torch.rand(b, 1, 1, 1, generator=g)
    return (x + noise).clamp(0, 1)


def _separable(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Per-image separable convolution of ``x`` ``(B, C, H, W)`` with 1-D kernels ``(B, K)`` (reflect padding)."""
    b, c, h, w = x.shape
    k = kernel.shape[1]
    flat = F.pad(x.reshape(1, b * c, h, w), (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    weight = kernel.repeat_interleave(c, 0)  # (B*C, K)
    flat = F.conv2d(flat, weight.view(b * c, 1, 1, k), groups=b * c)
    flat = F.conv2d(flat, weight.view(b * c, 1, k, 1), groups=b * c)
    return flat.view(b, c, h, w)


@torch.no_grad()
def held_out_accuracy(model: SceneClassifier, count: int = 1024, seed: int = HELD_OUT_SEED) -> dict[str, float]:
    """Accuracy on ``count`` held-out real scenes: per readout (background colour, texture, object heads over all
    colours), caption accuracy (mean) and exact match (share)."""
    images, prompts = [], []
    for i in range((count + 63) // 64):
        x, p = make_batch(seed, i, min(64, count - 64 * i))
        images.append(x)
        prompts += p
    x, target = torch.cat(images), labels(prompts)
    predicted = _batched(model, x)
    scores = score(predicted, target)
    hits = predicted == target
    return dict(
        background=float(hits[:, 0].float().mean()),
        texture=float(hits[:, 1].float().mean()),
        objects=float(hits[:, 2:].float().mean()),
        caption_accuracy=float(scores.accuracy.mean()),
        exact_match=float(scores.exact.float().mean()),
    )


#: Dataset seed whose captions the generation evaluation uses (never trained or validated on).
EVAL_SEED = 4


def attribute_accuracy(predicted: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Per-attribute accuracy over a set: background colour, texture, named object colours seen (head not *absent*),
    shapes of the seen named objects, and unnamed colours correctly *absent*."""
    named = target[:, 2:] != _ABSENT
    seen = named & (predicted[:, 2:] != _ABSENT)
    return dict(
        background=float((predicted[:, 0] == target[:, 0]).float().mean()),
        texture=float((predicted[:, 1] == target[:, 1]).float().mean()),
        object_color=float(seen.sum() / named.sum()),
        object_shape=float(((predicted[:, 2:] == target[:, 2:]) & seen).sum() / seen.sum().clamp_min(1)),
        no_extra_object=float((predicted[:, 2:] == _ABSENT)[~named].float().mean()),
    )


def evaluate(
    pipe: Any, count: int = 64, steps: int = 20, guidance_scale: float = 3.0, batch: int = 8
) -> tuple[dict[str, Any], torch.Tensor]:
    """Scene metrics of ``count`` generations of a reference pipeline: the captions of the first ``count`` scenes of
    dataset :data:`EVAL_SEED`, noise seeds ``0..count-1``. Returns the mean caption accuracy, the exact-match share,
    :func:`attribute_accuracy`, the scene Fréchet distance of the generations to 1024 held-out real scenes
    (:func:`real_features`) and, as the floor at this set size, that of the real scenes of the same captions; and
    the generated images ``(count, 3, S, S)``."""
    real, prompts = make_batch(EVAL_SEED, 0, count)
    images = torch.cat(
        [
            pipe(prompts[i : i + batch], list(range(i, min(i + batch, count))), steps, guidance_scale)
            for i in range(0, count, batch)
        ]
    )
    predicted, target = _batched(_packaged(), images), labels(prompts)
    scores = score(predicted, target)
    reference = real_features()
    return dict(
        count=count,
        steps=steps,
        guidance_scale=guidance_scale,
        caption_accuracy=float(scores.accuracy.mean()),
        exact_match=float(scores.exact.float().mean()),
        attributes=attribute_accuracy(predicted, target),
        frechet_distance=frechet_distance(scene_features(images), reference),
        frechet_distance_real=frechet_distance(scene_features(real), reference),
    ), images


def main(argv: list[str] | None = None) -> int:
    """``python -m tokenmerge.reference.scenes --model unet``: :func:`evaluate` a packaged (or ``--weights``)
    reference model; prints JSON and optionally writes the generations as a grid."""
    import argparse

    from tokenmerge.harness.report import image_grid
    from tokenmerge.reference.models import MODELS
    from tokenmerge.reference.pipeline import load_pipeline, to_pil

    parser = argparse.ArgumentParser(prog="python -m tokenmerge.reference.scenes", description=main.__doc__)
    parser.add_argument("--model", required=True, choices=MODELS)
    parser.add_argument("--weights", type=Path, help="weights file (default: the packaged one)")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--grid", type=Path, help="write the generations (8 a row) to this PNG")
    args = parser.parse_args(argv)
    if args.num_images < 2 or args.steps < 1:
        parser.error("--num-images must be >= 2 and --steps >= 1")
    result, images = evaluate(load_pipeline(args.model, args.weights), args.num_images, args.steps, args.guidance_scale)
    print(json.dumps(dict(model=args.model, weights=str(args.weights or "packaged"), **result), indent=1))
    if args.grid:
        pil = to_pil(images, 2)
        image_grid([pil[i : i + 8] for i in range(0, len(pil), 8)]).save(args.grid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
