"""LPIPS (AlexNet, v0.1) against a loop-by-loop re-computation of the paper's formula, on random saved weights."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenmerge.errors import HarnessError
from tokenmerge.harness import lpips as lp

# torchvision alexnet().features convolutions: state-dict index, (out, in, kernel), stride, padding
CONVS = [(0, (64, 3, 11), 4, 2), (3, (192, 64, 5), 1, 2), (6, (384, 192, 3), 1, 1)]
CONVS += [(8, (256, 384, 3), 1, 1), (10, (256, 256, 3), 1, 1)]


def save_lpips_weights(root: Path, seed: int = 0) -> tuple[str, str]:
    """Random AlexNet trunk (torchvision keys, with a classifier key to be ignored) and random non-negative
    linear weights (official v0.1 keys), saved with ``torch.save``; returns their paths."""
    g = torch.Generator().manual_seed(seed)
    trunk: dict[str, torch.Tensor] = {}
    for idx, (c_out, c_in, k), _, _ in CONVS:
        trunk[f"features.{idx}.weight"] = torch.randn(c_out, c_in, k, k, generator=g) * math.sqrt(2 / (c_in * k * k))
        trunk[f"features.{idx}.bias"] = 0.01 * torch.randn(c_out, generator=g)
    trunk["classifier.1.weight"] = torch.randn(4, 9216, generator=g)
    linear = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(lp.CHANNELS)}
    root.mkdir(parents=True, exist_ok=True)
    torch.save(trunk, root / "alexnet.pth")
    torch.save(linear, root / "lin.pth")
    return str(root / "alexnet.pth"), str(root / "lin.pth")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return save_lpips_weights(tmp_path_factory.mktemp("lpips"))


@pytest.fixture(scope="module")
def metric(weights: tuple[str, str]) -> lp.LPIPS:
    return lp.LPIPS(*weights)


def images(n: int = 3, size: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference_lpips(x: torch.Tensor, y: torch.Tensor, backbone: str, linear: str) -> torch.Tensor:
    """The paper's formula written out: per layer, per image, in float64, straight from the saved tensors."""
    trunk, lins = torch.load(backbone), torch.load(linear)
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)

    def feats(img: torch.Tensor) -> list[torch.Tensor]:
        h = ((img.double() * 2 - 1) - shift) / scale
        out = []
        for layer, (idx, _, stride, pad) in enumerate(CONVS):
            if layer in (1, 2):  # max-pools before the second and third convolutions
                h = F.max_pool2d(h, kernel_size=3, stride=2)
            w, b = trunk[f"features.{idx}.weight"].double(), trunk[f"features.{idx}.bias"].double()
            h = torch.relu(F.conv2d(h, w, b, stride=stride, padding=pad))
            out.append(h)
        return out

    result = torch.zeros(len(x), dtype=torch.float64)
    for n in range(len(x)):
        for layer, (fx, fy) in enumerate(zip(feats(x[n : n + 1]), feats(y[n : n + 1]), strict=True)):
            nx = fx / (fx.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            ny = fy / (fy.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            w = lins[f"lin{layer}.model.1.weight"].double().view(-1, 1, 1)
            result[n] += (w * (nx - ny) ** 2).sum(dim=1).mean()
    return result


def test_identical_is_exactly_zero_and_symmetric(metric: lp.LPIPS) -> None:
    x, y = images(), images(seed=1)
    assert torch.equal(metric(x, x.clone()), torch.zeros(3))
    d = metric(x, y)
    assert d.shape == (3,) and (d > 0).all()
    assert torch.equal(d, metric(y, x))
    # a small perturbation is closer than an unrelated image
    assert (metric(x, (x + 0.02 * images(seed=2)).clamp(0, 1)) < d).all()


@pytest.mark.parametrize("size", [lp.MIN_SIZE, 40, 67])
def test_matches_formula(metric: lp.LPIPS, weights: tuple[str, str], size: int) -> None:
    x, y = images(2, size, seed=3), images(2, size, seed=4)
    y[1] = (x[1] + 0.05 * (y[1] - 0.5)).clamp(0, 1)  # one near pair, one far pair
    torch.testing.assert_close(metric(x, y).double(), reference_lpips(x, y, *weights), rtol=1e-4, atol=1e-6)


def test_black_vs_white_known_answer(tmp_path: Path, weights: tuple[str, str]) -> None:
    """Trunk with only conv1 channels 0 (+1 everywhere) and 1 (-1 everywhere): after the shift/scale layer black is
    negative and white positive in every channel, so relu1 is along e1 for black and e0 for white at every pixel,
    the deeper layers are all zero (0 / (0 + eps) = 0), and LPIPS(black, white) = w_1[0] + w_1[1]."""
    trunk = {k: torch.zeros_like(v) for k, v in torch.load(weights[0]).items()}
    trunk["features.0.weight"][0], trunk["features.0.weight"][1] = 1.0, -1.0
    torch.save(trunk, tmp_path / "signs.pth")
    metric = lp.LPIPS(tmp_path / "signs.pth", weights[1])
    black, white = torch.zeros(2, 3, 35, 48), torch.ones(2, 3, 35, 48)
    w = torch.load(weights[1])["lin0.model.1.weight"].flatten()
    torch.testing.assert_close(metric(black, white), (w[0] + w[1]).expand(2), rtol=1e-6, atol=0)
    assert torch.equal(metric(white, white), torch.zeros(2))


def test_bad_files_raise_one_line_errors(tmp_path: Path, weights: tuple[str, str]) -> None:
    backbone, linear = weights
    with pytest.raises(HarnessError, match=r"LPIPS backbone .* file '/no/alex.pth' does not exist"):
        lp.LPIPS("/no/alex.pth", linear)
    with pytest.raises(HarnessError, match=r"LPIPS linear file '/no/lin\.pth' does not exist"):
        lp.LPIPS(backbone, "/no/lin.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(HarnessError, match=r"cannot read LPIPS backbone .*junk\.pth"):
        lp.LPIPS(tmp_path / "junk.pth", linear)
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(HarnessError, match="not a state dict of tensors"):
        lp.LPIPS(backbone, tmp_path / "list.pth")
    # the linear file given as the backbone and vice versa
    with pytest.raises(HarnessError, match=r"lacks 'features\.0\.weight'"):
        lp.LPIPS(linear, linear)
    with pytest.raises(HarnessError, match=r"lacks 'lin0\.model\.1\.weight'"):
        lp.LPIPS(backbone, backbone)
    lins = torch.load(linear)
    lins["lin2.model.1.weight"] = torch.rand(1, 256, 1, 1)  # a VGG-sized layer
    torch.save(lins, tmp_path / "vgg_lin.pth")
    with pytest.raises(HarnessError, match=r"'lin2.model.1.weight' has shape \(1, 256, 1, 1\), expected \(1, 384"):
        lp.LPIPS(backbone, tmp_path / "vgg_lin.pth")
    lins["lin2.model.1.weight"] = -torch.rand(1, 384, 1, 1)
    torch.save(lins, tmp_path / "neg_lin.pth")
    with pytest.raises(HarnessError, match="negative or non-finite"):
        lp.LPIPS(backbone, tmp_path / "neg_lin.pth")
    with pytest.raises(HarnessError) as info:
        lp.LPIPS(tmp_path / "junk.pth", linear)
    assert "\n" not in str(info.value)


def test_default_linear_from_lpips_package(
    tmp_path: Path, weights: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lp, "packaged_linear", lambda: None)
    with pytest.raises(HarnessError, match="no LPIPS linear weights: pass --lpips-linear"):
        lp.LPIPS(weights[0])
    monkeypatch.setattr(lp, "packaged_linear", lambda: Path(weights[1]))
    assert lp.LPIPS(weights[0]).linear_path == weights[1]


def test_packaged_linear_is_found_without_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake ``lpips`` package whose import would fail: its weights are found, and it is not imported."""
    import sys

    pkg = tmp_path / "site" / "lpips"
    (pkg / "weights" / "v0.1").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('needs torchvision')\n")
    (pkg / "weights" / "v0.1" / "alex.pth").write_bytes(b"")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "lpips", raising=False)
    assert lp.packaged_linear() == pkg / "weights" / "v0.1" / "alex.pth"
    assert "lpips" not in sys.modules


def test_too_small_images_raise(metric: lp.LPIPS) -> None:
    with pytest.raises(ValueError, match="at least 31x31"):
        metric(images(1, 30), images(1, 30))
