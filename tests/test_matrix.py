"""Every method on every supported architecture through the stock ``pipe(...)`` call and the shared adapters."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

import tokenmerge as tm
from tokenmerge.api import view_of
from tokenmerge.archs import tiny_pipeline

from .conftest import generate

ARCHS = ["tiny-sd15", "tiny-sdxl", "tiny-flux", "tiny-sd3", "tiny-pixart"]
ALL_FLUX = {"double": (0, None), "single": (0, None)}
TEXT = 16  # T5 tokens of the tiny DiT calls


def family(pipe) -> str:
    return type(getattr(pipe, "unet", None) or pipe.transformer).__name__


def methods(pipe) -> dict[str, tuple[tm.Method, tm.Method | None]]:
    """name -> (a merging config, its identity config or None) for this pipeline's layout. SDXL has no attention at
    level 1 (``max_downsample=2`` there, as the default ``None`` resolves to for the baselines); Flux merges every
    block (its default leaves the first double-stream block of the tiny model full); SD3's joint attention takes no key
    mask, so CA-ToMe there uses the batch maximum."""
    blocks = ALL_FLUX if family(pipe) == "FluxTransformer2DModel" else None
    batch = "max" if family(pipe) == "SD3Transformer2DModel" else "sample"
    return {
        "toma": (tm.ToMA(ratio=0.5, blocks=blocks), tm.ToMA(ratio=0.0)),
        "tomesd": (tm.ToMeSD(ratio=0.5, max_downsample=2, seed=0, blocks=blocks), tm.ToMeSD(ratio=0.0)),
        "catome": (tm.CAToMe(threshold=-1.0, schedule=2, batch=batch, max_downsample=2, seed=0, blocks=blocks), None),
        "todo": (tm.ToDo(factor=2, max_downsample=2, blocks=blocks), tm.ToDo(factor=1)),
    }


@pytest.fixture(scope="module", params=ARCHS)
def shared(request: pytest.FixtureRequest) -> Iterator:
    pipe = tiny_pipeline(request.param)
    pipe.set_progress_bar_config(disable=True)
    yield pipe


@pytest.fixture
def pipe(shared) -> Iterator:
    yield shared
    tm.remove(shared)


def run(pipe, **kwargs) -> torch.Tensor:
    """``generate`` with short T5 prompts on DiTs; PixArt without resolution binning or caption cleaning."""
    if not hasattr(pipe, "unet"):
        kwargs.setdefault("max_sequence_length", TEXT)
    if family(pipe) == "PixArtTransformer2DModel":
        kwargs.update(use_resolution_binning=False, clean_caption=False)
    return generate(pipe, guidance_scale=5.0, **kwargs)


@pytest.fixture
def denoiser_attention(pipe, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """(query length, key length) of every self- or joint-attention call inside the denoiser (cross-attention to the
    prompt alone, UNets' and PixArt's, is left out: its keys are the prompt's 77 CLIP or 16 T5 tokens)."""
    seen: list[tuple[int, int]] = []
    text = {"UNet2DConditionModel": 77, "PixArtTransformer2DModel": TEXT}.get(family(pipe))
    inside = []
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    handles = [
        denoiser.register_forward_pre_hook(lambda m, a: inside.append(1)),
        denoiser.register_forward_hook(lambda m, a, o: inside.pop() and None),
    ]
    original = F.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        if inside and key.shape[-2] != text:
            seen.append((query.shape[-2], key.shape[-2]))
        return original(query, key, value, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    yield seen
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("method", [tm.ToMA(), tm.ToMeSD(), tm.CAToMe(), tm.ToDo()], ids=lambda m: type(m).__name__)
def test_every_default_runs_and_merges(pipe, method: tm.Method) -> None:
    """Each method as constructed without options, through the stock call of every family (SD3: CA-ToMe's
    ``batch="auto"`` takes the batch minimum there), merges, without a warning that it merged nothing (a cut under
    10% of the FLOPs is reported: the baselines' defaults on these tiny models)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="tokenmerge: .*(merged nothing|patches no block)")
        tm.apply(pipe, method)
        run(pipe)
    summary = tm.summary(pipe)
    assert summary.merged_calls == summary.calls > 0, summary


@pytest.mark.parametrize("name", ["toma", "tomesd", "catome", "todo"])
def test_fewer_tokens_reach_attention(pipe, name: str, denoiser_attention) -> None:
    size = dict(height=48, width=40)  # no merged length equals a prompt length
    base = run(pipe, **size)
    full = list(denoiser_attention)
    tm.apply(pipe, methods(pipe)[name][0])
    denoiser_attention.clear()
    merged = run(pipe, **size)
    assert merged.shape == base.shape and torch.isfinite(merged).all() and not torch.equal(merged, base)
    short = list(denoiser_attention)
    assert len(short) == len(full) > 0
    assert all(k <= fk for (_, k), (_, fk) in zip(short, full, strict=True))
    assert sum(k for _, k in short) < sum(k for _, k in full)
    if methods(pipe)[name][0].resolve(view_of(pipe)).keys_values:  # ToDo, ToMA's default on UNets: every query kept
        assert [q for q, _ in short] == [q for q, _ in full]
    else:
        assert sum(q for q, _ in short) < sum(q for q, _ in full)


@pytest.mark.parametrize("name", ["toma", "tomesd", "todo"])
def test_identity_config_is_bit_identical(pipe, name: str) -> None:
    base = run(pipe)
    tm.apply(pipe, methods(pipe)[name][1])
    assert not hasattr(getattr(pipe, "unet", None) or pipe.transformer, "_tokenmerge")
    assert torch.equal(run(pipe), base)


@pytest.mark.parametrize("name", ["toma", "tomesd", "catome", "todo"])
def test_remove_is_exact(pipe, name: str) -> None:
    base = run(pipe)
    tm.apply(pipe, methods(pipe)[name][0])
    assert not torch.equal(run(pipe), base)
    tm.remove(pipe)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    assert not hasattr(denoiser, "_tokenmerge") and "set_timesteps" not in vars(pipe.scheduler)
    assert torch.equal(run(pipe), base)


@pytest.mark.parametrize("name", ["toma", "tomesd", "catome", "todo"])
@pytest.mark.parametrize("change", ["resolution", "batch"])
def test_shape_change_between_calls(pipe, name: str, change: str) -> None:
    """After a batch or resolution change a call equals the same call on a freshly patched model."""
    first = dict(height=32, width=48) if change == "resolution" else dict(num_images_per_prompt=1)
    second = dict(height=48, width=32) if change == "resolution" else dict(num_images_per_prompt=2)
    method = methods(pipe)[name][0]
    tm.apply(pipe, method)
    run(pipe, **first)
    after_change = run(pipe, **second)
    assert torch.isfinite(after_change).all()
    tm.apply(pipe, method)
    assert torch.equal(after_change, run(pipe, **second))


# ---- method specifics on diffusion transformers ----------------------------------------------------------------------


def flux_inputs(model, b: int, h: int, w: int, t: int = 7) -> dict:
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return dict(
        hidden_states=torch.randn(b, h * w, model.config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(b, t, model.config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(b, model.config.pooled_projection_dim, generator=g),
        timestep=torch.full((b,), 0.5),
        img_ids=torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float(),
        txt_ids=torch.zeros(t, 3),
        guidance=torch.full((b,), 3.5),
    )


def test_todo_on_flux_matches_explicit_attention() -> None:
    """ToDo on Flux: every query (text and image, at its own rotary position) attends to all text keys and to the
    image keys/values of the top-left token of each 2x2 cell, rotated by that token's position; checked against an
    explicit joint attention built with diffusers' ``apply_rotary_emb``, for double- and single-stream blocks."""
    from diffusers.models.embeddings import apply_rotary_emb

    from tokenmerge.archs import build_dit

    model = build_dit("tiny-flux")
    b, h, w, t = 2, 5, 6, 7
    inputs = flux_inputs(model, b, h, w, t)
    kept = torch.tensor([r * w + c for r in range(0, h, 2) for c in range(0, w, 2)])
    tm.apply(model, tm.ToDo(factor=2, blocks=ALL_FLUX))
    seen = []
    for site in model._tokenmerge.sites:
        attn = site.block.attn
        seen.append(
            attn.register_forward_hook(lambda m, a, kw, out: m.__dict__.update(_seen=(kw, out)), with_kwargs=True)
        )
    with torch.no_grad():
        freqs = model.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))
        model(**inputs)
    tm.remove(model)
    for handle in seen:
        handle.remove()
    key_freqs = tuple(torch.cat([f[:t], f[t:][kept]]) for f in freqs)
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        attn = block.attn
        kwargs, out = attn.__dict__.pop("_seen")
        x, text = kwargs["hidden_states"], kwargs.get("encoder_hidden_states")

        def heads(y: torch.Tensor, attn=attn) -> torch.Tensor:
            return y.unflatten(-1, (-1, attn.head_dim))

        with torch.no_grad():
            image = x if text is not None else x[:, t:]
            if text is not None:  # double stream: text through the added projections
                q_txt, k_txt = (
                    attn.norm_added_q(heads(attn.add_q_proj(text))),
                    attn.norm_added_k(heads(attn.add_k_proj(text))),
                )
                v_txt = heads(attn.add_v_proj(text))
            else:
                q_txt, k_txt, v_txt = (
                    attn.norm_q(heads(attn.to_q(x[:, :t]))),
                    attn.norm_k(heads(attn.to_k(x[:, :t]))),
                    heads(attn.to_v(x[:, :t])),
                )
            q = torch.cat([q_txt, attn.norm_q(heads(attn.to_q(image)))], 1)
            k = torch.cat([k_txt, attn.norm_k(heads(attn.to_k(image[:, kept])))], 1)
            v = torch.cat([v_txt, heads(attn.to_v(image[:, kept]))], 1)
            q, k = apply_rotary_emb(q, freqs, sequence_dim=1), apply_rotary_emb(k, key_freqs, sequence_dim=1)
            o = F.scaled_dot_product_attention(*(y.transpose(1, 2) for y in (q, k, v))).transpose(1, 2).flatten(2)
            expected = (attn.to_out[0](o[:, t:]), attn.to_add_out(o[:, :t])) if text is not None else o
        assert kwargs["image_rotary_emb"] is None
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_catome_per_sample_on_flux_is_independent_of_batch_mates() -> None:
    """batch="sample" on Flux's joint attention: padded image rows are masked as keys (text keys untouched) and random
    destinations are drawn whatever the batch size (Flux has no guidance doubling), so each sample gives what it
    gives alone; the batch maximum couples them."""
    from tokenmerge.archs import build_dit

    model = build_dit("tiny-flux")
    inputs = flux_inputs(model, 2, 6, 8)
    inputs["hidden_states"][1] = inputs["hidden_states"][1].cumsum(0) / 8  # smoother: merges more than sample 0
    outs = {}

    def call(**kwargs) -> torch.Tensor:
        tm.reset(model)  # each call a generation of its own: the destinations are drawn from seed 0 again
        return model(**kwargs).sample

    for mode in ("sample", "max"):  # random destinations (seed 0): drawn alike at batch sizes 1 and 2 for "sample"
        tm.apply(model, tm.CAToMe(threshold=0.7, batch=mode, seed=0, blocks=ALL_FLUX))
        with torch.no_grad():
            both = call(**inputs)
            biases = [run.plan.key_bias for run in model._tokenmerge.runs]
            alone = [
                call(**{k: v[i : i + 1] if k not in ("img_ids", "txt_ids") else v for k, v in inputs.items()})
                for i in (0, 1)
            ]
        outs[mode] = (both, torch.cat(alone))
        if mode == "sample":  # the samples did merge different counts: padding masked
            assert all(bias is not None for bias in biases) and any((bias < 0).any() for bias in biases)
    torch.testing.assert_close(*outs["sample"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(*outs["max"], rtol=1e-4, atol=1e-5)


def test_todo_with_fused_projections_raises() -> None:
    """At apply when fused before; when fused after apply, before the first denoiser call."""
    pipe = tiny_pipeline("tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        tm.apply(pipe, tm.ToDo(factor=2))
    pipe.unet.unfuse_qkv_projections()
    tm.apply(pipe, tm.ToDo(factor=2))
    pipe.unet.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        run(pipe)
