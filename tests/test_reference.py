"""The reference models: packaged weights, dataset, pipeline, training and the ``tokenmerge demo`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import tokenmerge as tm
from tokenmerge.cli import main
from tokenmerge.reference import models, train
from tokenmerge.reference.data import VOCAB, make_batch, tokenize
from tokenmerge.reference.pipeline import load_pipeline, pack, unpack

ROOT = Path(__file__).resolve().parents[1]
#: Tiny configs (seconds to train a few steps) of each reference layout, on 16x16 images.
TINY = {
    "unet": dict(block_out_channels=(8, 16, 16), cross_attention_dim=16, attention_head_dim=1),
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
    assert [f.stem for f in files] == sorted(models.MODELS)
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
    assert images.shape == (6, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert tokenize(prompts).shape == (6, 5) and all(len(p.split()) == 5 for p in prompts)


def test_tokenize_pads_and_rejects_unknown_words() -> None:
    ids = tokenize(["red circle on blue plain", ""])
    assert ids[1].eq(0).all() and ids[0].ne(0).all()
    with pytest.raises(ValueError, match="unknown words"):
        tokenize(["a lighthouse at dawn"])


def test_pack_unpack_round_trip() -> None:
    x = torch.randn(2, 3, 8, 6)
    assert pack(x).shape == (2, 12, 12)
    assert torch.equal(unpack(pack(x), 8, 6), x)


@pytest.mark.parametrize("name", models.MODELS)
def test_pipeline_is_deterministic_per_seed(name: str) -> None:
    pipe = load_pipeline(name)
    prompts = ["red circle on blue gradient", "white square on black stripes"]
    first = pipe(prompts, [0, 1], steps=2)
    assert first.shape == (2, 3, 32, 32) and 0 <= first.min() and first.max() <= 1
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
    cfg = train.TrainConfig(name, steps=3, batch=4, size=16, overrides=TINY[name])
    first, _, losses = train.train(cfg, progress=False)
    second, _, losses_again = train.train(cfg, progress=False)
    assert losses == losses_again
    pairs = zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)

    cfg = train.TrainConfig(name, steps=40, batch=8, size=16, lr=3e-3, warmup=5, overrides=TINY[name])
    initial = train.validation_loss(name, *models.build(name, **TINY[name]), batch=8, size=16)
    trained = train.validation_loss(name, *train.train(cfg, progress=False)[:2], batch=8, size=16)
    assert trained < 0.7 * initial


def test_saved_weights_round_trip_through_fp16(tmp_path: Path) -> None:
    denoiser, text_encoder = models.build("flux", **TINY["flux"])
    path = tmp_path / "flux.safetensors"
    models.save(path, "flux", denoiser, text_encoder, dict(note="test"))
    loaded, loaded_text, meta = models.load("flux", path)
    assert meta["note"] == "test"
    for a, b in zip(denoiser.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a.half().float(), b)
    assert torch.equal(text_encoder.token.weight.half().float(), loaded_text.token.weight)


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
    assert "| flux | ToDo |" in capsys.readouterr().out
    assert main(args) == 2  # exists, no --overwrite
    assert main([*args, "--overwrite", "--model", "unet"]) == 0
    assert {r["model"] for r in json.loads((out / "results.json").read_text())["results"]} == {"unet"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--num-images", "0"], "--num-images must be >= 1"),
        (["--steps", "0"], "--steps must be >= 1"),
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
