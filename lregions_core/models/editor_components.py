"""Editor pipelines' components built in code with random weights (no download).

Two sizes, chosen by ``Config.editor_kwargs["architecture"]``:

* ``"tiny"``: a few thousand to a few million parameters, like diffusers' fast tests'
  ``get_dummy_components()``; for offline tests and the smoke run. The tiny autoencoders keep
  the real ones' downsampling (SD /8; aMUSEd /8 plus the transformer's /2), so working sizes
  that are multiples of 16 work for both.
* ``"full"``: the published architectures (Stable Diffusion 2 inpainting; aMUSEd 512) with random
  weights: the honest way to measure speed and memory where the weights cannot be had.

Heavy libraries are imported inside the builders. Weights are initialised under a fixed seed
(without touching the global RNG) so every process builds the same random model.
"""

from __future__ import annotations

from typing import Any

from lregions_core.models.runtime import seeded

ARCHITECTURES = ("tiny", "full")

# Stable Diffusion 2 inpainting (stabilityai/stable-diffusion-2-inpainting, */config.json).
SD2_UNET = {
    "sample_size": 64,
    "in_channels": 9,  # 4 noisy latents + 1 mask + 4 masked-image latents
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "attention_head_dim": (5, 10, 20, 20),
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
SD2_VAE = {
    "sample_size": 512,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
}
# OpenCLIP ViT-H/14's text tower, as SD 2 ships it (CLIPTextModel, 23 of its 24 layers).
SD2_TEXT = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
    "hidden_act": "gelu",
}
# PNDM with SD 2's settings (scheduler/scheduler_config.json).
SD_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}

# aMUSEd 512 (amused/amused-512): UVit2DModel's defaults are that model's transformer, with the
# down/up-sampling it was trained with; the VQ-GAN and text encoder follow diffusers'
# scripts/convert_amused.py (VQ-GAN /16, 8192 codes; CLIP ViT-L/14 text tower with projection).
AMUSED512_TRANSFORMER = {"downsample": True, "upsample": True, "sample_size": 32}
AMUSED512_VQ = {
    "block_out_channels": (128, 256, 256, 512, 768),
    "down_block_types": ("DownEncoderBlock2D",) * 5,
    "up_block_types": ("UpDecoderBlock2D",) * 5,
    "latent_channels": 64,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "num_vq_embeddings": 8192,
    "sample_size": 32,
    "mid_block_add_attention": False,
    "lookup_from_codebook": True,
}
AMUSED512_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "hidden_act": "gelu",
}
AMUSED512_MASK_TOKEN = 8255  # vocab_size 8256 = 8192 codes + mask token, rounded up


def _text_config(**settings: Any):
    """A CLIP text config whose vocabulary and special ids match the offline tokenizer."""
    from transformers import CLIPTextConfig

    # eos_token_id must be the tokenizer's <|endoftext|> (49407) so pooling picks the right token.
    base = {
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
        "layer_norm_eps": 1e-5,
    }
    return CLIPTextConfig(**{**base, **settings})


def _check(architecture: str) -> None:
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"editor architecture must be one of {ARCHITECTURES}, got {architecture!r}"
        )


def sd_inpaint_components(architecture: str) -> dict[str, Any]:
    """UNet (9 input channels), VAE, text encoder, tokenizer and scheduler, random weights."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from lregions_core.models.tokenizer import clip_tokenizer_offline

    _check(architecture)
    with seeded():
        if architecture == "full":
            unet = UNet2DConditionModel(**SD2_UNET)
            vae = AutoencoderKL(**SD2_VAE)
            text_encoder = CLIPTextModel(_text_config(**SD2_TEXT))
        else:
            unet = UNet2DConditionModel(
                sample_size=8,
                in_channels=9,
                out_channels=4,
                layers_per_block=1,
                block_out_channels=(32, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=32,
            )
            vae = AutoencoderKL(
                sample_size=64,
                latent_channels=4,
                layers_per_block=1,
                block_out_channels=(8, 8, 16, 16),  # four levels: /8 like the real VAE
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                norm_num_groups=8,
            )
            text_encoder = CLIPTextModel(
                _text_config(
                    hidden_size=32,
                    intermediate_size=37,
                    num_attention_heads=4,
                    num_hidden_layers=2,
                    projection_dim=32,
                )
            )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": clip_tokenizer_offline(77),
        "scheduler": PNDMScheduler(**SD_SCHEDULER),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    }


def amused_components(architecture: str) -> dict[str, Any]:
    """UVit2D transformer, VQ-GAN, text encoder (with projection), tokenizer and scheduler."""
    from diffusers import AmusedScheduler, UVit2DModel, VQModel
    from transformers import CLIPTextModelWithProjection

    from lregions_core.models.tokenizer import clip_tokenizer_offline

    _check(architecture)
    with seeded():
        if architecture == "full":
            transformer = UVit2DModel(**AMUSED512_TRANSFORMER)
            vqvae = VQModel(**AMUSED512_VQ)
            text_encoder = CLIPTextModelWithProjection(_text_config(**AMUSED512_TEXT))
            mask_token_id = AMUSED512_MASK_TOKEN
        else:
            codebook, mask_token_id = 32, 39
            transformer = UVit2DModel(
                hidden_size=32,
                use_bias=False,
                cond_embed_dim=32,  # the text encoder's projection_dim (pooled embedding)
                micro_cond_encode_dim=2,
                micro_cond_embed_dim=10,  # 5 micro-conditions x micro_cond_encode_dim
                encoder_hidden_size=32,  # the text encoder's hidden size
                vocab_size=mask_token_id + 1,
                codebook_size=codebook,
                in_channels=16,
                block_out_channels=16,
                num_res_blocks=1,
                downsample=True,
                upsample=True,
                block_num_heads=1,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                sample_size=4,
            )
            vqvae = VQModel(
                block_out_channels=(8, 8, 16, 16),  # four levels: /8
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=8,
                layers_per_block=1,
                norm_num_groups=8,
                num_vq_embeddings=codebook,
                sample_size=64,
                mid_block_add_attention=False,
                lookup_from_codebook=True,
            )
            text_encoder = CLIPTextModelWithProjection(
                _text_config(
                    hidden_size=32,
                    intermediate_size=37,
                    num_attention_heads=4,
                    num_hidden_layers=2,
                    projection_dim=32,
                )
            )
    return {
        "transformer": transformer,
        "vqvae": vqvae,
        "text_encoder": text_encoder,
        "tokenizer": clip_tokenizer_offline(77),
        "scheduler": AmusedScheduler(mask_token_id=mask_token_id),
    }
