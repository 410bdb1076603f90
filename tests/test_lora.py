"""LoRA (peft) and a patch, in any order: loaded, fused, unfused or unloaded after ``apply``, the model computes what
a patch applied after that change computes (peft replaces ``to_k`` & co. by wrappers holding them as ``base_layer``:
the hooks follow the module at the name)."""

from __future__ import annotations

import pytest
import torch

import tokenmerge as tm
from tokenmerge.archs import build_dit, build_unet
from tokenmerge.harness.models import denoiser_inputs

peft = pytest.importorskip("peft")

#: Every projection peft LoRAs usually target, the single-stream proj_out/proj_mlp (span points) included.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_out", "proj_mlp"]
CASES = [
    ("tiny-sd15", tm.ToMA()),  # keys/values on UNets
    ("tiny-sd15", tm.ToDo()),
    ("tiny-flux", tm.ToMA(mode="kv")),
    ("tiny-flux", tm.ToDo()),
    ("tiny-flux", tm.ToMA()),  # tokens: the single-stream span ends at proj_out
    ("tiny-flux", tm.ToMeSD(merge_mlp=True)),  # tokens: the attention + MLP span
]


def _model(arch: str) -> tuple[torch.nn.Module, dict]:
    model = build_unet(arch) if arch == "tiny-sd15" else build_dit(arch)
    return model, denoiser_inputs(model, 2, 16, 16, text=4)


def _call(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    tm.reset(model)
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return out


def _load(model: torch.nn.Module) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(1)
    model.add_adapter(config)


CHANGES = {
    "load": _load,
    "fuse": lambda m: m.fuse_lora(),
    "unfuse": lambda m: m.unfuse_lora(),
    "unload": lambda m: m.unload_lora(),
}


@pytest.mark.parametrize(("arch", "method"), CASES, ids=lambda c: c if isinstance(c, str) else c.describe())
def test_lora_changes_after_apply_match_a_patch_applied_after_them(arch: str, method: tm.Method) -> None:
    model, inputs = _model(arch)
    plain = _call(model, inputs)
    tm.apply(model, method)
    for name, change in CHANGES.items():
        change(model)  # the patch in place was applied before this change
        got = _call(model, inputs)
        assert tm.summary(model).merged_calls > 0, name
        tm.apply(model, method)  # the reference: a patch applied after it
        assert torch.equal(got, _call(model, inputs)), name
        if name == "load":
            assert not torch.allclose(got, plain, atol=1e-3)  # the LoRA changes the model (the test can fail)
