"""torch.compile: a patched denoiser traces into whole graphs (no tokenmerge graph breaks), recompiles a bounded
number of times as the schedule switches between merged and full steps, and computes what eager mode computes."""

from __future__ import annotations

import pytest
import torch

import tokenmerge as tm
from tokenmerge.archs import build_unet, tiny_pipeline, unet_inputs

from .conftest import generate


class CountingBackend:
    """A torch.compile backend that records every graph Dynamo hands it and runs it as is."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append(gm)
        return gm.forward


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled_pipe(name: str, method: tm.Method, backend: object, fullgraph: bool = True):
    pipe = tiny_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    tm.apply(pipe, method)
    if hasattr(pipe, "unet"):
        pipe.unet = torch.compile(pipe.unet, backend=backend, fullgraph=fullgraph)  # fullgraph: any break raises
    else:
        pipe.transformer = torch.compile(pipe.transformer, backend=backend, fullgraph=fullgraph)
    return pipe


def run(pipe) -> torch.Tensor:
    extra = {} if hasattr(pipe, "unet") else {"max_sequence_length": 16}
    return generate(pipe, steps=6, guidance_scale=5.0, height=32, width=48, **extra)


@pytest.mark.parametrize(
    ("name", "method"),
    [
        ("tiny-sd15", tm.ToMA(ratio=0.5, dest_every=3)),
        ("tiny-flux", tm.ToMA(ratio=0.5, dest_every=3, blocks={"double": (0, None), "single": (0, None)})),
    ],
)
def test_pipeline_compiles_to_whole_graphs(name: str, method: tm.Method) -> None:
    """Through the stock pipeline call: step tracking comes from the scheduler, never from a device read, so the
    UNet traces with fullgraph=True; Flux breaks once per generation, at its first call (the token grid is read from
    ``img_ids``). Results equal the eager patched run, and later generations compile nothing new."""
    eager = tiny_pipeline(name)
    eager.set_progress_bar_config(disable=True)
    tm.apply(eager, method)
    expected = run(eager)
    backend = CountingBackend()
    pipe = compiled_pipe(name, method, backend, fullgraph=name != "tiny-flux")
    for _ in range(2):  # the first call of a generation sees a cold and then a warm state
        torch.testing.assert_close(run(pipe), expected, rtol=1e-4, atol=1e-4)
    compiled = len(backend.graphs)
    assert compiled <= 8
    torch.testing.assert_close(run(pipe), expected, rtol=1e-4, atol=1e-4)
    assert len(backend.graphs) == compiled
    report = tm.summary(pipe)  # the compiled code replays the hooks' token stores; calls are counted in eager only
    assert report.blocks and all(b.tokens_out < b.tokens_in for b in report.blocks) and not report.counted
    tm.remove(pipe)  # through the compile wrapper
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    assert not hasattr(denoiser._orig_mod, "_tokenmerge")


def test_recompiles_bounded_when_merging_switches_on_and_off() -> None:
    """Merged and full steps alternating (steps=) compile a handful of graphs once, not one per step."""
    backend = CountingBackend()
    pipe = compiled_pipe("tiny-sd15", tm.ToMA(ratio=0.5, steps=range(0, 8, 2), dest_every=4), backend)
    generate(pipe, steps=8)
    generate(pipe, steps=8)
    compiled = len(backend.graphs)
    assert compiled <= 6
    generate(pipe, steps=8)
    assert len(backend.graphs) == compiled


def test_bare_denoiser_driven_by_set_step() -> None:
    """A custom loop on a bare compiled denoiser: ``tm.set_step`` instead of timestep reads (fullgraph works)."""
    unet = build_unet("tiny-sd15")
    inputs = unet_inputs(unet, 2, 16, 16)
    method = tm.ToMA(ratio=0.5, dest_every=1)
    tm.apply(unet, method)
    with torch.no_grad():
        expected = []
        for step in range(3):
            tm.set_step(unet, step)
            expected.append(unet(**inputs).sample)
        backend = CountingBackend()
        compiled = torch.compile(unet, backend=backend, fullgraph=True)
        for step in range(3):
            tm.set_step(compiled, step)
            torch.testing.assert_close(compiled(**inputs).sample, expected[step], rtol=1e-4, atol=1e-4)
    assert unet._tokenmerge.tracker.step == 2 and 1 <= len(backend.graphs) <= 3
    with pytest.raises(ValueError, match="non-negative integer"):
        tm.set_step(unet, -1)


def test_inductor_matches_eager() -> None:
    """The real compiler (inductor, CPU) on the merged top level of a patched tiny UNet (its Transformer2DModel:
    plan, merge and unmerge hooks inside) gives the eager result. One level keeps the C++ build short. Step 1 reuses
    step 0's destinations (``dest_every=2``), so the compiled graph computes weights, merge and unmerge: continuous in
    the inputs, unlike the greedy selection, which inductor's differently rounded similarities may flip on near-ties."""
    unet = build_unet("tiny-sd15")
    inputs = unet_inputs(unet, 2, 8, 8)
    tm.apply(unet, tm.ToMA(ratio=0.5, tile=(2, 2), dest_every=2))
    outputs = []
    with torch.no_grad():
        for compiled in (False, True):
            tm.set_step(unet, 0)
            unet(**inputs)
            level = unet.down_blocks[0].attentions[0]
            if compiled:
                unet.down_blocks[0].attentions[0] = torch.compile(level, fullgraph=True)
            tm.set_step(unet, 1)
            outputs.append(unet(**inputs).sample)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-4)
