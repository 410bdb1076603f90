"""ToMA on diffusion transformers (tiny Flux, SD3.5-like and PixArt pipelines) through the stock ``pipe(...)`` call."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers import transformer_flux
from torch import nn

import tokenmerge as tm
from tokenmerge.adapters.flux import grid_from_ids
from tokenmerge.archs import build_dit, build_unet, tiny_pipeline
from tokenmerge.harness.models import denoiser_inputs
from tokenmerge.methods import toma as toma_module

from .conftest import generate

TEXT = 16  # T5 tokens (max_sequence_length) in every tiny DiT call
CLIP = 77
ALL_FLUX = {"double": (0, None), "single": (0, None)}


def make_pipe(name: str):
    pipe = tiny_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=["tiny-flux", "tiny-sd3", "tiny-pixart"])
def dit(request: pytest.FixtureRequest):
    """One tiny pipeline per family (shared by the module's tests: every test removes its patch)."""
    pipe = make_pipe(request.param)
    yield pipe
    tm.remove(pipe)


@pytest.fixture
def pipe(dit):
    yield dit
    tm.remove(dit)


def family(pipe) -> str:
    return type(pipe.transformer).__name__.removesuffix("Transformer2DModel").lower()


def run(pipe, **kwargs) -> torch.Tensor:
    """``generate`` with short T5 prompts; PixArt without resolution binning (tiny sample size) or caption cleaning."""
    kwargs.setdefault("max_sequence_length", TEXT)
    kwargs.setdefault("steps", 2)
    if family(pipe) == "pixart":
        kwargs.update(use_resolution_binning=False, clean_caption=False)
    return generate(pipe, **kwargs)


def toma(pipe, **kwargs) -> tm.ToMA:
    """ToMA in tokens mode on every block (Flux's default leaves the first double-stream block of the tiny model
    full; on attention-heavy tiny models the default mode can resolve to keys/values)."""
    return tm.ToMA(blocks=ALL_FLUX if family(pipe) == "flux" else None, **{"mode": "tokens", **kwargs})


def denoiser_lengths(lengths: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(query, key) lengths of attention calls, the text encoders' self-attention dropped."""
    return [(q, k) for q, k in lengths if not q == k in (CLIP, TEXT)]


def expected_lengths(pipe, n: int) -> set[tuple[int, int]]:
    """Attention (query, key) lengths with ``n`` image tokens: joint attention over [all text, image] (Flux, SD3),
    SD3.5's image-only self-attention, PixArt's self- and cross-attention (text keys)."""
    return {
        "flux": {(TEXT + n, TEXT + n)},
        "sd3": {(CLIP + TEXT + n, CLIP + TEXT + n), (n, n)},
        "pixart": {(n, n), (n, TEXT)},
    }[family(pipe)]


def test_ratio_zero_is_bit_identical(pipe) -> None:
    base = run(pipe)
    tm.apply(pipe, toma(pipe, ratio=0.0))
    assert torch.equal(run(pipe), base)


def test_remove_restores_exactly(pipe) -> None:
    base = run(pipe, guidance_scale=5.0)
    hooks = _hook_count(pipe.transformer)
    tm.apply(pipe, toma(pipe, ratio=0.5))
    assert _hook_count(pipe.transformer) > hooks
    assert not torch.equal(run(pipe, guidance_scale=5.0), base)
    tm.remove(pipe)
    assert _hook_count(pipe.transformer) == hooks and not hasattr(pipe.transformer, "_tokenmerge")
    assert torch.equal(run(pipe, guidance_scale=5.0), base)


@pytest.mark.parametrize("size", [(32, 48), (40, 24)])
def test_attention_runs_on_fewer_tokens(pipe, size: tuple[int, int], attention_lengths) -> None:
    """32x48 px -> 8x12 token grid (all families: packed 2x2 or patch 2 on a 2x-downsampled latent); 40x24 px ->
    10x6, which the 4x4 tiles do not divide. Joint attention keeps every text token as a key."""
    h, w = size[0] // 4, size[1] // 4
    base = run(pipe, height=size[0], width=size[1])
    full = denoiser_lengths(attention_lengths)
    assert full and set(full) == expected_lengths(pipe, h * w)
    tm.apply(pipe, toma(pipe, ratio=0.5))
    attention_lengths.clear()
    merged = run(pipe, height=size[0], width=size[1])
    assert merged.shape == base.shape and torch.isfinite(merged).all() and not torch.equal(merged, base)
    shorter = denoiser_lengths(attention_lengths)
    assert len(shorter) == len(full) and set(shorter) == expected_lengths(pipe, h * w // 2), set(shorter)


@pytest.mark.parametrize("change", ["resolution", "batch"])
def test_shape_change_between_calls(pipe, change: str) -> None:
    """A call after a batch-size or resolution change equals the same call on a freshly patched model."""
    first = dict(height=32, width=48) if change == "resolution" else dict(num_images_per_prompt=1)
    second = dict(height=48, width=32) if change == "resolution" else dict(num_images_per_prompt=2)
    method = toma(pipe, ratio=0.5, dest_every=4, weight_every=4)
    tm.apply(pipe, method)
    run(pipe, **first)
    after_change = run(pipe, **second)
    tm.apply(pipe, method)
    assert torch.equal(after_change, run(pipe, **second))


def test_guidance_on_and_off(pipe) -> None:
    """CFG in one batch (SD3, PixArt) or as separate passes at one timestep (Flux true CFG); Flux's guidance
    embedding is always on."""
    on = dict(guidance_scale=5.0)
    if family(pipe) == "flux":
        on = dict(true_cfg_scale=4.0, negative_prompt="blur")
    for kwargs in (dict(guidance_scale=1.0), on):
        base = run(pipe, **kwargs)
        tm.apply(pipe, toma(pipe, ratio=0.5))
        merged = run(pipe, **kwargs)
        tm.remove(pipe)
        assert merged.shape == base.shape and torch.isfinite(merged).all() and not torch.equal(merged, base)


def test_reuse_grouped_per_stream(pipe, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per generation and stream (Flux: double, single; SD3: joint; PixArt: blocks): destinations at steps 0 and
    dest_every, weights every weight_every steps, shared by the stream's blocks."""
    made: list[bool] = []
    original = toma_module.toma_merge

    def spy(x, grid, options, dest=None):
        if not x.is_meta:  # apply counts FLOPs on the model's weightless twin
            made.append(dest is None)
        return original(x, grid, options, dest)

    monkeypatch.setattr(toma_module, "toma_merge", spy)
    tm.apply(pipe, toma(pipe, ratio=0.5, dest_every=3, weight_every=2))
    groups = {s.group for s in pipe.transformer._tokenmerge.sites}
    assert groups == {"flux": {"double", "single"}, "sd3": {"joint"}, "pixart": {"blocks"}}[family(pipe)]
    run(pipe, steps=6)
    assert len(made) == 3 * len(groups) and sum(made) == 2 * len(groups)


def test_sd3_merges_both_self_attentions(attention_lengths) -> None:
    pipe = make_pipe("tiny-sd3")
    tm.apply(pipe, tm.ToMA(ratio=0.5, merge_mlp=False))
    run(pipe, steps=3)  # 32x32 px: 8x8 grid; block 0 has the extra image-only self-attention attn2
    joint = [q for q, k in attention_lengths if q == k == CLIP + TEXT + 32]
    self_only = [q for q, k in attention_lengths if q == k == 32]
    assert len(joint) == 2 * 3 and len(self_only) == 3


def test_flux_attention_goes_through_dispatch_with_text_and_merged_image(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = make_pipe("tiny-flux")
    seen: list[tuple[int, int]] = []
    original = transformer_flux.dispatch_attention_fn

    def spy(query, key, value, *args, **kwargs):
        if not query.is_meta:  # apply counts FLOPs on the model's weightless twin
            seen.append((query.shape[1], key.shape[1]))  # (B, S, heads, D)
        return original(query, key, value, *args, **kwargs)

    monkeypatch.setattr(transformer_flux, "dispatch_attention_fn", spy)
    tm.apply(pipe, tm.ToMA(ratio=0.75, blocks={"double": [(1, 2)], "single": range(0, 1)}))
    run(pipe, height=32, width=48, steps=2)  # 96 image tokens -> 24
    assert seen == [(TEXT + 96, TEXT + 96), (TEXT + 24, TEXT + 24), (TEXT + 24, TEXT + 24), (TEXT + 96, TEXT + 96)] * 2


@pytest.mark.parametrize(
    ("method", "attention", "mlp"),
    [
        (tm.ToMA(ratio=0.75, blocks={"double": [], "single": (0, 1)}), True, True),  # one span: norm -> proj_out
        (
            tm.ToMA(ratio=0.75, merge_mlp=False, blocks={"double": [], "single": (0, 1)}),
            True,
            False,
        ),  # the attention alone
        (
            tm.ToMeSD(0.75, seed=0, blocks={"double": [], "single": (0, 1)}),
            True,
            False,
        ),  # tomesd's default: attention only
        (tm.ToMeSD(0.75, seed=0, merge_mlp=True, blocks={"double": [], "single": (0, 1)}), True, True),
        (
            tm.ToMeSD(0.75, seed=0, merge_attn=False, merge_mlp=True, blocks={"double": [], "single": (0, 1)}),
            False,
            True,
        ),
    ],
    ids=lambda v: v.describe() if isinstance(v, tm.Method) else str(v),
)
def test_flux_single_stream_blocks_honour_merge_attn_and_merge_mlp(
    method: tm.Method, attention: bool, mlp: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Single-stream attention and MLP run in parallel: each runs merged exactly when its flag says so (the other
    branch on every token), and the summary labels the block with what ran merged."""
    model = build_dit("tiny-flux")
    seen: dict[str, list[int]] = {"attn": [], "mlp": []}
    block = model.single_transformer_blocks[0]
    block.proj_mlp.register_forward_pre_hook(lambda m, a: seen["mlp"].append(a[0].shape[1]))
    original = transformer_flux.dispatch_attention_fn

    def spy(query, key, value, *args, **kwargs):
        if not query.is_meta:  # apply counts FLOPs on the model's weightless twin
            seen["attn"].append(key.shape[1])
        return original(query, key, value, *args, **kwargs)

    monkeypatch.setattr(transformer_flux, "dispatch_attention_fn", spy)
    inputs = denoiser_inputs(model, 2, 8, 8, text=4)
    with torch.no_grad():
        full = model(**inputs).sample
        tm.apply(model, method)
        merged = model(**inputs).sample
    n = 4 + 64  # text + image tokens
    assert seen["mlp"] == [n, n - 48 if mlp else n]
    single = seen["attn"][2::4]  # per call: double blocks 0 and 1, single blocks 0 and 1
    assert single == [n, n - 48 if attention else n]
    roles = ("attn",) * attention + ("mlp",) * mlp
    labels = {b.name: b.roles for b in tm.summary(model).blocks}
    assert labels["single_transformer_blocks.0"] == roles and not torch.equal(merged, full)


def test_flux_single_stream_attention_alone_matches_explicit_math() -> None:
    """``merge_mlp=False``: x + gate * proj_out([A^T attn(M norm(x)), mlp(norm(x))]) on a single-stream block (the
    attention on [text, merged image] at the destinations' rotary positions, the MLP on every token)."""
    model = build_dit("tiny-flux")
    b, t = 2, 4
    inputs = denoiser_inputs(model, b, 6, 10, text=t)
    freqs = model.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))
    tm.apply(model, tm.ToMA(ratio=0.5, merge_mlp=False, blocks={"double": [], "single": (1, 2)}))
    block, run = model.single_transformer_blocks[1], model._tokenmerge.runs[0]
    seen: dict = {}
    block.register_forward_pre_hook(lambda m, a, kw: seen.update(kw=dict(kw)), with_kwargs=True)
    block.register_forward_hook(lambda m, a, kw, out: seen.update(out=out, plan=run.plan), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
        kw, plan = seen["kw"], seen["plan"]
        joint = torch.cat([kw["encoder_hidden_states"], kw["hidden_states"]], 1)
        normed, gate = block.norm(joint, emb=kw["temb"])
        merged = torch.cat([normed[:, :t], plan.merge(normed[:, t:])], 1)
        tables = [tuple(torch.cat([f[:t], f[t:][plan.dest[i]]]) for f in freqs) for i in range(b)]
        attn = torch.cat([block.attn(merged[i : i + 1], image_rotary_emb=tables[i]) for i in range(b)])
        attn = torch.cat([attn[:, :t], plan.unmerge(attn[:, t:])], 1)
        expected = joint + gate.unsqueeze(1) * block.proj_out(
            torch.cat([attn, block.act_mlp(block.proj_mlp(normed))], 2)
        )
    torch.testing.assert_close(torch.cat(seen["out"], 1), expected, rtol=1e-5, atol=1e-5)


def test_dit_descriptions_leave_out_max_downsample() -> None:
    """Every block of a diffusion transformer is at the latent's resolution: ``max_downsample`` means nothing there."""
    model = build_dit("tiny-flux")
    tm.apply(model, tm.ToMA(mode="kv"))
    assert tm.summary(model).method == "ToMA(mode='kv')"
    assert tm.ToMA(mode="kv").describe() == "ToMA(mode='kv', max_downsample=None)"  # without a model: every option


def test_flux_blocks_match_per_sample_rotary_reference() -> None:
    """Each merged token gets its destination's rotary position, per sample; the text stream sees every text token.

    The patched model's joint attentions (double: image merged, text full; single: [text, merged image]) are checked
    against diffusers' own attention called one sample at a time with rotary tables gathered at that sample's
    destinations; a single-stream block's whole output against the explicit math."""
    model = build_dit("tiny-flux")
    b, h, w, t = 3, 6, 10, 7
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    txt_ids = torch.zeros(t, 3)
    inputs = dict(
        hidden_states=torch.randn(b, h * w, 16, generator=g),
        encoder_hidden_states=torch.randn(b, t, 32, generator=g),
        pooled_projections=torch.randn(b, 32, generator=g),
        timestep=torch.full((b,), 0.5),
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=torch.full((b,), 3.5),
    )
    tm.apply(model, tm.ToMA(ratio=0.5, mode="tokens", blocks=ALL_FLUX))
    state = model._tokenmerge
    seen: dict[str, dict] = {}
    spies = []
    for site in state.sites:
        for module, what in ((site.block, "block"), (site.block.attn, "attn")):

            def pre(m, args, kwargs, name=site.name, what=what):
                seen.setdefault(name, {})[what] = dict(kwargs)

            def post(m, args, kwargs, out, name=site.name, what=what, site=site):
                plan = next(run.plan for run in state.runs if run.site is site)
                seen[name].update({what + "_out": out, "plan": plan, "module": site.block.attn})

            spies.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            spies.append(module.register_forward_hook(post, with_kwargs=True))
    with torch.no_grad():
        freqs = model.pos_embed(torch.cat([txt_ids, img_ids]))
        model(**inputs)
    tm.remove(model)
    for spy in spies:
        spy.remove()

    plan = seen["transformer_blocks.0"]["plan"]
    assert plan.dest.shape == (b, h * w // 2) and not all(torch.equal(plan.dest[0], d) for d in plan.dest[1:])
    for name, rec in seen.items():
        plan, kwargs = rec["plan"], rec["attn"]
        assert plan is seen["transformer_blocks.0" if name.startswith("t") else "single_transformer_blocks.0"]["plan"]
        assert kwargs["image_rotary_emb"] is None  # the processor gets none; the q/k norm hooks rotate per sample
        ref = []
        for i in range(b):
            one = {k: v[i : i + 1] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            one["image_rotary_emb"] = tuple(torch.cat([f[:t], f[t:][plan.dest[i]]]) for f in freqs)
            with torch.no_grad():
                ref.append(rec["module"](**one))
        out = rec["attn_out"]
        if name.startswith("transformer_blocks"):
            assert kwargs["encoder_hidden_states"].shape[1] == t  # text never merged
            torch.testing.assert_close(out[0], plan.unmerge(torch.cat([r[0] for r in ref])))
            torch.testing.assert_close(out[1], torch.cat([r[1] for r in ref]))
        else:
            assert kwargs["hidden_states"].shape[1] == t + h * w // 2
            torch.testing.assert_close(out, torch.cat(ref))

    # a single-stream block, whole: x + gate * A^T proj_out([attn, mlp](M norm(x))) on the image part
    rec = seen["single_transformer_blocks.1"]
    block, kw, plan = model.single_transformer_blocks[1], rec["block"], rec["plan"]
    joint = torch.cat([kw["encoder_hidden_states"], kw["hidden_states"]], 1)
    with torch.no_grad():
        normed, gate = block.norm(joint, emb=kw["temb"])
        merged = torch.cat([normed[:, :t], plan.merge(normed[:, t:])], 1)
        tables = [tuple(torch.cat([f[:t], f[t:][plan.dest[i]]]) for f in freqs) for i in range(b)]
        attn = torch.cat([block.attn(merged[i : i + 1], image_rotary_emb=tables[i]) for i in range(b)])
        proj = block.proj_out(torch.cat([attn, block.act_mlp(block.proj_mlp(merged))], 2))
        expected = joint + gate.unsqueeze(1) * torch.cat([proj[:, :t], plan.unmerge(proj[:, t:])], 1)
    torch.testing.assert_close(torch.cat(rec["block_out"], 1), expected, rtol=1e-5, atol=1e-5)


def test_flux_grid_from_ids() -> None:
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(3), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows + 2, cols], -1).reshape(-1, 3).float()
    assert grid_from_ids(ids, 15) == (5, 3)
    assert grid_from_ids(ids[None], 15) == (5, 3)
    assert grid_from_ids(ids, 16) is None
    assert grid_from_ids(ids.flip(0), 15) is None  # not row-major
    assert grid_from_ids(torch.cat([ids, ids]), 30) is None  # e.g. Kontext's extra reference-image tokens


def test_flux_unknown_token_layout_runs_unmerged() -> None:
    """Image tokens that are not one row-major grid (here: a reference image's tokens appended) are left alone."""
    model = build_dit("tiny-flux")
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    ids = torch.cat([ids, ids + torch.tensor([1.0, 0, 0])])
    inputs = dict(
        hidden_states=torch.randn(1, 32, 16),
        encoder_hidden_states=torch.randn(1, 5, 32),
        pooled_projections=torch.randn(1, 32),
        timestep=torch.tensor([0.5]),
        img_ids=ids,
        txt_ids=torch.zeros(5, 3),
        guidance=torch.tensor([3.5]),
    )
    with torch.no_grad():
        base = model(**inputs).sample
        tm.apply(model, tm.ToMA(ratio=0.5, blocks=ALL_FLUX))
        assert torch.equal(model(**inputs).sample, base)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_half_precision(name: str) -> None:
    model = build_dit(name, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    if name == "tiny-flux":
        rows, cols = torch.meshgrid(torch.arange(6), torch.arange(10), indexing="ij")
        inputs = dict(
            hidden_states=torch.randn(2, 60, 16, generator=g),
            encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
            pooled_projections=torch.randn(2, 32, generator=g),
            timestep=torch.tensor([0.5, 0.5]),
            img_ids=torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float(),
            txt_ids=torch.zeros(5, 3),
            guidance=torch.tensor([3.5, 3.5]),
        )
        method = tm.ToMA(ratio=0.5, blocks=ALL_FLUX)
    else:
        inputs = dict(
            hidden_states=torch.randn(2, 4, 12, 20, generator=g),
            encoder_hidden_states=torch.randn(2, 5, 64, generator=g),
            pooled_projections=torch.randn(2, 64, generator=g),
            timestep=torch.tensor([500, 500]),
        )
        method = tm.ToMA(ratio=0.5)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() and k != "img_ids" else v for k, v in inputs.items()}
    tm.apply(model, method)
    with torch.no_grad():
        out = model(**inputs).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_flux_blocks_override_one_kind_and_keep_the_default_of_the_other() -> None:
    """7 + 8 blocks: the default leaves round(5 * 7 / 19) = 2 double and round(5 * 8 / 38) = 1 single block full."""
    model = build_dit("tiny-flux", num_layers=7, num_single_layers=8)
    tm.apply(model, tm.ToMA(ratio=0.5))
    names = [s.name for s in model._tokenmerge.sites]
    assert names == [f"transformer_blocks.{i}" for i in range(2, 7)] + [
        f"single_transformer_blocks.{i}" for i in range(1, 8)
    ]
    tm.apply(model, tm.ToMA(ratio=0.5, blocks={"single": [(0, 1), range(6, 8)]}))
    names = [s.name for s in model._tokenmerge.sites]
    assert names == [f"transformer_blocks.{i}" for i in range(2, 7)] + [
        f"single_transformer_blocks.{i}" for i in (0, 6, 7)
    ]


@pytest.mark.parametrize(
    "blocks",
    [
        {"double": (0, 3)},  # the tiny model has 2 double blocks
        {"single": (2, None)},
        {"triple": (0, 1)},
        {"double": (1, 1)},
        {"double": (-1, 1)},
        {"double": range(0, 2, 2)},
        {"double": 3},
        {"double": [(0, 1, 2)]},
        [(0, 1)],
    ],
)
def test_invalid_block_ranges_raise(blocks) -> None:
    with pytest.raises((TypeError, ValueError)):
        tm.apply(build_dit("tiny-flux"), tm.ToMA(blocks=blocks))


def test_blocks_on_unet_raise() -> None:
    with pytest.raises(ValueError, match="block kinds"):
        tm.apply(build_unet("tiny-sd15"), tm.ToMA(blocks={"double": (0, 1)}))


def _hook_count(module: nn.Module) -> int:
    return sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._forward_hooks_with_kwargs) for m in module.modules()
    )


def test_flux_dev_architecture_is_real_size() -> None:
    """The built-in ``flux-dev`` config has Flux.1-dev's 11.9B parameters (built on the meta device: no memory)."""
    from diffusers import FluxTransformer2DModel

    from tokenmerge.archs import DIT_CONFIGS, tiny_pipeline

    with torch.device("meta"):
        model = FluxTransformer2DModel(**DIT_CONFIGS["flux-dev"])
    assert 11.8e9 < sum(p.numel() for p in model.parameters()) < 12.0e9
    assert len(model.transformer_blocks) == 19 and len(model.single_transformer_blocks) == 38
    with pytest.raises(ValueError, match="no tiny pipeline"):
        tiny_pipeline("flux-dev")
