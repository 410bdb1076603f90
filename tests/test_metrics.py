"""Known-answer tests of the harness metrics, method parsing, prompt sets and report writers (tiny models only)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tokenmerge.harness import metrics, report
from tokenmerge.harness.prompts import load_prompts
from tokenmerge.harness.registry import HarnessError, architectures, methods, parse_method


def save_metric_models(root: Path) -> tuple[str, str]:
    """Tiny random DINOv2 and CLIP models saved with ``save_pretrained``; returns their folders."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, Dinov2Config, Dinov2Model

    from tokenmerge.archs import _tiny_tokenizer

    torch.manual_seed(0)
    dino = Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14
    )
    Dinov2Model(dino).save_pretrained(root / "dino")
    text = CLIPTextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    clip = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    CLIPModel(clip).save_pretrained(root / "clip")
    _tiny_tokenizer().save_pretrained(root / "clip")
    return str(root / "dino"), str(root / "clip")


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return save_metric_models(tmp_path_factory.mktemp("metric_models"))


def images(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_psnr_identical_is_infinite_and_known_perturbation() -> None:
    x = images() * 0.6 + 0.2  # in [0.2, 0.8]: a +-0.1 offset stays in range
    assert torch.isinf(metrics.psnr(x, x)).all()
    sign = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) > 0.5, 1.0, -1.0)
    # MSE = 0.01 with data range 1 -> PSNR = 10 log10(1 / 0.01) = 20 dB
    torch.testing.assert_close(metrics.psnr(x + 0.1 * sign, x), torch.full((3,), 20.0), atol=1e-3, rtol=0)
    assert torch.allclose(metrics.ssim(x, x), torch.ones(3))
    assert (metrics.ssim(x + 0.1 * sign, x) < 1).all()


def test_to_tensor_roundtrips_pil() -> None:
    from PIL import Image

    arr = (images(1)[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    t = metrics.to_tensor([Image.fromarray(arr)])
    assert t.shape == (1, 3, 32, 32) and t.dtype == torch.float32
    assert torch.equal((t[0].permute(1, 2, 0) * 255).round().byte(), torch.from_numpy(arr))


def test_dino_delta_identical_is_zero(metric_models: tuple[str, str]) -> None:
    dino = metrics.DinoFeatures(metric_models[0])
    x, y = images(), images(seed=5)
    fx, fy = dino(x), dino(y)
    assert fx.shape == (3, 32)
    assert torch.allclose(metrics.dino_delta(fx, dino(x.clone())), torch.zeros(3), atol=1e-6)
    assert (metrics.dino_delta(fx, fy) > 0).all()


def test_frechet_distance_known_answers() -> None:
    f = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    assert metrics.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-6)
    shift = torch.arange(8.0)
    # same covariance, means apart by ``shift``: the distance is |shift|^2
    assert metrics.frechet_distance(f + shift, f) == pytest.approx(float(shift.square().sum()), rel=1e-5)
    with pytest.raises(ValueError):
        metrics.frechet_distance(f[:1], f)


def test_clip_scorer_from_folder(metric_models: tuple[str, str]) -> None:
    clip = metrics.ClipScorer(metric_models[1])
    scores = clip(images(2), ["a red cube", "a blue ball"])
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 100)).all()


def test_metric_model_missing_is_a_harness_error(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="cannot load DINOv2"):
        metrics.DinoFeatures(str(tmp_path / "missing"))


def test_parse_method() -> None:
    spec = parse_method("toma:ratio=0.25,tile=(2,2),merge_mlp=false")
    assert spec.method == methods()["toma"](ratio=0.25, tile=(2, 2), merge_mlp=False)
    assert spec.label == "toma:ratio=0.25,tile=(2,2),merge_mlp=False"
    assert parse_method("todo:factor=2").method == methods()["todo"](factor=2)
    assert parse_method("baseline").method is None
    assert {"toma", "tomesd", "todo", "catome"} <= set(methods())
    assert {"sd15", "sdxl", "tiny-sd15", "tiny-sdxl"} <= set(architectures())


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope:ratio=0.5", "unknown method 'nope'"),
        ("toma:speed=2", "toma has no option 'speed'"),
        ("toma:ratio=1.5", r"ratio must be .*in \[0, 1\)"),
        ("toma:ratio", "expected OPTION=VALUE"),
        ("tomesd:ratio=fast", "tomesd:ratio=fast"),
    ],
)
def test_parse_method_errors(spec: str, message: str) -> None:
    with pytest.raises(HarnessError, match=message):
        parse_method(spec)


def test_prompt_sets(tmp_path: Path) -> None:
    imagenet = load_prompts("imagenet")
    assert len(imagenet) == 1000 and imagenet[0] == "a photo of a tench" and len(set(imagenet)) == 1000
    assert len(load_prompts("general")) >= 50 and len(load_prompts("general", limit=3)) == 3
    good = tmp_path / "p.txt"
    good.write_text("# comment\n\na cat\n  a dog  \n")
    assert load_prompts(str(good)) == ["a cat", "a dog"]
    for name, content in [
        ("empty.txt", b"# only a comment\n\n"),
        ("bin.txt", b"\xff\xfe\x00a"),
        ("ctl.txt", b"a\x01b"),
    ]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(HarnessError, match="malformed prompt file"):
            load_prompts(str(tmp_path / name))
    with pytest.raises(HarnessError, match="neither a file nor a built-in set"):
        load_prompts(str(tmp_path / "missing.txt"))


def test_report_writers(tmp_path: Path) -> None:
    rows = [dict(config="a", psnr=math.inf, x=1.23456), dict(config="b", psnr=20.0, x=None)]
    table = report.markdown_table(rows, ["config", "psnr", "x"])
    assert table.splitlines()[2] == "| a | inf | 1.235 |" and table.splitlines()[3] == "| b | 20 | - |"
    report.write_json(tmp_path / "r.json", rows)
    assert '"inf"' in (tmp_path / "r.json").read_text()
    assert report.pareto_front([(1.0, 1.0), (1.5, 0.9), (1.4, 0.8), (2.0, 0.5)]) == [0, 1, 3]
    report.pareto_plot(tmp_path / "p.png", ["a", "b"], [1.0, 1.5], [1.0, 0.9], "q")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_atomic_dir_leaves_nothing_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), report.atomic_dir(out, overwrite=False) as tmp:
        (tmp / "report.md").write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with report.atomic_dir(out, overwrite=False) as tmp:
        (tmp / "report.md").write_text("done")
    assert (out / "report.md").read_text() == "done" and list(tmp_path.iterdir()) == [out]
    with pytest.raises(HarnessError, match="already exists"), report.atomic_dir(out, overwrite=False):
        pass
