"""The cost model: FLOPs counted on weightless twins equal those of real execution, call by call and per generation."""

from __future__ import annotations

import pytest
import torch

import tokenmerge as tm
from tokenmerge.adapters.base import CallShape
from tokenmerge.api import view_of
from tokenmerge.archs import build_dit, build_unet
from tokenmerge.cost import CostSpec, Twin
from tokenmerge.flops import count_flops
from tokenmerge.patch import adapter_for

from .conftest import generate

BUILDERS = {"tiny-sd15": build_unet, "tiny-sdxl": build_unet, "tiny-flux": build_dit, "tiny-sd3": build_dit}
METHODS = [
    tm.ToMA(mode="tokens"),
    tm.ToMA(mode="kv"),
    tm.ToMeSD(merge_mlp=True),
    tm.ToDo(),
    tm.CAToMe(threshold=-1.0, batch="max"),  # every source above the threshold: the count of merged fraction 1
    tm.CAToMe(threshold=-1.0, batch="min", merge_crossattn=True),
]


def _real_calls(model: torch.nn.Module, method: tm.Method | None, shape: CallShape, steps: int) -> list[int]:
    """FLOPs of each call of a ``steps``-step generation on the real model (random weights, a driven loop)."""
    inputs = adapter_for(model).example_inputs(shape, torch.Generator().manual_seed(0))
    if method is not None:
        tm.apply(model, method)
    out = []
    try:
        for step in range(steps):
            tm.set_step(model, step)
            with torch.no_grad():
                out.append(count_flops(lambda: model(**inputs)))
    finally:
        tm.remove(model)
    return out


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_twin_counts_what_real_execution_counts(arch: str) -> None:
    """One call, every method (its merge overheads included), a batch of two on a grid the 4x4 tiles do not divide."""
    model = BUILDERS[arch](arch)
    twin, view = Twin.of(model), view_of(model)
    shape = CallShape(2, (12, 10), 7)
    assert twin.call(None, shape) == _real_calls(model, None, shape, 1)[0]
    for method in METHODS:
        concrete = method.resolve(view)
        fraction = 1.0 if concrete.content_adaptive else None
        assert twin.call(concrete, shape, fraction) == _real_calls(model, concrete, shape, 1)[0], concrete.describe()


def test_generation_counts_follow_the_step_schedule() -> None:
    """Steps where merging is off run the full model; plans reused between recomputations cost nothing; CA-ToMe's
    matching runs at its checkpoints only."""
    model = build_unet("tiny-sd15")
    twin, shape, steps = Twin.of(model), CallShape(1, (16, 16), 77), 8
    for method in (
        tm.ToMA(mode="tokens", steps=[1, 2, 5], dest_every=2),
        tm.ToMA(mode="tokens", merge_every=3),
        tm.CAToMe(threshold=-1.0, batch="max", schedule=[0, 3], num_steps=steps),
    ):
        counted = twin.generation(method, shape, steps, 1.0 if method.content_adaptive else None)
        assert list(counted) == _real_calls(model, method, shape, steps), method.describe()
    full = twin.call(None, shape)
    sparse = twin.generation(tm.ToMA(mode="tokens", steps=[1, 2, 5]), shape, steps)
    assert [c == full for c in sparse] == [True, False, False, True, True, False, True, True]
    catome = twin.generation(tm.CAToMe(threshold=-1.0, batch="max", schedule=[0, 3]), shape, steps, 1.0)
    assert catome[0] == catome[3] > catome[1] == catome[2] == catome[4]  # matching only at checkpoints


def test_summary_reports_the_flop_cut_of_the_last_call() -> None:
    """Counted from the call's shapes and, for CA-ToMe, the tokens its blocks merged; unpatched when it merged
    nothing."""
    from tokenmerge.archs import tiny_pipeline

    pipe = tiny_pipeline("tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    method = tm.ToMA(mode="tokens", max_downsample=4)
    tm.apply(pipe, method)
    assert tm.summary(pipe).flops is None  # no call yet
    generate(pipe, guidance_scale=5.0)
    flops = tm.summary(pipe).flops
    shape = CallShape(2, (16, 16), 77)
    twin = Twin.of(pipe.unet)
    assert flops.shape == shape and (flops.full, flops.merged) == (twin.call(None, shape), twin.call(method, shape))
    assert 0.2 < flops.cut < 0.3 and "% cut" in str(tm.summary(pipe))
    tm.apply(pipe, tm.CAToMe(threshold=-1.0, batch="max"))
    generate(pipe, guidance_scale=5.0)
    catome = tm.summary(pipe).flops
    assert catome.merged == twin.call(tm.CAToMe(threshold=-1.0, batch="max"), shape, 1.0)
    tm.apply(pipe, tm.ToMA(mode="tokens", steps=[0]))
    generate(pipe, steps=2, guidance_scale=5.0)  # the last call (step 1) runs unmerged
    assert tm.summary(pipe).flops.cut == 0.0
    tm.remove(pipe)


def test_real_size_architectures_count_in_seconds() -> None:
    """The unaccelerated SD 1.5 UNet at 512 px counts the 0.803 TFLOP real execution counts (measured: 803,273,441,280
    with random weights); a spec names an architecture at a resolution."""
    spec = CostSpec.parse("sd15@512")
    assert (spec.label, spec.shape()) == ("sd15@512", CallShape(1, (64, 64), 77))
    assert spec.twin().call(None, spec.shape()) == 803_273_441_280
    assert CostSpec.parse("sdxl").label == "sdxl@1024" and CostSpec.parse("flux-dev@1024x768").shape().latent == (
        64,
        48,
    )
    for bad in ("sd99@512", "sdxl@big", "flux-dev@1000"):
        with pytest.raises(ValueError):
            CostSpec.parse(bad).shape()
