"""ToMeSD, CA-ToMe and ToDo specifics: exactness against the reference packages, schedules, batch semantics, math.

The method x architecture matrix (identity, ``remove``, fewer tokens, shape changes) is in ``test_matrix.py``.
"""

from __future__ import annotations

import pytest
import torch

import tokenmerge as tm
from tokenmerge.api import view_of
from tokenmerge.archs import build_unet, unet_inputs
from tokenmerge.methods.catome import SCHEDULES, scale_schedule

from .conftest import generate

TEXT_LEN = 77


def self_attention(lengths: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(q, k) for q, k in lengths if k != TEXT_LEN]


# ---- ToMeSD vs the tomesd package ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "guidance"),
    [
        (dict(ratio=0.5), 5.0),
        (dict(ratio=0.5), 1.0),  # odd batch: tomesd turns the random destinations off
        (dict(ratio=0.6, max_downsample=2, merge_crossattn=True, merge_mlp=True), 5.0),
        (dict(ratio=0.4, max_downsample=4, use_rand=False, sx=2, sy=1), 5.0),
    ],
)
def test_tomesd_matches_reference(pipe, options: dict, guidance: float) -> None:
    """Same settings and the same global seed: our ToMeSD matches the tomesd package (RNG draws included)."""
    import tomesd  # test oracle (test extra)

    if pipe.unet.config.addition_embed_type == "text_time" and options.get("max_downsample", 1) == 1:
        options = {**options, "max_downsample": 2}  # tomesd's default does nothing on SDXL: no attention at level 1
    base = generate(pipe, guidance_scale=guidance, height=32, width=48, steps=3)
    tomesd.apply_patch(pipe, **options)
    torch.manual_seed(7)  # tomesd forks the global generator at its first draw
    ref = generate(pipe, guidance_scale=guidance, height=32, width=48, steps=3)
    tomesd.remove_patch(pipe)
    tm.apply(pipe, tm.ToMeSD(**options, seed=7))
    ours = generate(pipe, guidance_scale=guidance, height=32, width=48, steps=3)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert (ours - base).abs().max() > 100 * (ours - ref).abs().max()  # the merge did something


def test_tomesd_global_rng_semantics() -> None:
    """seed=None forks torch's global generator per generation: torch.manual_seed reproduces a call."""
    unet = build_unet("tiny-sd15")
    inputs = unet_inputs(unet, 2, 16, 16)
    tm.apply(unet, tm.ToMeSD(ratio=0.5))
    outs = []
    with torch.no_grad():
        for seed in (1, 2, 1):
            tm.reset(unet)
            torch.manual_seed(seed)
            outs.append(unet(**inputs).sample)
    assert torch.equal(outs[0], outs[2]) and not torch.equal(outs[0], outs[1])


# ---- CA-ToMe ------------------------------------------------------------------------------------------------------


def test_catome_matches_reference_on_its_call_path() -> None:
    """ca-tome works only through its private ``pipe.call`` on SD 1.x, with 1-based steps: checkpoints ``s + 1``."""
    import ca_tome  # test oracle (scripts/setup.sh installs it with --no-deps)

    from tokenmerge.archs import tiny_pipeline

    pipe = tiny_pipeline("tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    ours_schedule = [0, 2, 3]
    kwargs = dict(num_inference_steps=5, height=32, width=32, guidance_scale=5.0, output_type="latent")
    ca_tome.apply_CA_ToMe(pipe, [s + 1 for s in ours_schedule], 0.2)
    torch.manual_seed(3)
    ref = pipe.call("a red cube", generator=torch.Generator().manual_seed(0), **kwargs).images
    ca_tome.patch.remove_patch(pipe)
    fresh = tiny_pipeline("tiny-sd15")
    fresh.set_progress_bar_config(disable=True)
    base = fresh("a red cube", generator=torch.Generator().manual_seed(0), **kwargs).images
    tm.apply(fresh, tm.CAToMe(threshold=0.2, schedule=ours_schedule, batch="max", seed=3))
    ours = fresh("a red cube", generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert (ours - base).abs().max() > 100 * (ours - ref).abs().max()


def test_catome_schedules_scale() -> None:
    assert scale_schedule(SCHEDULES["config3"], 50) == frozenset(SCHEDULES["config3"])
    assert scale_schedule(SCHEDULES["config3"], 25) == frozenset({0, 4, 5, 6, 10, 12, 15, 17, 22, 23, 24})
    for name in SCHEDULES:
        for n in (1, 7, 20, 50, 100):
            points = tm.CAToMe(schedule=name, num_steps=n).checkpoints()
            assert 0 in points and max(points) < n
    assert not tm.CAToMe(schedule=4).is_checkpoint(3) and tm.CAToMe(schedule=4).is_checkpoint(8)


def test_catome_pairs_recomputed_only_at_checkpoints(pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    """Matching at checkpoint steps of the scheduler's step count only; reset at every generation."""
    from tokenmerge.methods import catome

    made: list[int] = []
    original = catome.bipartite_match
    monkeypatch.setattr(catome, "bipartite_match", lambda x, dst: x.is_meta or made.append(1) or original(x, dst))
    method = tm.CAToMe(threshold=0.0, schedule="config1", max_downsample=2, seed=0)  # 10 steps: 0, 1, 2, 3, 5, 7
    tm.apply(pipe, method)
    first = generate(pipe, steps=10, guidance_scale=5.0)
    sites = len(pipe.unet._tokenmerge.sites)
    assert pipe.unet._tokenmerge.tracker.num_steps == 10 and len(made) == 6 * sites
    assert torch.equal(generate(pipe, steps=10, guidance_scale=5.0), first)  # no stale pairs from image 1
    made.clear()
    generate(pipe, steps=20, guidance_scale=5.0)  # scaled to the new step count: 0, 1, 2, 4, 6, 10, 14
    assert method.checkpoints(20) == {0, 1, 2, 4, 6, 10, 14} and len(made) == 7 * sites


def test_catome_schedule_scales_to_the_steps_img2img_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """img2img with strength 0.5 of 10 steps runs 5: a named schedule is scaled to those 5 steps."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from tokenmerge.archs import tiny_pipeline
    from tokenmerge.methods import catome

    made: list[int] = []
    original = catome.bipartite_match
    monkeypatch.setattr(catome, "bipartite_match", lambda x, dst: x.is_meta or made.append(1) or original(x, dst))
    pipe = StableDiffusionImg2ImgPipeline(**tiny_pipeline("tiny-sd15").components)
    pipe.set_progress_bar_config(disable=True)
    method = tm.CAToMe(threshold=0.0, schedule="config3", seed=0)
    tm.apply(pipe, method)
    kwargs = dict(image=torch.rand(1, 3, 32, 32), strength=0.5, num_inference_steps=10, output_type="latent")
    pipe("a cube", generator=torch.Generator().manual_seed(0), **kwargs)
    sites = len(pipe.unet._tokenmerge.sites)
    assert method.checkpoints(5) == {0, 1, 2, 3, 4} and method.checkpoints(10) & set(range(5)) == {0, 1, 2, 4}
    assert len(made) == 5 * sites


def test_catome_per_sample_is_independent_of_batch_mates() -> None:
    """batch="sample": each sample of a batch gives what it gives alone (masked padding keeps softmax exact)."""
    unet = build_unet("tiny-sd15")
    inputs = unet_inputs(unet, 2, 16, 16)
    inputs["sample"][1] = inputs["sample"][1].cumsum(-1) / 4  # smoother: merges more than sample 0
    outs = {}
    for mode in ("sample", "max"):
        tm.apply(unet, tm.CAToMe(threshold=0.3, batch=mode, use_rand=False, max_downsample=2))
        with torch.no_grad():
            both = unet(**inputs).sample
            alone = [unet(**{k: _pick(v, i) for k, v in inputs.items()}).sample for i in (0, 1)]
        outs[mode] = (both, torch.cat(alone))
    torch.testing.assert_close(*outs["sample"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(*outs["max"], rtol=1e-4, atol=1e-5)  # the reference's batch max couples samples


def test_catome_bucketed_lengths(attention_lengths) -> None:
    unet = build_unet("tiny-sd15")
    inputs = unet_inputs(unet, 2, 16, 16)
    for batch in ("sample", "min", "max"):
        tm.apply(unet, tm.CAToMe(threshold=0.3, batch=batch, bucket=24))
        attention_lengths.clear()
        with torch.no_grad():
            unet(**inputs)
        assert all(k % 24 == 0 or k in (64, 16) for _, k in self_attention(attention_lengths)), attention_lengths


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (tm.ToMeSD, dict(ratio=1.0)),
        (tm.ToMeSD, dict(ratio=-0.1)),
        (tm.ToMeSD, dict(sx=1, sy=1)),
        (tm.ToMeSD, dict(sx=0)),
        (tm.ToMeSD, dict(max_downsample=3)),
        (tm.ToMeSD, dict(merge_attn=False)),
        (tm.CAToMe, dict(threshold=1.5)),
        (tm.CAToMe, dict(schedule="config9")),
        (tm.CAToMe, dict(schedule=0)),
        (tm.CAToMe, dict(schedule=[0, -1])),
        (tm.CAToMe, dict(num_steps=0)),
        (tm.CAToMe, dict(batch="mean")),
        (tm.CAToMe, dict(bucket=0)),
        (tm.CAToMe, dict(steps=[-2])),
        (tm.ToDo, dict(factor=0)),
        (tm.ToDo, dict(factor=1.5)),
        (tm.ToDo, dict(max_downsample=6)),
        (tm.ToMA, dict(locality=-1.0)),
        (tm.ToMA, dict(tie_tol=-1e-4)),
        (tm.ToMA, dict(tie_tol=1.0)),
        (tm.ToMA, dict(mode="keys")),
        (tm.ToMA, dict(mode="kv", merge_attn=False)),
        (tm.ToMA, dict(mode="kv", kv_tokens="mean")),
        (tm.ToMA, dict(merge_every=0)),
    ],
)
def test_invalid_config_raises(cls: type, kwargs: dict) -> None:
    with pytest.raises((ValueError, TypeError), match=r"must|unknown"):
        cls(**kwargs)


def _pick(value, i: int):
    if isinstance(value, torch.Tensor) and value.ndim > 0:
        return value[i : i + 1]
    if isinstance(value, dict):
        return {k: _pick(v, i) for k, v in value.items()}
    return value


def test_slot_merge_ops() -> None:
    from tokenmerge.ops.bipartite import bipartite_match, cell_destinations, slot_merge
    from tokenmerge.ops.downsample import downsample_tokens

    x = torch.randn(2, 5 * 7, 8)
    dst = cell_destinations(5, 7, generator=torch.Generator().manual_seed(0))
    assert dst.numel() == 2 * 3 and len(set(dst.tolist())) == 6
    src, best, match = bipartite_match(x, dst)
    nothing = slot_merge(35, dst, src, match, torch.zeros_like(best, dtype=torch.bool), x.dtype)
    assert nothing.key_bias is None and torch.equal(nothing.unmerge(nothing.merge(x)), x)
    merged = torch.zeros_like(best, dtype=torch.bool)
    merged[0, :4] = True  # sample 0 merges 4 sources, sample 1 none: padded to 35 rows
    plan = slot_merge(35, dst, src, match, merged, x.dtype)
    assert plan.num_merged == 35 and plan.key_bias is not None
    assert (plan.key_bias[0, 0] < 0).sum() == 4 and (plan.key_bias[1] == 0).all()
    y = plan.merge(x)
    j = match[0, 0]
    group = [dst[j]] + [src[i] for i in range(4) if match[0, i] == j]
    torch.testing.assert_close(y[0, j], x[0, group].mean(0))
    assert torch.equal(plan.unmerge(y)[1], x[1])
    grid = torch.arange(20.0).view(1, 20, 1)
    assert downsample_tokens(grid, (4, 5), 2).flatten().tolist() == [0, 2, 4, 10, 12, 14]


def test_todo_block_matches_explicit_math() -> None:
    """A ToDo block computes x + attn1(g(x), K/V from the 2x-downsampled g(x)) + (cross, MLP unchanged)."""
    unet = build_unet("tiny-sd15")
    tm.apply(unet, tm.ToDo(factor=2))
    site = unet._tokenmerge.sites[0]
    captured = {}
    handle = site.block.register_forward_hook(
        lambda m, args, kwargs, out: captured.update(x=args[0], kwargs=kwargs, out=out, hw=site.grid.hw),
        with_kwargs=True,
    )
    with torch.no_grad():
        unet(**unet_inputs(unet, 2, 16, 16))
    handle.remove()
    tm.remove(unet)
    block, x, enc, (h, w) = site.block, captured["x"], captured["kwargs"]["encoder_hidden_states"], captured["hw"]
    with torch.no_grad():
        n1 = block.norm1(x)
        kv = n1.view(2, h, w, -1)[:, ::2, ::2].flatten(1, 2)
        out = x + block.attn1(n1, encoder_hidden_states=kv)
        out = out + block.attn2(block.norm2(out), encoder_hidden_states=enc)
        out = out + block.ff(block.norm3(out))
    torch.testing.assert_close(captured["out"], out, rtol=1e-5, atol=1e-5)


# ---- ToMA ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_unet_call() -> tuple[torch.nn.Module, dict]:
    """The trained reference UNet and the inputs of one mid-denoising call: 4 held-out scenes noised to t=400, with
    their captions (flat backgrounds: tiles full of near-identical tokens, the hard case for stable selection)."""
    from tokenmerge.reference import data
    from tokenmerge.reference.pipeline import load_pipeline

    pipe = load_pipeline("unet")
    images, prompts = data.make_batch(seed=777, index=0, batch=4)
    t = torch.tensor(400)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text, _ = pipe.text_encoder(data.tokenize(prompts))
    sample = pipe.scheduler.add_noise(images * 2 - 1, noise, t)
    return pipe.unet, dict(sample=sample, timestep=t, encoder_hidden_states=text)


def _toma_call(unet: torch.nn.Module, inputs: dict) -> torch.Tensor:
    tm.set_step(unet, 0)  # a fresh selection
    with torch.no_grad():
        return unet(**inputs).sample


@pytest.mark.parametrize(
    "method", [tm.ToMA(mode="tokens", max_downsample=4), tm.ToMA(0.75, mode="kv", locality=0.05, max_downsample=None)]
)
def test_toma_output_is_stable_under_rounding_noise(reference_unet_call, method: tm.ToMA) -> None:
    """Relative output change of one reference-UNet call < 1e-4 under 1e-6 input noise, between a sample alone and in
    a batch of four, and between the SDPA and the bmm attention processors (exact tie-breaking made picks flip under
    all three: 1e-2, 1e-2 and 5e-3 in tokens mode on whole blocks at every level, what ``ToMA()`` resolves to on the
    real-size SD 1.5 and SDXL UNets; now 2e-6, 5e-7 and 5e-7, measured). The keys/values preset, too."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet, inputs = reference_unet_call

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    tm.apply(unet, method)
    try:
        ref = _toma_call(unet, inputs)
        noise = torch.randn(inputs["sample"].shape, generator=torch.Generator().manual_seed(1))
        assert rel(_toma_call(unet, {**inputs, "sample": inputs["sample"] + 1e-6 * noise}), ref) < 1e-4
        alone = {k: v[:1] if k != "timestep" else v for k, v in inputs.items()}
        assert rel(_toma_call(unet, alone), ref[:1]) < 1e-4
        unet.set_attn_processor(AttnProcessor())
        assert rel(_toma_call(unet, inputs), ref) < 1e-4
    finally:
        unet.set_attn_processor(AttnProcessor2_0())
        tm.remove(unet)


def _record_plans(monkeypatch: pytest.MonkeyPatch, step=lambda: -1) -> list[tuple[int, torch.Tensor, bool]]:
    """(``step()``, tokens, fresh destinations) of every ToMA plan computed while the test runs."""
    from tokenmerge.methods import toma as toma_module

    seen: list[tuple[int, torch.Tensor, bool]] = []
    original = toma_module.toma_merge

    def spy(x, grid, options, dest):
        if not x.is_meta:  # apply counts FLOPs on the model's weightless twin
            seen.append((step(), x, dest is None))
        return original(x, grid, options, dest)

    monkeypatch.setattr(toma_module, "toma_merge", spy)
    return seen


def _flux_inputs(batch: int = 2) -> dict:
    """Inputs of one tiny-flux call on a 6x10 grid (60 image tokens, 5 text tokens)."""
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(6), torch.arange(10), indexing="ij")
    return dict(
        hidden_states=torch.randn(batch, 60, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, 5, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float(),
        txt_ids=torch.zeros(5, 3),
        guidance=torch.full((batch,), 3.5),
    )


@pytest.mark.parametrize("kv_tokens", ["destinations", "merged"])
def test_toma_kv_mode_keeps_every_query_and_merges_keys(attention_lengths, kv_tokens: str) -> None:
    """``mode="kv"``: self-attention at the merged levels has all N queries and ``K = N / 4`` keys (ratio 0.75);
    nothing else changes length; the output differs from the model's. Plans are per sample: a sample alone gives the
    same output as in a batch of two."""
    unet = build_unet("tiny-sd15")
    inputs = unet_inputs(unet, 2, 16, 16)
    with torch.no_grad():
        base = unet(**inputs).sample
        tm.apply(unet, tm.ToMA(0.75, mode="kv", kv_tokens=kv_tokens, max_downsample=1))
        attention_lengths.clear()
        out = unet(**inputs).sample
        merged = [(q, k) for q, k in attention_lengths if k not in (q, 77)]
        assert merged and all(k * 4 == q == 256 for q, k in merged)
        assert all(k in (q, 77) or q == 256 for q, k in attention_lengths)
        alone = unet(**{k: _pick(v, 0) for k, v in inputs.items()}).sample
        tm.remove(unet)
    torch.testing.assert_close(alone, out[:1], rtol=1e-4, atol=1e-5)
    assert (out - base).abs().max() > 1e-4


def test_toma_default_resolves_from_where_the_work_is(caplog: pytest.LogCaptureFixture) -> None:
    """``mode`` / ``max_downsample`` ``"auto"``: the most faithful candidate whose merged call (at ratio 0.5) cuts the
    FLOPs of the model's default call by 1.5x, counted on its weightless twin: tokens mode at every attention level
    of the real-size SD 1.5 and SDXL UNets (keys/values cut too little there), at every level up to 4 on an explicit
    ``mode="tokens"``; keys/values mode where attention dominates (a tiny Flux at 1024 px, every block); the log and
    ``tm.summary`` say which. Options that fit no mode are a clear error at ``apply``."""
    from tokenmerge.archs import build_dit

    assert (tm.ToMA().mode, tm.ToMA().max_downsample) == ("auto", "auto")
    assert tm.ToMA(mode="kv").max_downsample is None and tm.ToMA(mode="tokens").max_downsample == "auto"
    with torch.device("meta"):
        sd15, sdxl = build_unet("sd15"), build_unet("sdxl")
    for unet, goal in ((sd15, 1.3), (sdxl, 1.5)):
        with caplog.at_level("INFO", logger="tokenmerge"):
            tm.apply(unet, tm.ToMA())
        assert "ToMA() on UNet2DConditionModel is ToMA(mode='tokens', max_downsample=4)" in caplog.text
        concrete = tm.ToMA(mode="tokens", max_downsample=4)
        assert tm.summary(unet).method == concrete.describe() and view_of(unet).flop_ratio(concrete) >= goal
        assert view_of(unet).flop_ratio(tm.ToMA(mode="kv")) < 1.1
        caplog.clear()
        tm.remove(unet)
    tm.apply(sdxl, tm.ToMA(0.75))  # the placement does not depend on the ratio
    assert tm.summary(sdxl).method == "ToMA(ratio=0.75, mode='tokens', max_downsample=4)"
    tm.remove(sdxl)
    flux = build_dit("tiny-flux")
    tm.apply(flux, tm.ToMA(blocks={"double": (0, None), "single": (0, None)}))
    assert "mode='kv'" in tm.summary(flux).method
    tm.apply(flux, tm.ToMA(merge_mlp=False))  # keys/values mode takes no role flags: tokens mode
    assert "mode='tokens'" in tm.summary(flux).method
    tm.remove(flux)
    with pytest.raises(ValueError, match=r"no mode fits these options.*mode='kv'.*mode='tokens'"):
        tm.apply(flux, tm.ToMA(merge_mlp=False, kv_tokens="merged"))
    assert not tm.is_applied(flux)
    for bad in (dict(mode="kv", merge_mlp=False), dict(mode="tokens", kv_tokens="merged"), dict(mode="fast")):
        with pytest.raises(ValueError, match="mode"):
            tm.ToMA(**bad)
    assert tm.ToDo(max_downsample="auto").resolve(view_of(flux)) == tm.ToDo()  # methods without a choice of their own


def test_toma_kv_mode_on_flux_uses_per_sample_key_positions() -> None:
    """Flux, ``mode="kv"``: keys take their destinations' rotary positions, per sample, so that a sample alone and in
    a batch of two agree."""
    from tokenmerge.archs import build_dit

    flux = build_dit("tiny-flux")
    inputs = _flux_inputs()
    tm.apply(flux, tm.ToMA(mode="kv", blocks={"double": (0, None), "single": (0, None)}))
    with torch.no_grad():
        both = flux(**inputs).sample
        alone = flux(**{k: _pick(v, 1) if k not in ("img_ids", "txt_ids") else v for k, v in inputs.items()})
    tm.remove(flux)
    torch.testing.assert_close(alone.sample, both[1:], rtol=1e-4, atol=1e-5)


def test_toma_authors_schedule_merges_every_third_step_with_fresh_destinations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tokenmerge.archs import tiny_pipeline

    pipe = tiny_pipeline("tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    seen = _record_plans(monkeypatch, lambda: pipe.unet._tokenmerge.tracker.step)
    tm.apply(pipe, tm.ToMA.authors_schedule())
    generate(pipe, steps=8)
    assert sorted({step for step, _, _ in seen}) == [0, 3, 6]
    assert all(fresh for _, _, fresh in seen)  # new destinations (and weights) at every merged step
    seen.clear()
    tm.apply(pipe, tm.ToMA(merge_every=3, dest_every=2))  # counted in merged steps: fresh at 0 and 6
    generate(pipe, steps=8)
    assert sorted({(step, fresh) for step, _, fresh in seen}) == [(0, True), (3, False), (6, True)]
    tm.remove(pipe)


def test_toma_locality_changes_the_merge() -> None:
    """The locality prior reaches the plan: the same model and input merge differently with and without it."""
    unet = build_unet("tiny-sd15")
    inputs = unet_inputs(unet, 1, 16, 16)
    outs = []
    with torch.no_grad():
        for locality in (0.0, 0.05):
            tm.apply(unet, tm.ToMA(locality=locality))
            outs.append(unet(**inputs).sample)
            tm.remove(unet)
    assert (outs[0] - outs[1]).abs().max() > 1e-5
