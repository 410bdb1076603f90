"""ToMA on UNet pipelines through the stock ``pipe(...)`` call (tiny SD1.5-like and SDXL-like layouts)."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline
from torch import nn

import tokenmerge as tm
from tokenmerge.archs import build_unet, tiny_pipeline, unet_inputs
from tokenmerge.methods import toma as toma_module

from .conftest import generate

TEXT_LEN = 77  # tokenizer length: cross-attention keys (and the text encoder's own attention)


def self_attention_queries(lengths: list[tuple[int, int]]) -> list[int]:
    return [q for q, k in lengths if k != TEXT_LEN]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_stock_call_batch_and_guidance(pipe, batch: int, guidance: float, attention_lengths) -> None:
    base = generate(pipe, ["a red cube"] * batch, guidance_scale=guidance)
    tm.apply(pipe, tm.ToMA(mode="tokens", ratio=0.5))
    attention_lengths.clear()
    merged = generate(pipe, ["a red cube"] * batch, guidance_scale=guidance)
    assert merged.shape == base.shape and torch.isfinite(merged).all()
    assert not torch.equal(merged, base)
    # 32px image -> 16x16 latent; every self-attention level of both layouts is merged at ratio 0.5
    full = {256, 64, 16}
    queries = set(self_attention_queries(attention_lengths))
    assert queries and not queries & full, queries
    assert queries <= {128, 32, 8}


def test_attention_runs_on_fewer_tokens(pipe, attention_lengths) -> None:
    generate(pipe)
    full = sorted(self_attention_queries(attention_lengths))
    tm.apply(pipe, tm.ToMA(mode="tokens", ratio=0.75))
    attention_lengths.clear()
    generate(pipe)
    merged = sorted(self_attention_queries(attention_lengths))
    assert len(merged) == len(full)
    assert [4 * m for m in merged] == full
    # cross-attention queries are merged too, keys (text) are not
    cross = [(q, k) for q, k in attention_lengths if k == TEXT_LEN != q]
    assert cross and all(q in {64, 16, 4} for q, _ in cross)


def test_attention_only_placement_keeps_cross_and_mlp_full(pipe, attention_lengths) -> None:
    tm.apply(pipe, tm.ToMA(mode="tokens", ratio=0.5, merge_crossattn=False, merge_mlp=False, max_downsample=4))
    generate(pipe)
    assert set(self_attention_queries(attention_lengths)) <= {128, 32, 8}
    cross = {q for q, k in attention_lengths if k == TEXT_LEN != q}
    assert cross and cross <= {256, 64, 16}


def test_ratio_zero_is_bit_identical(pipe) -> None:
    base = generate(pipe)
    tm.apply(pipe, tm.ToMA(mode="tokens", ratio=0.0))
    assert torch.equal(generate(pipe), base)


def test_remove_restores_exactly(pipe) -> None:
    base = generate(pipe, guidance_scale=5.0)
    hooks_before = _hook_count(pipe.unet)
    scheduler_attrs = dict(vars(pipe.scheduler))
    tm.apply(pipe, tm.ToMA(mode="tokens", ratio=0.5))
    assert _hook_count(pipe.unet) > hooks_before
    assert not torch.equal(generate(pipe, guidance_scale=5.0), base)
    tm.remove(pipe)
    assert _hook_count(pipe.unet) == hooks_before
    assert dict(vars(pipe.scheduler)).keys() == scheduler_attrs.keys()
    assert not hasattr(pipe.unet, "_tokenmerge")
    assert torch.equal(generate(pipe, guidance_scale=5.0), base)
    tm.remove(pipe)  # removing twice is a no-op


def test_apply_twice_replaces(pipe) -> None:
    tm.apply(pipe, tm.ToMA(mode="tokens", ratio=0.5))
    once = generate(pipe)
    tm.apply(pipe, tm.ToMA(mode="tokens", ratio=0.5))
    assert torch.equal(generate(pipe), once)
    tm.apply(pipe, tm.ToMA(mode="tokens", ratio=0.75))
    replaced = generate(pipe)
    tm.remove(pipe)
    tm.apply(pipe, tm.ToMA(mode="tokens", ratio=0.75))
    assert torch.equal(generate(pipe), replaced)


def test_same_seed_twice_same_image(pipe) -> None:
    """Caches reset at every generation: the second image is not planned from the first one's tokens."""
    tm.apply(pipe, tm.ToMA(mode="tokens", ratio=0.5, dest_every=100, weight_every=100))
    first = generate(pipe, seed=1)
    generate(pipe, seed=2)
    assert torch.equal(generate(pipe, seed=1), first)


@pytest.mark.parametrize("change", ["resolution", "batch"])
def test_shape_change_between_calls(pipe, change: str) -> None:
    """A call after a batch-size or resolution change equals the same call on a freshly patched model."""
    first = dict(height=32, width=48) if change == "resolution" else dict(num_images_per_prompt=1)
    second = dict(height=48, width=32) if change == "resolution" else dict(num_images_per_prompt=2)
    method = tm.ToMA(mode="tokens", ratio=0.5, dest_every=4, weight_every=4)
    tm.apply(pipe, method)
    generate(pipe, **first)
    after_change = generate(pipe, **second)
    tm.apply(pipe, method)
    assert torch.equal(after_change, generate(pipe, **second))


@pytest.mark.parametrize("size", [(32, 48), (40, 24), (24, 56)])
def test_non_square_and_ragged_grids(pipe, size: tuple[int, int], attention_lengths) -> None:
    """(40, 24) px -> 20x12 latent, 10x6 and 5x3 grids: the 4x4 tiles do not divide them."""
    base = generate(pipe, height=size[0], width=size[1])
    full = sorted(self_attention_queries(attention_lengths))
    tm.apply(pipe, tm.ToMA(mode="tokens", ratio=0.5))
    attention_lengths.clear()
    merged = generate(pipe, height=size[0], width=size[1])
    assert merged.shape == base.shape and torch.isfinite(merged).all()
    shorter = sorted(self_attention_queries(attention_lengths))
    assert len(shorter) == len(full) and all(m < f for m, f in zip(shorter, full, strict=True))


def test_merge_only_at_chosen_steps(pipe, attention_lengths) -> None:
    base = generate(pipe, steps=4)
    tm.apply(pipe, tm.ToMA(mode="tokens", ratio=0.5, steps=[]))
    assert torch.equal(generate(pipe, steps=4), base)
    tm.apply(pipe, tm.ToMA(mode="tokens", ratio=0.5, steps=[1, 3]))
    attention_lengths.clear()
    generate(pipe, steps=4)
    unet_lengths = [(q, k) for q, k in attention_lengths if not q == k == TEXT_LEN]  # drop the text encoder's
    per_call = len(unet_lengths) // 4
    calls = [self_attention_queries(unet_lengths[i * per_call : (i + 1) * per_call]) for i in range(4)]
    assert calls[0] == calls[2] and calls[1] == calls[3]
    assert sum(calls[1]) * 2 == sum(calls[0])


def test_reuse_across_blocks_and_steps(pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per generation and reuse group: destinations at steps 0, dest_every, ...; weights at every weight_every."""
    made: list[bool] = []
    original = toma_module.toma_merge

    def spy(x, grid, options, dest=None):
        if not x.is_meta:  # apply counts FLOPs on the model's weightless twin
            made.append(dest is None)
        return original(x, grid, options, dest)

    monkeypatch.setattr(toma_module, "toma_merge", spy)
    tm.apply(pipe, tm.ToMA(mode="tokens", ratio=0.5, dest_every=3, weight_every=2))
    groups = {s.group for s in pipe.unet._tokenmerge.sites}
    generate(pipe, steps=6)  # weights at steps 0, 2, 4; destinations at 0, 3 (with the weights of step 4)
    assert len(made) == 3 * len(groups)
    assert sum(made) == 2 * len(groups)


def test_merged_block_matches_explicit_math(pipe) -> None:
    """A patched block computes x + A^T f(M g(x)) for each merged sub-module f with pre-norm g, before the add."""
    unet = pipe.unet
    method = tm.ToMA(mode="tokens", ratio=0.5)
    tm.apply(unet, method)
    site = next(s for s in unet._tokenmerge.sites if "cross" in s.modules)
    captured = {}
    handle = site.block.register_forward_hook(
        lambda m, args, kwargs, out: captured.update(x=args[0], kwargs=kwargs, out=out, hw=site.grid.hw),
        with_kwargs=True,
    )
    inputs = unet_inputs(unet, 2, 16, 16)
    with torch.no_grad():
        unet(**inputs)
    handle.remove()
    tm.remove(unet)
    block, x, enc = site.block, captured["x"], captured["kwargs"]["encoder_hidden_states"]
    plan = method.plan(x, captured["hw"], method.new_cache(), method.phase(0, None))
    with torch.no_grad():
        h = x + plan.unmerge(block.attn1(plan.merge(block.norm1(x))))
        h = h + plan.unmerge(block.attn2(plan.merge(block.norm2(h)), encoder_hidden_states=enc))
        h = h + plan.unmerge(block.ff(plan.merge(block.norm3(h))))
    torch.testing.assert_close(captured["out"], h, rtol=1e-5, atol=1e-5)


def test_denoiser_module_and_manual_loop() -> None:
    """tm.apply on the UNet itself; a rising timestep starts a new generation; tm.reset forces one."""
    unet = build_unet("tiny-sd15")
    inputs = unet_inputs(unet, 2, 16, 16)
    tm.apply(unet, tm.ToMA(mode="tokens", ratio=0.5, dest_every=10, weight_every=10))
    state = unet._tokenmerge.tracker
    with torch.no_grad():
        for t, step in [(900, 0), (900, 0), (600, 1), (300, 2), (950, 0)]:
            unet(**{**inputs, "timestep": torch.tensor(t)})
            assert state.step == step
        tm.reset(unet)
        unet(**{**inputs, "timestep": torch.tensor(100)})
        assert state.step == 0


def test_half_precision() -> None:
    unet = build_unet("tiny-sdxl", dtype=torch.bfloat16)
    inputs = unet_inputs(unet, 2, 16, 24)
    tm.apply(unet, tm.ToMA(mode="tokens", ratio=0.5))
    with torch.no_grad():
        out = unet(**inputs).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_img2img_pipeline(pipe) -> None:
    cls = (
        StableDiffusionImg2ImgPipeline if "text_encoder_2" not in pipe.components else StableDiffusionXLImg2ImgPipeline
    )
    img2img = cls(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32)
    kwargs = dict(image=image, strength=0.6, num_inference_steps=5, output_type="latent")
    base = img2img("a cube", generator=torch.Generator().manual_seed(0), **kwargs).images
    tm.apply(img2img, tm.ToMA(mode="tokens", ratio=0.5))
    merged = img2img("a cube", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.isfinite(merged).all() and not torch.equal(merged, base)
    tm.remove(img2img)
    assert torch.equal(img2img("a cube", generator=torch.Generator().manual_seed(0), **kwargs).images, base)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(ratio=-0.1),
        dict(ratio=1.0),
        dict(ratio=1.5),
        dict(tile=(0, 4)),
        dict(tile=(4,)),
        dict(tau=0.0),
        dict(max_downsample=3),
        dict(max_downsample=0),
        dict(dest_every=0),
        dict(weight_every=0),
        dict(steps=[-1]),
        dict(merge_attn=False, merge_crossattn=False, merge_mlp=False),
    ],
)
def test_invalid_config_raises(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        tm.ToMA(**kwargs)


def test_invalid_targets_raise() -> None:
    with pytest.raises(ValueError, match="unsupported model"):
        tm.apply(nn.Linear(2, 2), tm.ToMA())
    with pytest.raises(ValueError, match="neither"):
        tm.apply(object(), tm.ToMA())
    with pytest.raises(TypeError, match="tokenmerge method"):
        tm.apply(build_unet("tiny-sd15"), 0.5)


def _hook_count(module: nn.Module) -> int:
    return sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._forward_hooks_with_kwargs) for m in module.modules()
    )


def test_inpaint_and_controlnet_pipelines() -> None:
    """The UNet of inpainting and ControlNet pipelines is patched the same way; the stock call works."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionInpaintPipeline

    from tokenmerge.archs import tiny_pipeline

    base = tiny_pipeline("tiny-sd15")
    image, mask = torch.rand(1, 3, 32, 32), torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 8)).eval()
    pipes = [
        (StableDiffusionInpaintPipeline(**base.components), dict(image=image, mask_image=mask)),
        (StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet), dict(image=image)),
    ]
    for p, extra in pipes:
        p.set_progress_bar_config(disable=True)
        reference = generate(p, **extra)
        tm.apply(p, tm.ToMA(mode="tokens", ratio=0.5))
        merged = generate(p, **extra)
        assert torch.isfinite(merged).all() and not torch.equal(merged, reference)
        tm.remove(p)
        assert torch.equal(generate(p, **extra), reference)


@pytest.mark.parametrize("scheduler", ["HeunDiscreteScheduler", "DDIMScheduler"])
def test_steps_follow_the_scheduler(scheduler: str) -> None:
    """Pipelines: the step of each denoiser call comes from the scheduler (Heun's repeated timesteps share a step;
    schedulers without a step_index count their step() calls), set before the call; after the run's last step the
    timestep is read again."""
    import diffusers

    pipe = tiny_pipeline("tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    tm.apply(pipe, tm.ToMA(mode="tokens", ratio=0.5))
    state = pipe.unet._tokenmerge.tracker
    seen: list[tuple[int, bool]] = []
    pipe.unet.register_forward_hook(lambda m, a, o: seen.append((state.step, state.driven)))
    generate(pipe, steps=4)
    heun = scheduler.startswith("Heun")
    assert [s for s, _ in seen] == ([0, 1, 1, 2, 2, 3, 3] if heun else [0, 1, 2, 3])
    assert all(driven for _, driven in seen) and not state.driven and state.new_generation
