"""Editor pipelines' components built in code with random weights (no download).

Two sizes, chosen by ``Config.editor_kwargs["architecture"]``:

* ``"tiny"``: a few thousand to a few million parameters, like diffusers' fast tests'
  ``get_dummy_components()``; for offline tests and the smoke run. The tiny autoencoders keep
  the real ones' downsampling (SD, SDXL and FLUX /8; aMUSEd /8 plus the transformer's /2; FLUX
  packs 2x2 latents on top), so working sizes that are multiples of 16 work for all of them.
* ``"full"``: the published architectures (Stable Diffusion 2 inpainting; aMUSEd 512; SDXL
  inpainting 0.1; FLUX.1 Fill [dev]) with random weights: the honest way to measure speed and
  memory where the weights cannot be had. SDXL is about 3.5 billion parameters (14 GB in
  float32, as they are built) and FLUX about 16.9 billion (68 GB): count them under
  ``torch.device("meta")`` on a machine without that much memory.

Tokenizers are built offline (:mod:`lregions_core.models.tokenizer`): CLIP's real vocabulary,
and for FLUX's T5 a small character-level one whose ids fit the embedding of either size.

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

# SDXL inpainting 0.1 (diffusers/stable-diffusion-xl-1.0-inpainting-0.1, */config.json): SDXL
# base's UNet with 9 input channels, its VAE, and its two text encoders (CLIP ViT-L/14's text
# tower, and OpenCLIP ViT-bigG/14's with projection) whose penultimate states are concatenated.
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 9,  # 4 noisy latents + 1 mask + 4 masked-image latents
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,  # 768 + 1280: both text encoders' hidden states
    "use_linear_projection": True,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # pooled 1280 + 6 size/crop ids x 256
}
SDXL_VAE = {**SD2_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SDXL_TEXT = {  # CLIP ViT-L/14
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
SDXL_TEXT_2 = {  # OpenCLIP ViT-bigG/14
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
# EulerDiscreteScheduler with the repo's scheduler/scheduler_config.json.
SDXL_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}

# FLUX.1 Fill [dev] (black-forest-labs/FLUX.1-Fill-dev, */config.json): a 12 B rectified-flow
# transformer whose input is the packed noisy latents (16 channels x 2x2), the packed masked-image
# latents (64) and the packed mask (8x8 pixels x 2x2 = 256); guidance-distilled (guidance_embeds).
FLUX_FILL_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 384,
    "out_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,  # T5-XXL's width
    "pooled_projection_dim": 768,  # CLIP ViT-L/14's pooled output
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
FLUX_VAE = {
    "sample_size": 1024,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
FLUX_TEXT = SDXL_TEXT  # CLIP ViT-L/14's text tower (only its pooled output is used)
FLUX_T5 = {  # T5 v1.1 XXL's encoder
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
}
FLUX_T5_MAX_LENGTH = 512  # FLUX.1 [dev]'s T5 sequence length
FLUX_SCHEDULER = {  # FlowMatchEulerDiscreteScheduler, scheduler/scheduler_config.json
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


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


def _inference(components: dict[str, Any]) -> dict[str, Any]:
    """The components with every model in evaluation mode, as ``from_pretrained`` leaves them
    (T5's dropout would otherwise draw from torch's global generator on every prompt)."""
    for component in components.values():
        if hasattr(component, "eval") and hasattr(component, "parameters"):
            component.eval()
    return components


def _check(architecture: str) -> None:
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"editor architecture must be one of {ARCHITECTURES}, got {architecture!r}"
        )


# The tiny builds' inpainting UNet (9 input channels: 4 noisy latents, the mask, 4 masked-image
# latents), before each pipeline's own conditioning settings.
TINY_INPAINT_UNET = {
    "sample_size": 8,
    "in_channels": 9,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}
# The tiny builds' autoencoder: four levels, so /8 like the real VAEs.
TINY_VAE = {
    "sample_size": 64,
    "latent_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (8, 8, 16, 16),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "norm_num_groups": 8,
}


def _tiny_clip(with_projection: bool = False):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = _text_config(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=32,
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


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
            unet = UNet2DConditionModel(**TINY_INPAINT_UNET, cross_attention_dim=32)
            vae = AutoencoderKL(**TINY_VAE)
            text_encoder = _tiny_clip()
    return _inference({
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": clip_tokenizer_offline(77),
        "scheduler": PNDMScheduler(**SD_SCHEDULER),
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
    })


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
    return _inference({
        "transformer": transformer,
        "vqvae": vqvae,
        "text_encoder": text_encoder,
        "tokenizer": clip_tokenizer_offline(77),
        "scheduler": AmusedScheduler(mask_token_id=mask_token_id),
    })


def _on_cpu(scheduler_class: Any, **settings: Any) -> Any:
    """A scheduler, its small tables on the CPU also when the models are built under
    ``torch.device("meta")`` (some schedulers copy their tables, which meta tensors cannot)."""
    import torch

    with torch.device("cpu"):
        return scheduler_class(**settings)


def sdxl_inpaint_components(architecture: str) -> dict[str, Any]:
    """UNet (9 input channels, text-and-size conditioning), VAE, two text encoders (the second
    with projection: its pooled embedding), two tokenizers and the Euler scheduler."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from lregions_core.models.tokenizer import clip_tokenizer_offline

    _check(architecture)
    with seeded():
        if architecture == "full":
            unet = UNet2DConditionModel(**SDXL_UNET)
            vae = AutoencoderKL(**SDXL_VAE)
            text_encoder = CLIPTextModel(_text_config(**SDXL_TEXT))
            text_encoder_2 = CLIPTextModelWithProjection(_text_config(**SDXL_TEXT_2))
        else:
            unet = UNet2DConditionModel(
                **TINY_INPAINT_UNET,
                attention_head_dim=(2, 4),
                transformer_layers_per_block=(1, 2),
                cross_attention_dim=64,  # 32 + 32: both text encoders' hidden states
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled + 6 size/crop ids
                norm_num_groups=8,
            )
            vae = AutoencoderKL(**TINY_VAE, scaling_factor=SDXL_VAE["scaling_factor"])
            text_encoder = _tiny_clip()
            text_encoder_2 = _tiny_clip(with_projection=True)
    return _inference({
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": clip_tokenizer_offline(77),
        "tokenizer_2": clip_tokenizer_offline(77, "!"),  # as SDXL's tokenizer_2 pads
        "scheduler": _on_cpu(EulerDiscreteScheduler, **SDXL_SCHEDULER),
        "image_encoder": None,
        "feature_extractor": None,
    })


def flux_fill_components(architecture: str) -> dict[str, Any]:
    """FLUX Fill transformer (guidance embedding), VAE (16 latent channels, /8), CLIP text
    encoder (pooled), T5 encoder, their tokenizers and the flow-matching Euler scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    from lregions_core.models.tokenizer import (
        T5_OFFLINE_VOCAB_SIZE,
        clip_tokenizer_offline,
        t5_tokenizer_offline,
    )

    _check(architecture)
    with seeded():
        if architecture == "full":
            transformer = FluxTransformer2DModel(**FLUX_FILL_TRANSFORMER)
            vae = AutoencoderKL(**FLUX_VAE)
            text_encoder = CLIPTextModel(_text_config(**FLUX_TEXT))
            text_encoder_2 = T5EncoderModel(T5Config(**FLUX_T5))
        else:
            latent_channels, scale = 4, 8  # the tiny VAE's channels and downsampling
            transformer = FluxTransformer2DModel(
                patch_size=1,
                # packed: noisy latents (4 x 2x2), masked-image latents (same), mask (8x8 x 2x2)
                in_channels=2 * 4 * latent_channels + 4 * scale * scale,
                out_channels=4 * latent_channels,
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=32,  # the tiny T5's width
                pooled_projection_dim=32,  # the tiny CLIP's width
                guidance_embeds=True,
                axes_dims_rope=(4, 4, 8),
            )
            vae = AutoencoderKL(
                **{**TINY_VAE, "latent_channels": latent_channels},
                use_quant_conv=False,
                use_post_quant_conv=False,
                scaling_factor=FLUX_VAE["scaling_factor"],
                shift_factor=FLUX_VAE["shift_factor"],
            )
            text_encoder = _tiny_clip()
            text_encoder_2 = T5EncoderModel(
                T5Config(
                    vocab_size=T5_OFFLINE_VOCAB_SIZE,
                    d_model=32,
                    d_kv=8,
                    d_ff=37,
                    num_layers=2,
                    num_heads=4,
                    feed_forward_proj="gated-gelu",
                )
            )
    return _inference({
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": clip_tokenizer_offline(77),
        "tokenizer_2": t5_tokenizer_offline(FLUX_T5_MAX_LENGTH),
        "scheduler": _on_cpu(FlowMatchEulerDiscreteScheduler, **FLUX_SCHEDULER),
    })
