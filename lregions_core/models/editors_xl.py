"""The 1024-pixel diffusers editors: SDXL inpainting (``"sdxl-inpaint"``) and FLUX.1 Fill
(``"flux-fill"``), on :class:`~lregions_core.models.editors.DiffusersEditor` and the same rules as
``sd-inpaint`` and ``amused``:

* one lock per loaded weights (every call holds it for its whole run; see the thread-safety
  note of :mod:`lregions_core.models.editors`);
* a ``torch.Generator`` per request seeded with ``request.seed``, so an edit does not depend on
  its batch-mates (up to float rounding of batched kernels);
* each distinct prompt encoded once, alone, and cached;
* requests batched ``edit_batch`` at a time in equal parts, the batch halved when the GPU runs
  out of memory;
* weights from ``weights_dir`` or the Hugging Face cache, or built in code with
  ``random_weights`` (``editor_kwargs["architecture"]`` "tiny" or "full", see
  :mod:`lregions_core.models.editor_components`).

Their native size (the resolution they were trained at) is 1024: their presets work at
``work_size`` 1024.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from lregions_core.config import Config
from lregions_core.interfaces import EditRequest
from lregions_core.models.editors import (
    BUILDERS,
    DiffusersEditor,
    _architecture,
    _load_pretrained,
    editor_pipeline,
    pipeline_class,
)
from lregions_core.registry import EDITORS


class _VacuousUpcastWarning(logging.Filter):
    """Drops diffusers' warning that a model has modules to keep in float32 when it has none:
    ``ModelMixin.to`` gives it on every cast, and SDXL's pipeline casts its VAE to float32 and
    back on every call (``force_upcast``), so a batch would log it for every edit."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


_UPCAST_FILTER = _VacuousUpcastWarning()


def _build_sdxl_inpaint(config: Config) -> Any:
    StableDiffusionXLInpaintPipeline = pipeline_class(
        "sdxl-inpaint", "StableDiffusionXLInpaintPipeline"
    )
    logging.getLogger("diffusers.models.modeling_utils").addFilter(_UPCAST_FILTER)  # once
    if config.random_weights:
        from lregions_core.models.editor_components import sdxl_inpaint_components

        return StableDiffusionXLInpaintPipeline(
            **sdxl_inpaint_components(_architecture(config))
        )
    return _load_pretrained(StableDiffusionXLInpaintPipeline, config)


def _build_flux_fill(config: Config) -> Any:
    FluxFillPipeline = pipeline_class("flux-fill", "FluxFillPipeline")
    if config.random_weights:
        from lregions_core.models.editor_components import flux_fill_components

        return FluxFillPipeline(**flux_fill_components(_architecture(config)))
    return _load_pretrained(FluxFillPipeline, config)


BUILDERS["sdxl-inpaint"] = _build_sdxl_inpaint
BUILDERS["flux-fill"] = _build_flux_fill


def schedule_steps(steps: int, strength: float) -> int:
    """The length of the schedule whose last ``steps`` steps diffusers runs at ``strength``
    (it runs ``min(int(n * strength), n)`` of ``n``): the smallest such ``n``."""
    total = steps
    while min(int(total * strength), total) < steps:
        total += 1
    return total


class SDXLInpaintEditor(DiffusersEditor):
    """SDXL inpainting (default weights: ``diffusers/stable-diffusion-xl-1.0-inpainting-0.1``):
    SDXL's UNet with 9 input channels (noisy latents, mask, masked-image latents), conditioned on
    both text encoders' hidden states, the second one's pooled embedding, and the image size.

    The masked region starts just below pure noise (strength 0.99, as the model card advises
    against 1.0): diffusers then skips the first step of the schedule, so the schedule is that of
    :func:`schedule_steps` steps, of which exactly ``editor_steps`` run. Without a negative prompt
    the unconditional embedding of guidance is zeros (``force_zeros_for_empty_prompt``, the
    weights' setting) or else the empty prompt's, as diffusers does.

    Options that apply: ``editor_scheduler`` ("default": Euler; "dpm-solver++"),
    ``compile_unet`` (the UNet), ``vae_slicing``, ``vae_tiling``, ``editor_offload``, and the
    benchmark's attention lever (SDPA or diffusers' eager processor). In float16 diffusers runs
    the VAE in float32 (``force_upcast``: SDXL's VAE overflows in float16).
    """

    name = "sdxl-inpaint"
    native_size = 1024
    strength = 0.99

    def _encode_text(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states (1, 77, 768 + 1280), pooled (1, 1280))."""
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            text,
            device=self.pipeline._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return embeds, pooled

    def _texts(self, prompts: list[str]) -> dict[str, Any]:
        if not self.reuse_prompt_embeddings:
            return {"prompt": prompts}
        embeds, pooled = (torch.cat(part) for part in zip(*self._text_embeddings(prompts)))
        text = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if self.config.guidance_scale > 1.0:  # diffusers' condition for guidance
            if self.pipeline.config.force_zeros_for_empty_prompt:
                negative = (torch.zeros_like(embeds), torch.zeros_like(pooled))
            else:
                empty = self._text_embeddings([""] * len(prompts))
                negative = tuple(torch.cat(part) for part in zip(*empty))
            text["negative_prompt_embeds"], text["negative_pooled_prompt_embeds"] = negative
        return text

    def _run(self, requests: Sequence[EditRequest], width: int, height: int) -> list[Image.Image]:
        images, masks, prompts, generators = self._inputs(requests)
        return self.pipeline(
            **self._texts(prompts),
            image=images,
            mask_image=masks,
            height=height,
            width=width,
            strength=self.strength,
            num_inference_steps=schedule_steps(self.config.editor_steps, self.strength),
            guidance_scale=self.config.guidance_scale,
            generator=generators,  # a list: each sample's noise and latents from its own
            output_type="pil",
        ).images


class FluxFillEditor(DiffusersEditor):
    """FLUX.1 Fill [dev] (default weights: ``black-forest-labs/FLUX.1-Fill-dev``): a 12 B
    rectified-flow transformer over packed latents (the VAE's /8 latents in 2x2 patches, so
    working sizes are multiples of 16), conditioned on T5-XXL's token embeddings (512 tokens) and
    CLIP's pooled embedding. The masked region starts from pure noise (strength 1).

    FLUX.1 [dev] is guidance-distilled: ``guidance_scale`` is a number its transformer is
    conditioned on (the model card uses 30), not classifier-free guidance, so there is no
    negative prompt and each request goes through the transformer once per step.

    Licence: FLUX.1 Fill [dev]'s weights are under the FLUX.1 [dev] Non-Commercial License: the
    model is for non-commercial use; read the licence for what it says about outputs. The
    repository is gated: accept the licence on its Hugging Face page and log in before
    ``lregions download``.

    Options that apply: ``compile_unet`` (the transformer), ``vae_slicing``, ``vae_tiling``,
    ``editor_offload``. ``editor_scheduler`` must be "default" (flow-matching Euler;
    DPM-Solver++ is for the UNet editors), and the benchmark's eager-attention lever does not
    apply (FLUX's attention has processors of its own). With ``dtype`` "auto" on CUDA it runs in
    bfloat16, its weights' precision (FLUX overflows in float16), not float16.
    """

    name = "flux-fill"
    native_size = 1024
    eager_attention = False
    prompt_cache_size = 16  # a T5 embedding is 512 x 4096 values (4 MB in bfloat16)
    max_sequence_length = 512  # FLUX.1 [dev]'s T5 tokens

    def _encode_text(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 token embeddings (1, 512, 4096), CLIP pooled (1, 768))."""
        embeds, pooled, _ = self.pipeline.encode_prompt(
            text,
            prompt_2=None,
            device=self.pipeline._execution_device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def _run(self, requests: Sequence[EditRequest], width: int, height: int) -> list[Image.Image]:
        images, masks, prompts, generators = self._inputs(requests)
        text: dict[str, Any] = {"prompt": prompts}
        if self.reuse_prompt_embeddings:
            embeds, pooled = (torch.cat(part) for part in zip(*self._text_embeddings(prompts)))
            text = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        return self.pipeline(
            **text,
            image=images,
            mask_image=masks,
            height=height,
            width=width,
            strength=1.0,
            num_inference_steps=self.config.editor_steps,
            guidance_scale=self.config.guidance_scale,
            generator=generators,  # a list: each sample's noise from its own
            max_sequence_length=self.max_sequence_length,
            output_type="pil",
        ).images


@EDITORS.register("sdxl-inpaint")
def build_sdxl_inpaint(config: Config) -> SDXLInpaintEditor:
    """SDXL inpainting (default preset sdxl: SDXL inpainting 0.1), one pipeline per process."""
    config = config.replace(editor="sdxl-inpaint")
    pipe = editor_pipeline(config)
    return SDXLInpaintEditor(config, pipe, multiple=int(pipe.vae_scale_factor))


@EDITORS.register("flux-fill")
def build_flux_fill(config: Config) -> FluxFillEditor:
    """FLUX.1 Fill [dev] (non-commercial licence), one pipeline per process."""
    config = config.replace(editor="flux-fill")
    if config.editor_scheduler != "default":
        raise ValueError("editor_scheduler='dpm-solver++' applies to sd-inpaint and "
                         "sdxl-inpaint only; flux-fill uses its flow-matching scheduler")
    pipe = editor_pipeline(config)
    # 2x2 latent patches are packed into one token: twice the VAE's downsampling
    return FluxFillEditor(config, pipe, multiple=2 * int(pipe.vae_scale_factor))
