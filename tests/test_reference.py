"""The reference models: packaged weights, dataset, pipeline, training and the ``tokenmerge demo`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import tokenmerge as tm
from tokenmerge.cli import main
from tokenmerge.reference import models, scenes, train
from tokenmerge.reference.data import (
    COLORS,
    MAX_TOKENS,
    SHAPES,
    TEXTURES,
    VOCAB,
    Scene,
    make_batch,
    parse,
    sample_captions,
    tokenize,
)
from tokenmerge.reference.pipeline import load_pipeline, pack, unpack

ROOT = Path(__file__).resolve().parents[1]
#: Tiny configs (seconds to train a few steps) of each reference layout, on 16x16 images.
TINY = {
    "unet": dict(block_out_channels=(8, 16, 16, 16), cross_attention_dim=16, attention_head_dim=1),
    "flux": dict(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4),
    ),
}


@pytest.mark.parametrize("name", models.MODELS)
def test_packaged_weights_are_fp16_and_load_as_float32_eval_modules(name: str) -> None:
    path = models.weights_path(name)
    with safe_open(str(path), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    denoiser, text_encoder, meta = models.load(name)
    assert meta["model"] == name and meta["vocab"] == list(VOCAB)
    for module in (denoiser, text_encoder):
        assert not module.training
        assert {p.dtype for p in module.parameters()} == {torch.float32}
        assert all(p.device.type == "cpu" for p in module.state_dict().values())
    assert type(denoiser).__name__ == ("UNet2DConditionModel" if name == "unet" else "FluxTransformer2DModel")


def test_weights_fit_the_size_budget() -> None:
    files = sorted(models.WEIGHTS.glob("*.safetensors"))
    assert [f.stem for f in files] == sorted([*models.MODELS, "classifier"])
    assert sum(f.stat().st_size for f in files) <= 25_000_000


def test_weights_are_declared_package_data() -> None:
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "weights/*.safetensors" in data["tokenmerge.reference"]


def test_load_rejects_a_missing_file_or_another_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no reference weights"):
        models.load("unet", tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="holds the 'flux' reference model"):
        models.load("unet", models.weights_path("flux"))
    with pytest.raises(ValueError, match="unknown reference model"):
        models.weights_path("sdxl")


def test_dataset_is_deterministic_and_in_range() -> None:
    images, prompts = make_batch(0, 3, 6)
    again, prompts_again = make_batch(0, 3, 6)
    other, _ = make_batch(0, 4, 6)
    assert torch.equal(images, again) and prompts == prompts_again
    assert not torch.equal(images, other)
    assert images.shape == (6, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    assert tokenize(prompts).shape == (6, MAX_TOKENS)
    small, small_prompts = make_batch(0, 3, 6, size=32)  # progressive training: the same scenes at half the size
    assert small.shape == (6, 3, 32, 32) and small_prompts == prompts


def test_captions_name_every_object_in_the_fixed_grammar() -> None:
    _, prompts = make_batch(5, 0, 64)
    scenes_ = [parse(p) for p in prompts]
    assert {len(s.objects) for s in scenes_} == {2, 3}
    assert {s.texture for s in scenes_} == set(TEXTURES)
    assert {shape for s in scenes_ for _, shape in s.objects} == set(SHAPES)
    for scene, prompt in zip(scenes_, prompts, strict=True):
        colors = [c for c, _ in scene.objects] + [scene.background]
        assert len(set(colors)) == len(colors) and set(colors) <= set(COLORS)
        assert scene.caption == prompt
    drawn = sample_captions(50, seed=1)
    assert len(set(drawn)) == 50 and drawn == sample_captions(50, seed=1) and all(parse(p) for p in drawn)


def test_scenes_have_texture_detail_and_lighting() -> None:
    """What flat toys lack: high-frequency texture next to flat object interiors, and light that varies."""
    images, prompts = make_batch(6, 0, 32)
    textures = [parse(p).texture for p in prompts]
    detail = (images[..., 1:, :] - images[..., :-1, :]).abs().mean((1, 2, 3))  # mean vertical pixel step
    by_texture = {t: detail[[i for i, x in enumerate(textures) if x == t]].mean() for t in set(textures)}
    assert by_texture["noise"] > 2 * by_texture["gradient"] and by_texture["stripes"] > by_texture["gradient"]
    brightness = images.mean(1)  # lighting: image halves differ
    assert (brightness[:, :32].mean((1, 2)) - brightness[:, 32:].mean((1, 2))).abs().max() > 0.05


def test_parse_reads_captions_back_and_rejects_others() -> None:
    scene = parse("red circle and blue square and white triangle on green stripes")
    assert scene == Scene((("red", "circle"), ("blue", "square"), ("white", "triangle")), "green", "stripes")
    for bad in (
        "red circle on green stripes",  # one object
        "red circle and red square on green stripes",  # repeated colour
        "red circle and blue square on red stripes",  # object colour = background colour
        "red circle and blue square on green plain",  # unknown texture
        "red circle and blue square and white triangle and yellow circle on green noise",  # four objects
        "red circle blue square on green noise",
    ):
        with pytest.raises(ValueError, match="is not"):
            parse(bad)


def test_tokenize_pads_and_rejects_unknown_words() -> None:
    ids = tokenize(["red circle and blue square on green stripes", ""])
    assert ids[1].eq(0).all() and ids[0, :8].ne(0).all() and ids[0, 8:].eq(0).all()
    with pytest.raises(ValueError, match="unknown words"):
        tokenize(["a lighthouse at dawn"])


def test_pack_unpack_round_trip() -> None:
    x = torch.randn(2, 3, 8, 6)
    assert pack(x).shape == (2, 12, 12)
    assert torch.equal(unpack(pack(x), 8, 6), x)


@pytest.mark.parametrize("name", models.MODELS)
def test_pipeline_is_deterministic_per_seed(name: str) -> None:
    pipe = load_pipeline(name)
    prompts = ["red circle and blue square on green stripes", "white square and yellow triangle on purple noise"]
    first = pipe(prompts, [0, 1], steps=2)
    assert first.shape == (2, 3, 64, 64) and 0 <= first.min() and first.max() <= 1
    assert torch.equal(pipe(prompts, [0, 1], steps=2), first)
    assert not torch.equal(pipe(prompts, [2, 1], steps=2)[0], first[0])
    tm.apply(pipe, tm.ToMA(blocks={"double": (0, None), "single": (0, None)} if name == "flux" else None))
    assert not torch.equal(pipe(prompts, [0, 1], steps=2), first)  # the patch reaches the pipeline's denoiser
    tm.remove(pipe)
    assert torch.equal(pipe(prompts, [0, 1], steps=2), first)
    with pytest.raises(ValueError, match="one seed per prompt"):
        pipe(prompts, [0], steps=2)


@pytest.mark.parametrize("name", models.MODELS)
def test_training_is_deterministic_and_lowers_the_loss(name: str) -> None:
    cfg = train.TrainConfig(
        name, steps=3, batch=4, size=16, low_res_steps=1, low_res_batch=6, bf16=True, overrides=TINY[name]
    )
    assert [cfg.shape_at(s) for s in range(3)] == [(6, 8), (4, 16), (4, 16)]
    first, _, losses = train.train(cfg, progress=False)
    second, _, losses_again = train.train(cfg, progress=False)
    assert losses == losses_again
    pairs = zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)

    cfg = train.TrainConfig(name, steps=40, batch=8, size=16, lr=3e-3, warmup=5, overrides=TINY[name])
    initial = train.validation_loss(name, *models.build(name, **TINY[name]), batch=8, size=16)
    trained = train.validation_loss(name, *train.train(cfg, progress=False)[:2], batch=8, size=16)
    assert trained < 0.7 * initial


def test_training_continues_from_saved_weights(tmp_path: Path) -> None:
    cfg = train.TrainConfig("flux", steps=2, batch=2, size=16, overrides=TINY["flux"])
    denoiser, text_encoder, _ = train.train(cfg, progress=False)
    path = tmp_path / "flux.safetensors"
    models.save(path, "flux", denoiser, text_encoder, {})
    start = models.load("flux", path)[0].state_dict()
    again = train.TrainConfig("flux", steps=1, batch=2, size=16, init=str(path), warmup=1, ema=0.0)
    continued = train.train(again, progress=False)[0].state_dict()  # EMA decay 0: the weights after one step
    assert continued.keys() == start.keys()
    assert not all(torch.equal(continued[k], start[k]) for k in start)
    assert max((continued[k] - start[k]).abs().max() for k in start) < 0.01  # one small step from the saved weights


def test_saved_weights_round_trip_through_fp16(tmp_path: Path) -> None:
    denoiser, text_encoder = models.build("flux", **TINY["flux"])
    path = tmp_path / "flux.safetensors"
    models.save(path, "flux", denoiser, text_encoder, dict(note="test"))
    loaded, loaded_text, meta = models.load("flux", path)
    assert meta["note"] == "test"
    for a, b in zip(denoiser.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a.half().float(), b)
    assert torch.equal(text_encoder.token.weight.half().float(), loaded_text.token.weight)


def test_scene_labels_and_scores_known_answers() -> None:
    """Caption accuracy = share of the caption's content words read back (2 per object + background colour and
    texture); exact match also needs no other object."""
    target = scenes.labels(["red circle and blue square on green stripes"])
    # background green (2), texture stripes (2); per colour (red yellow green blue purple white): shape or absent (3)
    assert target.tolist() == [[2, 2, 0, 3, 3, 1, 3, 3]]
    perfect = scenes.score(target, target)
    assert perfect.accuracy.tolist() == [1.0] and perfect.exact.tolist() == [True]
    wrong_shape, missing, extra, background = (target.clone() for _ in range(4))
    wrong_shape[0, 5] = 2  # the blue object read as a triangle: 5 of 6 words
    missing[0, 2] = 3  # no red object seen: colour and shape words missed, 4 of 6
    extra[0, 7] = 0  # a white circle too: every word read back, not an exact match
    background[0, 0] = 0  # background read as red
    scores = scenes.score(torch.cat([wrong_shape, missing, extra, background]), target.expand(4, -1))
    assert scores.accuracy.tolist() == pytest.approx([5 / 6, 4 / 6, 1.0, 5 / 6])
    assert not scores.exact.any()


def test_packaged_classifier_reads_held_out_scenes() -> None:
    images, prompts = make_batch(scenes.HELD_OUT_SEED, 7, 48)  # a held-out batch: the classifier trained on seed 3
    result = scenes.caption_scores(images, prompts)
    assert result.accuracy.mean() > 0.98 and result.exact.float().mean() > 0.9, result
    seen = scenes.read(images[:16])  # 97% of held-out scenes are read exactly (docs/reference_models.md)
    right = [s is not None and set(s.objects) == set(parse(p).objects) for s, p in zip(seen, prompts, strict=False)]
    assert sum(right) >= 14, list(zip(seen, prompts, strict=False))
    shuffled = prompts[1:] + prompts[:1]  # the metric can fail: other captions are not read back
    assert scenes.caption_accuracy(images, shuffled).mean() < 0.6


def test_scene_frechet_distance_separates_real_scenes_from_noise() -> None:
    real = scenes.scene_features(make_batch(scenes.HELD_OUT_SEED, 0, 64)[0])
    other = scenes.scene_features(make_batch(scenes.HELD_OUT_SEED, 1, 64)[0])
    noise = scenes.scene_features(torch.rand(64, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert real.shape == (64, scenes.FEATURES)
    assert scenes.frechet_distance(real, real) < 1e-3
    assert 5 * scenes.frechet_distance(other, real) < scenes.frechet_distance(noise, real)
    with pytest.raises(ValueError, match="images but"):
        scenes.caption_accuracy(torch.zeros(2, 3, 64, 64), ["red circle and blue square on green stripes"])
    with pytest.raises(ValueError, match="not a scene classifier"):
        scenes.load(models.weights_path("unet"))


def test_classifier_training_is_deterministic() -> None:
    first, losses = scenes.train_classifier(3, batch=8, images=64, progress=False)
    second, again = scenes.train_classifier(3, batch=8, images=64, progress=False)
    assert losses == again
    pairs = zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--num-images", "2", "--steps", "2", "--rounds", "1", "--quiet"]
    assert main([*args, "--method", "toma:ratio=0.25"]) == 0
    assert {p.name for p in out.iterdir()} == {"grid.png", "results.json", "results.md"}
    rows = json.loads((out / "results.json").read_text())["results"]
    configs = ["baseline", "ToMA", "CA-ToMe", "ToMeSD", "ToDo", "toma:ratio=0.25"]
    assert [(r["model"], r["config"]) for r in rows] == [(m, c) for m in models.MODELS for c in configs]
    for row in rows:
        assert row["speedup"] > 0 and row["median_s"] > 0
        if row["config"] == "baseline":
            assert row["speedup"] == 1 and row["rel_l2"] == 0 and row["psnr_db"] == "inf"
        else:
            assert row["rel_l2"] > 0 and row["ssim"] < 1
        assert 0 <= row["caption_acc"] <= 1
    assert "| flux | ToDo |" in capsys.readouterr().out
    assert main(args) == 2  # exists, no --overwrite
    assert main([*args, "--overwrite", "--model", "unet"]) == 0
    assert {r["model"] for r in json.loads((out / "results.json").read_text())["results"]} == {"unet"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--num-images", "0"], "--num-images must be >= 1"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--num-images", "2", "--timed-images", "3"], "--timed-images must be <= --num-images"),
        (["--model", "sdxl"], "invalid choice"),
        (["--method", "bogus"], "unknown method"),
        (["--method", "toma:ratio=2"], "ratio"),
    ],
)
def test_demo_bad_options_give_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], message: str
) -> None:
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokenmerge: error:") and message in err and err.count("\n") == 1
    assert not (tmp_path / "demo").exists()
