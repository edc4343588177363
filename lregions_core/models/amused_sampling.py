"""aMUSEd inpainting with one random stream per request.

``AmusedInpaintPipeline.__call__`` takes a single generator for the whole batch and computes the
starting mask ratio over the whole batch, so a request's result would depend on its batch-mates.
This loop follows that method step for step (strength 1, linear masking schedule, CFG against
the empty prompt, micro-conditioning on the image size) but runs the transformer batched and the
scheduler's sampling step per request, with that request's generator and its own mask ratio.
For a batch of one it gives exactly what the diffusers pipeline gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

AESTHETIC_SCORE = 6  # the pipeline's default micro-conditioning
TEMPERATURE = (2, 0)  # the pipeline's default sampling temperature schedule


def encode_text(
    pipe: Any, texts: list[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled (n, D), penultimate hidden states (n, 77, D)): the pipeline's text conditioning."""
    ids = pipe.tokenizer(
        texts,
        return_tensors="pt",
        padding="max_length",
        truncation=True,  # longer prompts are cut at 77 tokens, as the pipeline does
        max_length=pipe.tokenizer.model_max_length,
    ).input_ids.to(device)
    outputs = pipe.text_encoder(ids, return_dict=True, output_hidden_states=True)
    return outputs.text_embeds, outputs.hidden_states[-2]


def token_mask(masks: Sequence[Image.Image], grid_h: int, grid_w: int) -> torch.Tensor:
    """(B, grid_h, grid_w) bool: which VQ tokens to repaint.

    As the pipeline's mask processor (Lanczos resize, threshold 0.5), but without its rounding of
    the token grid down to a multiple of the VQ-GAN's factor, which breaks non-square sizes.
    """
    grids = [
        np.asarray(m.convert("L").resize((grid_w, grid_h), Image.Resampling.LANCZOS), np.float32)
        for m in masks
    ]
    return torch.from_numpy(np.stack(grids) / 255.0 >= 0.5)


def amused_inpaint(
    pipe: Any,
    images: Sequence[Image.Image],
    masks: Sequence[Image.Image],
    text: tuple[torch.Tensor, torch.Tensor],
    negative: tuple[torch.Tensor, torch.Tensor] | None,
    generators: Sequence[torch.Generator],
    num_inference_steps: int,
    guidance_scale: float,
) -> list[Image.Image]:
    """Repaint the white (255) part of each mask; all images share one size. ``text`` and
    ``negative`` are :func:`encode_text` of the prompts and of empty prompts (one row per
    image); ``negative`` None means no classifier-free guidance."""
    device = pipe._execution_device
    batch = len(images)
    pooled, hidden = text
    guided = negative is not None
    if guided:
        pooled = torch.cat([negative[0], pooled])
        hidden = torch.cat([negative[1], hidden])

    pixels = pipe.image_processor.preprocess(list(images))
    height, width = pixels.shape[-2:]
    # The micro-conditions list width before height, as the original code base did.
    micro_conds = torch.tensor(
        [width, height, 0, 0, AESTHETIC_SCORE], device=device, dtype=hidden.dtype
    ).expand(pooled.shape[0], -1)

    scheduler = pipe.scheduler
    scheduler.set_timesteps(num_inference_steps, TEMPERATURE, device)

    vqvae = pipe.vqvae
    upcast = vqvae.dtype == torch.float16 and vqvae.config.force_upcast
    if upcast:
        vqvae.float()
    latents = vqvae.encode(pixels.to(dtype=vqvae.dtype, device=device)).latents
    _, _, grid_h, grid_w = latents.shape
    tokens = vqvae.quantize(latents)[2][2].reshape(batch, grid_h, grid_w)
    mask = token_mask(masks, grid_h, grid_w).to(device)
    tokens[mask] = scheduler.config.mask_token_id
    # Per request (the pipeline divides by the whole batch's token count).
    start_ratio = mask.flatten(1).float().mean(dim=1)

    for timestep in scheduler.timesteps:
        model_input = torch.cat([tokens, tokens]) if guided else tokens
        logits = pipe.transformer(
            model_input,
            micro_conds=micro_conds,
            pooled_text_emb=pooled,
            encoder_hidden_states=hidden,
        )
        if guided:
            uncond, cond = logits.chunk(2)
            logits = uncond + guidance_scale * (cond - uncond)
        tokens = torch.cat(
            [
                scheduler.step(
                    model_output=logits[i : i + 1],
                    timestep=timestep,
                    sample=tokens[i : i + 1],
                    starting_mask_ratio=start_ratio[i],
                    generator=generators[i],
                ).prev_sample
                for i in range(batch)
            ]
        )

    decoded = vqvae.decode(
        tokens, force_not_quantize=True, shape=(batch, grid_h, grid_w, vqvae.config.latent_channels)
    ).sample.clip(0, 1)
    if upcast:
        vqvae.half()
    return pipe.image_processor.postprocess(decoded, "pil")
