"""Hard to misuse: defaults that merge on every model, no silent no-ops, validation at construction and at apply,
clean lifecycles (early stops, scheduler replacement, deepcopy), ``tm.summary`` / ``tm.is_applied`` / ``tm.applied``,
and the typed core (plan protocols, keyword-only sites, typed caches)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator

import pytest
import torch

import tokenmerge as tm
from tokenmerge.adapters.base import Site
from tokenmerge.adapters.flux import default_full
from tokenmerge.archs import build_dit, build_unet, tiny_pipeline, unet_inputs
from tokenmerge.methods.base import Generation
from tokenmerge.ops.bipartite import SlotMerge
from tokenmerge.ops.toma import TileMerge
from tokenmerge.plans import KVPlan, MergePlan

from .conftest import generate

ALL_FLUX = {"double": (0, None), "single": (0, None)}


@pytest.fixture(scope="module")
def sdxl() -> Iterator:
    pipe = tiny_pipeline("tiny-sdxl")
    pipe.set_progress_bar_config(disable=True)
    yield pipe


@pytest.fixture
def xl(sdxl) -> Iterator:
    yield sdxl
    tm.remove(sdxl)


def dit_run(pipe, **kwargs) -> torch.Tensor:
    return generate(pipe, guidance_scale=5.0, max_sequence_length=16, **kwargs)


def manual_loop(unet: torch.nn.Module, timesteps: tuple[int, ...] = (900, 600, 300)) -> torch.Tensor:
    """A hand-written loop on the bare UNet without ``tm.set_step``: the step comes from the timestep."""
    inputs = unet_inputs(unet, 2, 16, 16)
    with torch.no_grad():
        return torch.stack([unet(**{**inputs, "timestep": torch.tensor(t)}).sample for t in timesteps])


# ---- defaults that merge, and no silent no-ops ---------------------------------------------------------------------


@pytest.mark.parametrize("method", [tm.ToMeSD(), tm.CAToMe(), tm.ToDo()], ids=["tomesd", "catome", "todo"])
def test_baseline_defaults_merge_on_sdxl(xl, method: tm.Method) -> None:
    """max_downsample=None: the finest level with attention (SDXL has none at full resolution: level 2)."""
    base = generate(xl, guidance_scale=5.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="tokenmerge: .*(merged nothing|patches no block)")
        tm.apply(xl, method)
        merged = generate(xl, guidance_scale=5.0)
    assert not torch.equal(merged, base)
    assert {b.downsample for b in tm.summary(xl).blocks} == {2}


def test_flux_default_placement_scales_with_depth() -> None:
    """Flux.1's 19 + 38 blocks keep five of each full; shallower models proportionally fewer."""
    assert [default_full("double", n) for n in (19, 2, 1, 4)] == [5, 1, 0, 1]
    assert [default_full("single", n) for n in (38, 4, 2, 1, 76)] == [5, 1, 0, 0, 10]
    pipe = tiny_pipeline("tiny-flux")  # 2 double-stream, 2 single-stream blocks
    pipe.set_progress_bar_config(disable=True)
    base = dit_run(pipe)
    tm.apply(pipe, tm.ToMA())
    assert not torch.equal(dit_run(pipe), base)
    assert [s.name for s in pipe.transformer._tokenmerge.sites] == [
        "transformer_blocks.1",
        "single_transformer_blocks.0",
        "single_transformer_blocks.1",
    ]


def test_options_that_patch_nothing_warn_at_apply(xl) -> None:
    with pytest.warns(UserWarning, match=r"patches no block.*max_downsample=1.*max_downsample=2"):
        tm.apply(xl, tm.ToMeSD(max_downsample=1))
    model = build_dit("tiny-flux")
    with pytest.warns(UserWarning, match=r"patches no block.*blocks="):
        tm.apply(model, tm.ToMA(blocks={"double": [], "single": []}))


@pytest.mark.parametrize(
    ("method", "why"),
    [(tm.ToMA(steps=[]), "not in steps="), (tm.ToMA(ratio=0.01), "keeps every token")],
    ids=["steps", "ratio"],
)
def test_a_generation_that_merged_nothing_warns_once(xl, method: tm.Method, why: str) -> None:
    tm.apply(xl, method)
    with pytest.warns(UserWarning, match=f"merged nothing.*{why}"):
        generate(xl)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="tokenmerge")
        generate(xl)  # once per patch and reason


@pytest.mark.parametrize(
    "method",
    [tm.ToMA(ratio=0.01), tm.ToMA(ratio=0.01, mode="tokens"), tm.CAToMe(threshold=1.0)],
    ids=["toma-kv", "toma-tokens", "catome"],
)
def test_a_plan_that_keeps_every_token_leaves_the_model_bit_identical(xl, method: tm.Method) -> None:
    """A plan that keeps every token (a ratio too small for the tile, a threshold no pair reaches) is not run: the
    block sees its tokens in their own order, so the output is the unpatched one bit for bit (and it warns)."""
    base = generate(xl)
    tm.apply(xl, method)
    with pytest.warns(UserWarning, match="keeps every token"):
        assert torch.equal(generate(xl), base)


def test_the_observer_merges_nothing_by_design_without_a_warning(xl) -> None:
    from tokenmerge.analysis import observer_for

    tm.apply(xl, observer_for(xl))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="tokenmerge")
        generate(xl)
    assert tm.summary(xl).merged_calls == 0


# ---- validation ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "kwargs", "error", "option"),
    [
        (tm.ToMA, dict(tile=(4.0, 4.0)), TypeError, "tile"),
        (tm.ToMA, dict(ratio=torch.tensor(0.5)), TypeError, "ratio"),
        (tm.ToMA, dict(ratio="0.5"), TypeError, "ratio"),
        (tm.ToMA, dict(weight_every=float("nan")), TypeError, "weight_every"),
        (tm.ToMA, dict(dest_every=True), TypeError, "dest_every"),
        (tm.ToMA, dict(tau=float("nan")), ValueError, "tau"),
        (tm.ToMA, dict(tau=float("inf")), ValueError, "tau"),
        (tm.ToMA, dict(steps=5), TypeError, "steps"),
        (tm.ToMA, dict(steps=[0, 1.5]), TypeError, "steps"),
        (tm.ToMA, dict(merge_mlp="yes"), TypeError, "merge_mlp"),
        (tm.ToMA, dict(max_downsample=2.0), TypeError, "max_downsample"),
        (tm.ToMA, dict(blocks=[(0, None)]), TypeError, "blocks"),
        (tm.ToMeSD, dict(seed="a"), TypeError, "seed"),
        (tm.ToMeSD, dict(seed=2**70), ValueError, "seed"),  # a torch.Generator takes [0, 2**64)
        (tm.CAToMe, dict(seed=-1), ValueError, "seed"),
        (tm.ToMA, dict(blocks={}), ValueError, "blocks"),  # names no kind: not silently the default placement
        (tm.ToMeSD, dict(sx=2.5), TypeError, "sx"),
        (tm.ToMeSD, dict(use_rand=1), TypeError, "use_rand"),
        (tm.CAToMe, dict(threshold=float("nan")), ValueError, "threshold"),
        (tm.CAToMe, dict(schedule=2.5), TypeError, "schedule"),
        (tm.CAToMe, dict(bucket="8"), TypeError, "bucket"),
        (tm.ToDo, dict(factor=2.0), TypeError, "factor"),
    ],
)
def test_bad_options_raise_at_construction(cls: type, kwargs: dict, error: type, option: str) -> None:
    with pytest.raises(error, match=option):
        cls(**kwargs)


def test_options_are_normalised() -> None:
    """One-shot iterators are read once (not consumed by validation); tiles may be an int or a list; the main knob
    stays positional."""
    method = tm.ToMA(steps=iter([0, 2]), tile=[2, 2])
    assert method.steps == frozenset({0, 2}) and method.active(2) and not method.active(1)
    assert tm.ToMA(tile=4).tile == (4, 4) and hash(method)
    assert tm.CAToMe(schedule=iter([5, 0])).checkpoints() == {0, 5}
    assert (tm.ToMeSD(0.4).ratio, tm.CAToMe(0.6).threshold, tm.ToMA(0.3).ratio, tm.ToDo(4).factor) == (0.4, 0.6, 0.3, 4)
    with pytest.raises(TypeError):
        tm.ToMeSD(0.5, 2)  # max_downsample and the cell options are keyword-only


def test_catome_mask_on_sd3_raises_at_apply_and_the_default_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    """An explicit batch='sample' needs a key mask, which SD3's joint attention cannot take: ValueError at apply,
    naming batch, before anything changes (the patch applied before stays). The default, batch='auto', is 'min'
    there (logged, and shown by the summary) and runs."""
    pipe = tiny_pipeline("tiny-sd3")
    pipe.set_progress_bar_config(disable=True)
    tm.apply(pipe, tm.ToDo())
    with pytest.raises(ValueError, match=r"batch='sample'.*JointAttnProcessor2_0.*batch='auto'"):
        tm.apply(pipe, tm.CAToMe(threshold=0.0, batch="sample"))
    assert isinstance(pipe.transformer._tokenmerge.method, tm.ToDo)
    with pytest.raises(ValueError), tm.applied(pipe, tm.CAToMe(threshold=0.0, batch="sample")):
        pass
    assert isinstance(pipe.transformer._tokenmerge.method, tm.ToDo)
    with caplog.at_level("INFO", logger="tokenmerge"):
        tm.apply(pipe, tm.CAToMe(threshold=0.0))
    assert "CAToMe(threshold=0.0) on SD3Transformer2DModel is CAToMe(threshold=0.0, batch='min')" in caplog.text
    dit_run(pipe)
    summary = tm.summary(pipe)
    assert summary.method == "CAToMe(threshold=0.0, batch='min')" and summary.merged_calls > 0


def test_catome_auto_batch_follows_the_attention_backend(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """batch='auto' on Flux: 'sample' on a backend that takes masks, 'min' on one that takes none, set before apply
    or between calls (resolved again when a call starts, logged; its plans then carry no mask)."""
    import torch.nn.functional as F

    from tokenmerge.adapters import base

    masked: list[bool] = []  # whether each attention call of the transformer got a mask
    inside: list[int] = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        if inside:
            masked.append(kwargs.get("attn_mask") is not None)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    pipe = tiny_pipeline("tiny-flux")
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.register_forward_pre_hook(lambda m, a: inside.append(1))
    pipe.transformer.register_forward_hook(lambda m, a, o: inside.clear())
    processors = [m.processor for m in pipe.transformer.modules() if hasattr(m, "processor")]
    for p in processors:
        p._attention_backend = "flash"
    tm.apply(pipe, tm.CAToMe(threshold=0.0, blocks=ALL_FLUX))
    assert "batch='min'" in tm.summary(pipe).method
    for p in processors:
        p._attention_backend = None
    dit_run(pipe)  # the call's start resolves again: the native backend takes masks
    assert "batch='sample'" in tm.summary(pipe).method and any(masked)
    masked.clear()
    with monkeypatch.context() as patched, caplog.at_level("INFO", logger="tokenmerge"):
        patched.setattr(base, "MASK_BACKENDS", frozenset())  # as if the active backend took none (sage, flash)
        dit_run(pipe)
    assert "on FluxTransformer2DModel is now CAToMe(" in caplog.text and "batch='min')" in caplog.text
    assert tm.summary(pipe).merged_calls > 0
    assert masked and not any(masked)
    dit_run(pipe)
    assert "batch='sample'" in tm.summary(pipe).method


def test_mask_on_a_backend_without_masks_raises_before_any_denoiser_call() -> None:
    """Flux under a flash/sage backend: set on the model before apply (its processors' backend), or active around
    the call (diffusers' ``attention_backend(...)``): a clear ValueError, before the transformer runs."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    pipe = tiny_pipeline("tiny-flux")
    pipe.set_progress_bar_config(disable=True)
    method = tm.CAToMe(threshold=0.0, batch="sample", blocks=ALL_FLUX)
    processors = [m.processor for m in pipe.transformer.modules() if hasattr(m, "processor")]
    for p in processors:
        p._attention_backend = "flash"  # what transformer.set_attention_backend("flash") sets
    with pytest.raises(ValueError, match=r"batch='sample'.*'flash' attention backend"):
        tm.apply(pipe, method)
    for p in processors:
        p._attention_backend = None
    tm.apply(pipe, method)
    calls: list[int] = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    active = _AttentionBackendRegistry._active_backend
    _AttentionBackendRegistry.set_active_backend("sage")  # what `with attention_backend("sage"):` sets
    try:
        with pytest.raises(ValueError, match="'sage' attention backend"):
            dit_run(pipe)
    finally:
        _AttentionBackendRegistry.set_active_backend(active)
    assert not calls
    dit_run(pipe)  # back on the native backend: runs


# ---- lifecycles ----------------------------------------------------------------------------------------------------


def _interrupt(pipe, i, t, kwargs):
    if i == 1:
        pipe._interrupt = True
    return kwargs


def _fail(pipe, i, t, kwargs):
    if i == 1:
        raise RuntimeError("callback failed")
    return kwargs


def _ctrl_c(pipe, i, t, kwargs):
    if i == 1:
        raise KeyboardInterrupt
    return kwargs


@pytest.mark.parametrize("ending", ["interrupt", "exception", "keyboard", "denoising_end"])
def test_early_stop_leaves_no_stale_state(xl, ending: str) -> None:
    """However a pipeline call ends, the next hand-written loop starts fresh: it equals a freshly patched model's."""
    method = tm.ToMA(ratio=0.5, dest_every=1)
    tm.apply(xl, method)
    expected_error = {"exception": RuntimeError, "keyboard": KeyboardInterrupt}.get(ending)
    options = dict(
        interrupt=dict(callback_on_step_end=_interrupt),
        exception=dict(callback_on_step_end=_fail),
        keyboard=dict(callback_on_step_end=_ctrl_c),
        denoising_end=dict(denoising_end=0.5),
    )[ending]
    if expected_error is None:
        generate(xl, steps=4, guidance_scale=5.0, **options)
    else:
        with pytest.raises(expected_error):
            generate(xl, steps=4, guidance_scale=5.0, **options)
    patch = xl.unet._tokenmerge
    assert not patch.tracker.driven and not patch.caches
    after = manual_loop(xl.unet)
    tm.apply(xl, method)
    assert torch.equal(after, manual_loop(xl.unet))


def test_replaced_scheduler_is_followed(xl) -> None:
    from diffusers import DDIMScheduler

    old = xl.scheduler
    tm.apply(xl, tm.ToMA())
    xl.scheduler = DDIMScheduler.from_config(old.config)
    tracker = xl.unet._tokenmerge.tracker
    seen: list[tuple[int, bool]] = []
    handle = xl.unet.register_forward_hook(lambda m, a, o: seen.append((tracker.step, tracker.driven)))
    generate(xl, steps=3)
    handle.remove()
    assert seen == [(0, True), (1, True), (2, True)]  # driven by the new scheduler: no timestep read
    assert "set_timesteps" not in vars(old) and "step" not in vars(old)
    tm.remove(xl)
    assert "set_timesteps" not in vars(xl.scheduler) and "progress_bar" not in vars(xl)
    xl.scheduler = old


def test_reference_pipeline_resets_when_its_loop_fails() -> None:
    from tokenmerge.reference.pipeline import load_pipeline

    pipe = load_pipeline("unet")
    tm.apply(pipe, tm.ToMA())
    calls: list[int] = []

    def fail_second(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")

    handle = pipe.unet.register_forward_pre_hook(fail_second)
    with pytest.raises(RuntimeError):
        pipe(["red circle"], [0], steps=3)
    handle.remove()
    assert not pipe.unet._tokenmerge.tracker.driven and not pipe.unet._tokenmerge.caches
    pipe(["red circle"], [0], steps=2)
    assert tm.summary(pipe).steps_merged == 2


def test_deepcopy_of_a_patched_denoiser_is_independent() -> None:
    unet = build_unet("tiny-sd15")
    plain = manual_loop(unet)
    tm.apply(unet, tm.ToMA(ratio=0.5, dest_every=1))
    twin = copy.deepcopy(unet)
    merged = manual_loop(unet)
    assert not torch.equal(merged, plain)
    tm.remove(unet)
    assert torch.equal(manual_loop(twin), merged)  # still patched, with hooks and caches of its own
    assert torch.equal(manual_loop(unet), plain)
    tm.remove(twin)
    assert torch.equal(manual_loop(twin), plain)


def test_deepcopy_of_a_patched_pipeline_drives_the_copy() -> None:
    pipe = tiny_pipeline("tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    tm.apply(pipe, tm.ToMA(ratio=0.5, dest_every=1))
    expected = generate(pipe, steps=3)
    twin = copy.deepcopy(pipe)
    tracker = twin.unet._tokenmerge.tracker
    seen: list[bool] = []
    twin.unet.register_forward_hook(lambda m, a, o: seen.append(tracker.driven))
    assert torch.equal(generate(twin, steps=3), expected) and seen == [True] * 3
    assert pipe.unet._tokenmerge.counters.calls == 3  # the original saw none of the copy's calls
    tm.remove(twin)
    assert "set_timesteps" in vars(pipe.scheduler) and "set_timesteps" not in vars(twin.scheduler)


def test_deepcopy_of_patched_flux() -> None:
    model = build_dit("tiny-flux")
    tm.apply(model, tm.ToMA(blocks=ALL_FLUX))
    twin = copy.deepcopy(model)
    tm.remove(model)
    inputs = _flux_inputs(twin)
    with torch.no_grad():
        out = twin(**inputs).sample
        tm.remove(twin)
        assert not torch.equal(out, twin(**inputs).sample)


def _flux_inputs(model) -> dict:
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(6), indexing="ij")
    return dict(
        hidden_states=torch.randn(2, 24, model.config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(2, 5, model.config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(2, model.config.pooled_projection_dim, generator=g),
        timestep=torch.full((2,), 0.5),
        img_ids=torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float(),
        txt_ids=torch.zeros(5, 3),
        guidance=torch.full((2,), 3.5),
    )


# ---- summary, is_applied, applied ----------------------------------------------------------------------------------


def test_summary_reports_blocks_tokens_and_steps(xl) -> None:
    assert not tm.is_applied(xl) and not tm.summary(xl).applied and "not patched" in str(tm.summary(xl))
    tm.apply(xl, tm.ToMA(ratio=0.75, mode="tokens", steps=[1, 3]))
    assert tm.is_applied(xl)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="tokenmerge")  # steps 0 and 2 unmerged, but the generation merged
        generate(xl, steps=4)
    s = tm.summary(xl)
    assert s.blocks_per_group() == {"down2": 2, "down4": 2, "mid4": 2, "up4": 4, "up2": 4}
    assert {(b.tokens_in, b.tokens_out) for b in s.blocks} == {(64, 16), (16, 4)}  # 16x16 latent: 8x8 and 4x4 grids
    assert all(b.roles == ("attn", "cross", "mlp") for b in s.blocks)
    assert (s.calls, s.merged_calls, s.steps_run, s.steps_merged) == (4, 2, 4, 2)
    assert s.unmerged == {"the step is not in steps=": 2}
    text = str(s)
    assert "2 of 4 steps merged" in text and "down_blocks.1.attentions.0.transformer_blocks.0" in text


def test_applied_context_restores_what_was_there(xl) -> None:
    base = generate(xl)
    with tm.applied(xl, tm.ToMA()):
        assert tm.is_applied(xl) and not torch.equal(generate(xl), base)
    assert not tm.is_applied(xl) and torch.equal(generate(xl), base)
    tm.apply(xl, tm.ToDo())
    with pytest.raises(RuntimeError), tm.applied(xl, tm.ToMA()):
        raise RuntimeError
    assert isinstance(xl.unet._tokenmerge.method, tm.ToDo)


# ---- the typed core ------------------------------------------------------------------------------------------------


def test_plans_satisfy_their_protocols_and_sites_are_keyword_only() -> None:
    x = torch.randn(2, 16, 8)
    caches = [m.new_cache(Generation(num_steps=3)) for m in (tm.ToMA(), tm.ToMeSD(use_rand=False), tm.ToDo())]
    plans = [
        tm.ToMA(tile=2).plan(x, (4, 4), caches[0], (True, True)),
        tm.ToMeSD(use_rand=False).plan(x, (4, 4), caches[1], None),
        tm.ToDo().plan(x, (4, 4), caches[2], None),
    ]
    assert isinstance(plans[0], TileMerge) and isinstance(plans[1], SlotMerge)
    assert all(isinstance(p, MergePlan) and not isinstance(p, KVPlan) for p in plans[:2])
    assert isinstance(plans[2], KVPlan) and plans[2].num_kv == 4
    assert caches[0].merge is plans[0] and caches[0].fresh  # the typed cache ToMA owns
    with pytest.raises(TypeError):
        Site("name", torch.nn.Identity(), {}, "group", 1)


def test_a_plan_of_the_wrong_kind_raises() -> None:
    class Broken(tm.ToDo):
        def plan(self, x, grid, cache, phase):
            return tm.ToMA().plan(x, grid, tm.ToMA().new_cache(), (True, True))

    unet = build_unet("tiny-sd15")
    tm.apply(unet, Broken())
    with pytest.raises(TypeError, match="not a KVPlan"):
        manual_loop(unet, (900,))
