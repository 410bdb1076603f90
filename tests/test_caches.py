"""Token merging stacked with step caches (issue #15): diffusers' caches on tiny Flux, DeepCache on a tiny SD 1.5.

Every cell checks, in both orders of enabling: the stack's output does not depend on the order; removing the method
leaves exactly the cache alone and disabling the cache exactly the method alone (bit-identical); blocks the cache
skipped computed no plan. Caches on sub-modules that hold merged tokens raise at ``apply`` or at the next call.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers.hooks import (
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)

import tokenmerge as tm
from tokenmerge.archs import tiny_pipeline
from tokenmerge.caches import step_caches
from tokenmerge.harness.stacks import TAYLORSEER_BLOCKS, CacheSetting, StackSetting, build_cache_settings, parse_stack
from tokenmerge.harness.sweep import MethodSetting, layout_of
from tokenmerge.patch import Patch
from tokenmerge.summary import Unmerged

from .conftest import generate

STEPS = 4
EVERY = {"blocks": {"double": (0, None), "single": (0, None)}}
METHODS = {
    "toma": lambda **kw: tm.ToMA(0.5, mode="tokens", **kw),
    "tomesd": lambda **kw: tm.ToMeSD(0.5, **kw),
    "catome": lambda **kw: tm.CAToMe(0.7, **kw),
    "todo": lambda **kw: tm.ToDo(2, **kw),
}
BLOCK_CACHES = {  # whole-block caches, set to skip: every method stacks with them
    "fbc": lambda pipe: FirstBlockCacheConfig(threshold=10.0),
    "magcache": lambda pipe: MagCacheConfig(num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS, threshold=10.0),
    "taylorseer": lambda pipe: TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=1, cache_identifiers=list(TAYLORSEER_BLOCKS)
    ),
}
ATTENTION_CACHES = {  # caches on attention modules: only keys/values methods (ToDo) stack with them
    "pab": lambda pipe: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(-1, 1001),
        spatial_attention_block_identifiers=["transformer_blocks"],
        current_timestep_callback=lambda: pipe.current_timestep,
    ),
    "taylorseer-attn": lambda pipe: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1),
}


@pytest.fixture(scope="module")
def flux():
    pipe = tiny_pipeline("tiny-flux")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def alone(flux) -> dict[str, torch.Tensor]:
    """Outputs of each method alone and each cache alone, computed once."""
    return {}


def _run(pipe) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return generate(pipe, steps=STEPS, guidance_scale=3.5)


def _method(name: str):
    return METHODS[name](**EVERY)


def _alone(pipe, outputs: dict, key: str, on, off) -> torch.Tensor:
    if key not in outputs:
        on()
        outputs[key] = _run(pipe)
        off()
    return outputs[key]


class PlanCounter:
    """How many blocks computed a plan, and how many blocks ran their attention, during a pipeline call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, pipe) -> None:
        self.plans = self.ran = 0
        original = Patch.plan_block

        def plan_block(patch, run, x):
            self.plans += 1
            return original(patch, run, x)

        monkeypatch.setattr(Patch, "plan_block", plan_block)
        blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
        self.handles = [b.attn.register_forward_pre_hook(self.count) for b in blocks]

    def count(self, module, args) -> None:
        self.ran += 1

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("cache", list(BLOCK_CACHES))
def test_block_cache_stacks(flux, alone, monkeypatch, cache: str, method: str) -> None:
    model = flux.transformer
    cache_alone = _alone(flux, alone, cache, lambda: model.enable_cache(BLOCK_CACHES[cache](flux)), model.disable_cache)
    method_alone = _alone(flux, alone, method, lambda: tm.apply(flux, _method(method)), lambda: tm.remove(flux))
    reference = _alone(flux, alone, "none", lambda: None, lambda: None)

    model.enable_cache(BLOCK_CACHES[cache](flux))  # cache first
    tm.apply(flux, _method(method))
    counter = PlanCounter(monkeypatch, flux)
    first = _run(flux)
    counter.close()
    assert counter.ran < 4 * STEPS, "the cache skipped no block: the test checks nothing"
    assert counter.plans == counter.ran  # a plan for every block that ran, none for the skipped ones
    summary = tm.summary(flux)
    assert summary.steps_merged >= 1
    tm.remove(flux)
    assert torch.equal(_run(flux), cache_alone)  # tm.remove left exactly the cache
    model.disable_cache()

    tm.apply(flux, _method(method))  # method first
    model.enable_cache(BLOCK_CACHES[cache](flux))
    assert torch.equal(_run(flux), first)
    assert not torch.equal(first, method_alone)
    model.disable_cache()
    assert torch.equal(_run(flux), method_alone)  # disabling the cache left exactly the method
    tm.remove(flux)
    assert torch.equal(_run(flux), reference)
    assert not step_caches(model)


def test_skipped_calls_are_reported(flux) -> None:
    """MagCache skips whole denoiser calls' blocks: the summary says why those calls merged nothing."""
    flux.transformer.enable_cache(BLOCK_CACHES["magcache"](flux))
    try:
        with tm.applied(flux, _method("toma")):
            _run(flux)
            summary = tm.summary(flux)
    finally:
        flux.transformer.disable_cache()
    assert summary.unmerged.get(Unmerged.SKIPPED.value, 0) >= 1
    assert summary.steps_merged < summary.steps_run


@pytest.mark.parametrize("cache", list(ATTENTION_CACHES))
@pytest.mark.parametrize("method", ["toma", "tomesd", "catome"])
def test_attention_caches_refuse_merging(flux, alone, cache: str, method: str) -> None:
    """A cache on a merged attention would serve merged rows of an old plan: refused in either order, with the
    model left as it was."""
    model = flux.transformer
    reference = _alone(flux, alone, "none", lambda: None, lambda: None)
    model.enable_cache(ATTENTION_CACHES[cache](flux))
    try:
        with pytest.raises(ValueError, match=r"cannot run with .* on transformer_blocks\.0\.attn"):
            tm.apply(flux, _method(method))
        assert not tm.is_applied(flux)
    finally:
        model.disable_cache()
    tm.apply(flux, _method(method))
    model.enable_cache(ATTENTION_CACHES[cache](flux))
    try:
        with pytest.raises(ValueError, match="cannot run with"):
            _run(flux)
    finally:
        model.disable_cache()
        tm.remove(flux)
    assert torch.equal(_run(flux), reference)


@pytest.mark.parametrize("cache", list(ATTENTION_CACHES))
def test_attention_caches_stack_with_keys_values(flux, alone, cache: str) -> None:
    """ToDo keeps every query, so an attention's output is full size: caching it composes, in either order."""
    model = flux.transformer
    method_alone = _alone(flux, alone, "todo", lambda: tm.apply(flux, _method("todo")), lambda: tm.remove(flux))
    model.enable_cache(ATTENTION_CACHES[cache](flux))
    tm.apply(flux, _method("todo"))
    first = _run(flux)
    tm.remove(flux)
    model.disable_cache()
    tm.apply(flux, _method("todo"))
    model.enable_cache(ATTENTION_CACHES[cache](flux))
    assert torch.equal(_run(flux), first)
    assert not torch.equal(first, method_alone)
    model.disable_cache()
    assert torch.equal(_run(flux), method_alone)
    tm.remove(flux)


def test_reset_resets_the_cache(flux) -> None:
    """``tm.reset`` on a bare denoiser resets the diffusers cache with the merge state: a second generation run by
    hand equals the first."""
    model = flux.transformer
    torch.manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 64, 16),
        encoder_hidden_states=torch.randn(1, 8, model.config.joint_attention_dim),
        pooled_projections=torch.randn(1, model.config.pooled_projection_dim),
        img_ids=torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1
        ).reshape(-1, 3),
        txt_ids=torch.zeros(8, 3),
    )
    if model.config.guidance_embeds:
        inputs["guidance"] = torch.tensor([3.5])

    def generation() -> list[torch.Tensor]:
        outs = []
        for t in (1.0, 0.75, 0.5):
            with model.cache_context("cond"):
                outs.append(model(timestep=torch.tensor([t]), **inputs).sample)
        return outs

    model.enable_cache(FirstBlockCacheConfig(threshold=10.0))
    tm.apply(model, _method("toma"))
    try:
        first = generation()
        stale = generation()  # no reset: the cache compares with the last generation's residuals
        tm.reset(model)
        second = generation()
    finally:
        tm.remove(model)
        model.disable_cache()
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(stale[0], first[0])


@pytest.fixture(scope="module")
def sd15():
    """A tiny SD 1.5 pipeline with a DeepCache helper (enabled by the tests), and the unaccelerated output."""
    deepcache = pytest.importorskip("DeepCache")
    pipe = tiny_pipeline("tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    helper = deepcache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=2, cache_branch_id=0)
    return pipe, helper, {}


def _sd15_run(pipe) -> torch.Tensor:
    return generate(pipe, steps=3, height=16, width=16)


@pytest.mark.parametrize("method", list(METHODS))
def test_deepcache_stacks_on_a_unet(sd15, method: str) -> None:
    """DeepCache caches the UNet's deep branch (whole ``Transformer2DModel`` s): every method stacks, in either
    order, and each side's removal leaves exactly the other."""
    pipe, helper, outputs = sd15
    if "none" not in outputs:
        outputs["none"] = _sd15_run(pipe)
        helper.enable()
        outputs["deepcache"] = _sd15_run(pipe)
        helper.disable()
    reference, cache_alone = outputs["none"], outputs["deepcache"]
    make = lambda: METHODS[method](max_downsample=8)  # noqa: E731
    tm.apply(pipe, make())
    method_alone = _sd15_run(pipe)
    helper.enable()
    first = _sd15_run(pipe)
    helper.disable()
    assert torch.equal(_sd15_run(pipe), method_alone)
    tm.remove(pipe)
    helper.enable()
    tm.apply(pipe, make())
    assert torch.equal(_sd15_run(pipe), first)
    assert not torch.equal(first, method_alone) and not torch.equal(first, cache_alone)
    tm.remove(pipe)
    assert torch.equal(_sd15_run(pipe), cache_alone)
    helper.disable()
    assert torch.equal(_sd15_run(pipe), reference)


def test_pareto_cache_and_stack_settings(flux) -> None:
    layout = layout_of(flux)
    settings, skipped = build_cache_settings(
        layout, flux, ["fbc", "deepcache"], ["taylorseer=2+toma=0.5"], quick=True, method_defaults=EVERY
    )
    labels = [s.label for s in settings]
    assert labels[:3] == ["fbc:threshold=0.05", "fbc:threshold=0.1", "fbc:threshold=0.3"]
    assert labels[3] == "taylorseer:interval=2+toma:ratio=0.5"
    assert {s.label for s in skipped} == {"deepcache:interval=2", "deepcache:interval=3", "deepcache:interval=5"}
    assert next(s for s in settings if s.label == "fbc:threshold=0.05").default
    reference = _run(flux)
    stack = settings[3]
    assert isinstance(stack, StackSetting) and stack.family == "taylorseer+toma"
    stack.apply(flux)
    stacked = _run(flux)
    stack.remove(flux)
    assert not torch.equal(stacked, reference)
    assert torch.equal(_run(flux), reference)
    assert not tm.is_applied(flux) and not step_caches(flux.transformer)
    assert isinstance(stack.cache, CacheSetting) and isinstance(stack.merge, MethodSetting)


@pytest.mark.parametrize(
    "text",
    [
        "fbc",
        "nope=1+toma=0.5",
        "fbc=0.1+nope=1",
        "fbc=x+toma=0.5",
        "fbc=0.1+toma=0.5+todo=2",
        "fbc@kv=0.1+toma=0.5",
        "fbc=0.1+toma@nope=0.5",
    ],
)
def test_parse_stack_errors(text: str) -> None:
    from tokenmerge.errors import HarnessError

    with pytest.raises(HarnessError, match="--stack"):
        parse_stack(text)


def test_pareto_command_takes_caches_and_stacks(capsys: pytest.CaptureFixture[str]) -> None:
    from tokenmerge.cli import main

    argv = ["pareto", "--model", "reference-unet", "--methods", "none", "--caches", "deepcache,fbc"]
    argv += ["--stack", "deepcache=3+toma=0.5", "--stack", "deepcache=2+toma@kv", "--quick", "--dry-run"]
    argv += ["--out", "unused"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:5] == [
        "baseline",
        "deepcache:interval=2",
        "deepcache:interval=3 (default)",
        "deepcache:interval=5",
        "deepcache:interval=3+toma:ratio=0.5",
    ]
    assert lines[5:8] == [f"deepcache:interval=2+toma:ratio={r}@kv" for r in ("0.5", "0.75", "0.9375")]
    assert "skipped fbc:threshold=0.1: fbc runs on dit models, not on a unet" in lines
