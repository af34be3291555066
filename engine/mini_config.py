"""Sizes of the embedded "mini" model: the same engine classes as the official Shap-E at small sizes.

Budget: all shipped weights together <= 25 MB (fp16 safetensors); text -> mesh at grid 64 in about a second on a
2-core CPU. The latent is 128 tokens x 32 channels (NeRSTF hidden width 32 -> 4 meta layers x 32 rows).
"""

from __future__ import annotations

from .config import (
    ClipConfig, DecoderConfig, EncoderConfig, ModelBundleConfig, NeRSTFConfig, ParamsProjConfig, PriorConfig,
    SamplerConfig,
)

MINI_CLIP = ClipConfig(
    arch="custom", pretrained="", embed_dim=64, image_size=64, vision_patch_size=8,  # 8x8 = 64 grid tokens
    vision_width=128, vision_layers=4, text_width=64, text_layers=4, text_heads=2, context_length=77,
    quick_gelu=True,
    alpha_background=(1.0, 1.0, 1.0),  # its training renders all have a plain white or light grey background
)

MINI_DECODER = DecoderConfig(
    nerstf=NeRSTFConfig(d_hidden=32),
    params_proj=ParamsProjConfig(d_latent=32),
    grid_size=64,
)

MINI_ENCODER = EncoderConfig(
    width=128, layers=3, heads=4, data_ctx=128, latent_ctx=MINI_DECODER.latent_ctx, d_latent=32,
    n_points=2048, n_views=4, pointconv_hidden=(128, 128), image_size=64,
)

_PRIOR = dict(width=192, layers=4, heads=3, latent_ctx=MINI_DECODER.latent_ctx, d_latent=MINI_DECODER.d_latent)

MINI_TEXT_PRIOR = PriorConfig(cond="text", clip_dim=MINI_CLIP.embed_dim, **_PRIOR)
MINI_IMAGE_PRIOR = PriorConfig(cond="image", clip_dim=MINI_CLIP.vision_width,
                               clip_grid_tokens=MINI_CLIP.grid_tokens, **_PRIOR)


# Measured on held-out and trained kinds (docs/MINI-MODEL.md): once the priors fit their data, guidance only pushes
# samples off it. Text at 1 (no guidance: no unconditional branch) beats 1.25, 1.5, 2 and 3; image at 1.25 beats
# 1, 1.5 and 1.75 on held-out shape and R-precision (6 seeds, one view per prompt).
MINI_GUIDANCE = {"text": 1.0, "image": 1.25}


def mini_bundle(mode: str) -> ModelBundleConfig:
    """The mini model for ``mode`` 'text' or 'image' (one CLIP, one decoder, one prior per mode)."""
    prior = MINI_TEXT_PRIOR if mode == "text" else MINI_IMAGE_PRIOR
    return ModelBundleConfig(
        name=f"mini-{mode}", clip=MINI_CLIP, prior=prior, decoder=MINI_DECODER, encoder=MINI_ENCODER,
        sampler=SamplerConfig(steps=16, guidance_scale=MINI_GUIDANCE[mode]),
    )
