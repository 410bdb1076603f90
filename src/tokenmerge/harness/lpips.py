"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), AlexNet, v0.1.

For images ``x, y`` in ``[0, 1]``::

    z = ((2 x - 1) - shift) / scale            shift = (-.030, -.088, -.188), scale = (.458, .448, .450)
    f_l = AlexNet features after ReLU l         l = 1..5 (64, 192, 384, 256, 256 channels)
    n_l = f_l / (sqrt(sum_c f_l^2) + 1e-10)     unit length over channels, per pixel
    LPIPS(x, y) = sum_l mean_hw( sum_c w_l[c] (n_l(x) - n_l(y))^2 )     w_l >= 0

The trunk is torchvision's ``alexnet().features``, defined here in plain torch and loaded from a user-given
torchvision AlexNet state dict (``features.0.weight``, ..., ``features.10.bias``; other keys are ignored). The
per-layer weights ``w_l`` are the v0.1 ``alex.pth`` of the LPIPS release (``lin0.model.1.weight`` ... of shape
``(1, C_l, 1, 1)``): a user-given file, or by default the copy shipped in the ``lpips`` PyPI package when that is
installed (found with ``importlib.util.find_spec``, which does not import it: its import needs torchvision).
Images are compared at their own resolution, which must be at least ``MIN_SIZE`` pixels a side.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tokenmerge.errors import HarnessError

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
CHANNELS = (64, 192, 384, 256, 256)
EPS = 1e-10
MIN_SIZE = 31  # smallest side that leaves the second max-pool a non-empty output
# torchvision ``alexnet().features`` index -> (in, out, kernel, stride, padding) of its convolutions
CONVS = {
    0: (3, 64, 11, 4, 2),
    3: (64, 192, 5, 1, 2),
    6: (192, 384, 3, 1, 1),
    8: (384, 256, 3, 1, 1),
    10: (256, 256, 3, 1, 1),
}
TAPS = (1, 4, 7, 9, 11)  # the five ReLUs
LINEAR_KEYS = tuple(f"lin{i}.model.1.weight" for i in range(len(CHANNELS)))


def packaged_linear() -> Path | None:
    """``lpips/weights/v0.1/alex.pth`` of an installed ``lpips`` package, located without importing it."""
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "weights" / "v0.1" / "alex.pth"
        if path.is_file():
            return path
    return None


def _load_tensors(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A ``{name: tensor}`` file read with ``torch.load(weights_only=True)`` onto the CPU, or a HarnessError."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise HarnessError(f"{what} file {str(path)!r} does not exist")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike: the file is not a readable checkpoint
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HarnessError(f"cannot read {what} file {str(path)!r}: {first}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HarnessError(f"{what} file {str(path)!r} is not a state dict of tensors")
    return state


def _check(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], path: str | Path, what: str) -> None:
    for key, shape in shapes.items():
        if key not in state:
            raise HarnessError(f"{what} file {str(path)!r} lacks {key!r}")
        if tuple(state[key].shape) != shape or not state[key].is_floating_point():
            got = tuple(state[key].shape)
            raise HarnessError(f"{what} file {str(path)!r}: {key!r} has shape {got}, expected {shape}")


def _features() -> nn.Sequential:
    """torchvision's ``alexnet().features`` up to the last ReLU (indices 0-11, same state-dict keys)."""
    layers: list[nn.Module] = []
    for i in range(12):
        if i in CONVS:
            c_in, c_out, k, s, p = CONVS[i]
            layers.append(nn.Conv2d(c_in, c_out, k, stride=s, padding=p))
        elif i in (2, 5):
            layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
        else:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """Per-image LPIPS (AlexNet, v0.1) between two batches of ``[0, 1]`` images; 0 for identical images."""

    def __init__(self, backbone: str | Path, linear: str | Path | None = None) -> None:
        super().__init__()
        self.features = _features()
        what = "LPIPS backbone (torchvision AlexNet)"
        state = _load_tensors(backbone, what)
        expected = {f"features.{k}": tuple(v.shape) for k, v in self.features.state_dict().items()}
        _check(state, expected, backbone, what)
        self.features.load_state_dict({k.removeprefix("features."): state[k].float() for k in expected})
        if linear is None:
            linear = packaged_linear()
            if linear is None:
                raise HarnessError(
                    "no LPIPS linear weights: pass --lpips-linear PATH (v0.1 alex.pth of the LPIPS release) "
                    "or install the lpips package (pip install --no-deps lpips)"
                )
        self.backbone_path, self.linear_path = str(backbone), str(linear)
        lin = _load_tensors(linear, "LPIPS linear")
        _check(lin, {k: (1, c, 1, 1) for k, c in zip(LINEAR_KEYS, CHANNELS, strict=True)}, linear, "LPIPS linear")
        if any(bool((lin[k] < 0).any()) or not bool(lin[k].isfinite().all()) for k in LINEAR_KEYS):
            raise HarnessError(f"LPIPS linear file {str(linear)!r} has negative or non-finite weights")
        for i, key in enumerate(LINEAR_KEYS):
            self.register_buffer(f"lin{i}", lin[key].float())
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The five post-ReLU feature maps of ``[0, 1]`` images, each unit-normalised over channels."""
        if min(images.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"LPIPS (AlexNet) needs images of at least {MIN_SIZE}x{MIN_SIZE}, got {images.shape}")
        h = ((2 * images.float() - 1) - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                out.append(h / (h.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS))
        return out

    @torch.no_grad()
    def forward(self, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """``(N,)`` LPIPS of ``images`` against ``reference`` (both ``(N, 3, H, W)`` in ``[0, 1]``)."""
        device = self.shift.device
        a, b = self.taps(images.to(device)), self.taps(reference.to(device))
        total = torch.zeros(len(images), device=device)
        for i, (fa, fb) in enumerate(zip(a, b, strict=True)):
            total += F.conv2d((fa - fb).pow(2), getattr(self, f"lin{i}")).mean(dim=(1, 2, 3))
        return total
