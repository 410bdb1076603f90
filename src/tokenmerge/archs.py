"""Built-in denoiser architectures (real sizes, random weights) and tiny pipelines for tests and smoke runs.

Real-size configs mirror the published SD 1.5, SD 2.1, SDXL, Flux.1-dev, SD 3.5 medium / large and PixArt-Sigma
denoisers: what latency and FLOP measurements need, without weights (:data:`REAL_SIZE`: their native resolutions).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": dict(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    ),
    "sdxl": dict(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
    "sd21": dict(
        sample_size=96,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    ),
    # Tiny layouts for tests: "tiny-sd15" has attention at the full latent resolution (like SD 1.5),
    # "tiny-sdxl" has none there and a text_time embedding (like SDXL).
    "tiny-sd15": dict(
        sample_size=16,
        block_out_channels=(32, 32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ),
    "tiny-sdxl": dict(
        sample_size=16,
        block_out_channels=(32, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2, 2),
        attention_head_dim=(2, 4, 8),
        cross_attention_dim=64,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        norm_num_groups=8,
    ),
}


def build_unet(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A ``UNet2DConditionModel`` of a built-in architecture with seeded random weights, in eval mode."""
    from diffusers import UNet2DConditionModel

    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown architecture {name!r}; choose from {', '.join(UNET_CONFIGS)}")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIGS[name]).eval()
    return unet if dtype == torch.float32 else unet.to(dtype)


def unet_inputs(unet: torch.nn.Module, batch: int, height: int, width: int, seed: int = 0) -> dict[str, Any]:
    """Random keyword inputs for one UNet call on a ``height x width`` latent (text_time extras included)."""
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    dtype = unet.dtype
    text_dim = cfg.cross_attention_dim
    inputs: dict[str, Any] = dict(
        sample=torch.randn(batch, cfg.in_channels, height, width, generator=g).to(dtype),
        timestep=torch.tensor(500),
        encoder_hidden_states=torch.randn(batch, 77, text_dim, generator=g).to(dtype),
    )
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = dict(
            text_embeds=torch.randn(batch, pooled, generator=g).to(dtype),
            time_ids=torch.tensor([[height * 8, width * 8, 0, 0, height * 8, width * 8]] * batch).to(dtype),
        )
    return inputs


def _tiny_tokenizer(max_length: int = 77) -> Any:
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _tiny_text_encoder(hidden: int, projection: int | None = None, seed: int = 0) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def _tiny_vae(seed: int = 0, **kwargs: Any) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        **kwargs,
    ).eval()


def _tiny_t5_tokenizer(max_length: int = 32) -> Any:
    """A character-level T5 (unigram) tokenizer built in memory."""
    from transformers import T5TokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in letters] + [("\u2581" + c, -2.5) for c in letters]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _tiny_t5_encoder(hidden: int, seed: int = 0) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=64,
        d_model=hidden,
        d_kv=8,
        d_ff=2 * hidden,
        num_layers=2,
        num_heads=2,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


#: Diffusion-transformer configs (random weights): the real-size Flux.1-dev, SD 3.5 medium / large and PixArt-Sigma,
#: and tiny ones for tests: Flux (packed 2x2 latents, rotary), SD3.5-like (block 0 has the extra self-attention
#: ``attn2``, RMS qk-norm) and PixArt-alpha (``ada_norm_single``, learned sigma).
DIT_CONFIGS: dict[str, dict[str, Any]] = {
    # Real-size Flux.1-dev (12B parameters, random weights): for GPU latency runs.
    "flux-dev": dict(
        patch_size=1,
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
    # Real-size SD 3.5 medium (MMDiT-X: dual attention in blocks 0-12) and large, PixArt-Sigma at 1024px.
    "sd35-medium": dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    ),
    "sd35-large": dict(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=38,
        attention_head_dim=64,
        num_attention_heads=38,
        joint_attention_dim=4096,
        caption_projection_dim=2432,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
        qk_norm="rms_norm",
    ),
    "pixart-sigma": dict(
        sample_size=128,
        num_layers=28,
        attention_head_dim=72,
        num_attention_heads=16,
        in_channels=4,
        out_channels=8,
        patch_size=2,
        cross_attention_dim=1152,
        caption_channels=4096,
        norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
        use_additional_conditions=False,
        interpolation_scale=2,
    ),
    "tiny-flux": dict(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
    "tiny-sd3": dict(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=32,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ),
    "tiny-pixart": dict(
        sample_size=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=32,
        norm_type="ada_norm_single",
        num_embeds_ada_norm=1000,
    ),
}


#: The real-size architectures: name -> native image side in pixels (each generates square images of that size).
REAL_SIZE: dict[str, int] = {
    "sd15": 512,
    "sd21": 768,
    "sdxl": 1024,
    "flux-dev": 1024,
    "sd35-medium": 1024,
    "sd35-large": 1024,
    "pixart-sigma": 1024,
}


def build_dit(name: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A Flux, SD3 or PixArt transformer of a built-in config (``overrides`` change it) with seeded random
    weights, in eval mode. The family is the name's first word after an optional ``tiny-``."""
    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

    classes = {"flux": FluxTransformer2DModel, "sd3": SD3Transformer2DModel, "pixart": PixArtTransformer2DModel}
    if name not in DIT_CONFIGS:
        raise ValueError(f"unknown architecture {name!r}; choose from {', '.join(DIT_CONFIGS)}")
    torch.manual_seed(seed)
    family = name.removeprefix("tiny-").split("-")[0]
    model = classes["sd3" if family.startswith("sd3") else family](**{**DIT_CONFIGS[name], **overrides}).eval()
    return model if dtype == torch.float32 else model.to(dtype)


def tiny_pipeline(name: str) -> Any:
    """A complete tiny pipeline (random weights, in-memory tokenizers, VAE scale factor 2) of ``tiny-sd15``,
    ``tiny-sdxl``, ``tiny-flux``, ``tiny-sd3`` or ``tiny-pixart`` layout; runs the stock ``pipe(prompt, ...)`` in well
    under a second on a CPU. Every module is in eval mode (T5 dropout would break determinism)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if not name.startswith("tiny-") or name not in UNET_CONFIGS | DIT_CONFIGS:
        tiny = [n for n in (*UNET_CONFIGS, *DIT_CONFIGS) if n.startswith("tiny-")]
        raise ValueError(f"no tiny pipeline {name!r}; choose from {', '.join(tiny)}")
    if name in DIT_CONFIGS:
        return _tiny_dit_pipeline(name)

    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
    )
    unet = build_unet(name)
    if name == "tiny-sd15":
        return StableDiffusionPipeline(
            vae=_tiny_vae(),
            text_encoder=_tiny_text_encoder(32),
            tokenizer=_tiny_tokenizer(),
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(  # tiny-sdxl
        vae=_tiny_vae(),
        text_encoder=_tiny_text_encoder(32),
        text_encoder_2=_tiny_text_encoder(32, projection=32, seed=1),
        tokenizer=_tiny_tokenizer(),
        tokenizer_2=_tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )


@functools.cache
def _tiny_pixart_class() -> type:
    """``PixArtAlphaPipeline`` with resolution binning and caption cleaning off by default: the stock call bins sizes
    only for the sample sizes of the released models (32, 64, 128), raising "Invalid sample size" on the tiny one,
    and cleaning needs packages (bs4, ftfy) the tiny captions do not."""
    from diffusers import PixArtAlphaPipeline

    class TinyPixArtAlphaPipeline(PixArtAlphaPipeline):
        def __call__(
            self, *args: Any, use_resolution_binning: bool = False, clean_caption: bool = False, **kwargs: Any
        ) -> Any:
            kwargs.update(use_resolution_binning=use_resolution_binning, clean_caption=clean_caption)
            return super().__call__(*args, **kwargs)

    return TinyPixArtAlphaPipeline


def _tiny_dit_pipeline(name: str) -> Any:
    from diffusers import (
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        StableDiffusion3Pipeline,
    )

    transformer = build_dit(name)
    if name == "tiny-flux":
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=_tiny_vae(shift_factor=0.0),  # Flux and SD3 decode (z / scale) + shift
            text_encoder=_tiny_text_encoder(32),
            tokenizer=_tiny_tokenizer(),
            text_encoder_2=_tiny_t5_encoder(32),
            tokenizer_2=_tiny_t5_tokenizer(),
            transformer=transformer,
        )
    if name == "tiny-sd3":
        return StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=_tiny_vae(shift_factor=0.0),
            text_encoder=_tiny_text_encoder(32, projection=32),
            tokenizer=_tiny_tokenizer(),
            text_encoder_2=_tiny_text_encoder(32, projection=32, seed=1),
            tokenizer_2=_tiny_tokenizer(),
            text_encoder_3=_tiny_t5_encoder(64),
            tokenizer_3=_tiny_t5_tokenizer(),
        )
    return _tiny_pixart_class()(
        tokenizer=_tiny_t5_tokenizer(),
        text_encoder=_tiny_t5_encoder(32),
        vae=_tiny_vae(),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
