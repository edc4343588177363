"""The diffusers editors: Stable Diffusion inpainting (``"sd-inpaint"``) and aMUSEd (``"amused"``).

Each request gets its own ``torch.Generator`` seeded with ``request.seed``, and nothing random is
shared across a batch, so an edit is a function of (image, mask, prompt, seed) alone: the same
whether it runs alone or batched with others (up to float rounding of batched kernels).

Weights come from ``<weights_dir>/<org--name>`` or the Hugging Face cache (``lregions download``
fills it). With ``random_weights`` the pipeline is built in code instead, with
``editor_kwargs["architecture"]`` = ``"tiny"`` (tests) or ``"full"`` (the real architecture, the
default, for benchmarks); see :mod:`lregions_core.models.editor_components`.

SD's safety checker is not loaded: it is not part of the method, and it would blank images.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from lregions_core.config import Config
from lregions_core.interfaces import EditRequest
from lregions_core.loading import load_once
from lregions_core.models.runtime import resolve_device, resolve_dtype
from lregions_core.models.weights import WeightsUnavailableError, local_path
from lregions_core.registry import EDITORS

# diffusers pipelines keep per-call state on the scheduler: one call at a time per pipeline.
_RUN_LOCKS: dict[int, threading.Lock] = {}


def _architecture(config: Config) -> str:
    return str(config.editor_kwargs.get("architecture", "full"))


def _cache_key(config: Config) -> str:
    fields = (
        "editor",
        "editor_model",
        "editor_kwargs",
        "random_weights",
        "device",
        "dtype",
        "weights_dir",
    )
    data = {name: getattr(config, name) for name in fields}
    data["device"] = str(resolve_device(config))  # "auto" and "cpu" may be the same pipeline
    data["dtype"] = str(resolve_dtype(config)).removeprefix("torch.")
    return json.dumps(data, sort_keys=True, default=str)


def _load_pretrained(pipeline_class: Any, config: Config, **extra: Any) -> Any:
    """``from_pretrained`` from ``weights_dir`` or the hub cache; missing weights -> one error."""
    from huggingface_hub.errors import EntryNotFoundError

    source = local_path(config.weights_dir, config.editor_model) or config.editor_model
    # Other editor_kwargs (variant, revision, ...) go to from_pretrained.
    options = {k: v for k, v in config.editor_kwargs.items() if k != "architecture"}
    try:
        return pipeline_class.from_pretrained(
            str(source), dtype=resolve_dtype(config), **extra, **options
        )
    except (OSError, EntryNotFoundError) as exc:  # hub, HTTP, offline and file errors are OSError
        raise WeightsUnavailableError("editor", config.editor_model, exc) from exc


def _build_sd_inpaint(config: Config) -> Any:
    from diffusers import StableDiffusionInpaintPipeline

    if config.random_weights:
        from lregions_core.models.editor_components import sd_inpaint_components

        components = sd_inpaint_components(_architecture(config))
        pipe = StableDiffusionInpaintPipeline(**components, requires_safety_checker=False)
    else:
        pipe = _load_pretrained(
            StableDiffusionInpaintPipeline,
            config,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return pipe


def _build_amused(config: Config) -> Any:
    # aMUSEd sits under diffusers' deprecated pipelines (last updated in 0.33) but still works.
    from diffusers import AmusedInpaintPipeline

    if config.random_weights:
        from lregions_core.models.editor_components import amused_components

        return AmusedInpaintPipeline(**amused_components(_architecture(config)))
    return _load_pretrained(AmusedInpaintPipeline, config)


_BUILDERS: dict[str, Callable[[Config], Any]] = {
    "sd-inpaint": _build_sd_inpaint,
    "amused": _build_amused,
}


def editor_pipeline(config: Config) -> Any:
    """The diffusers pipeline for ``config.editor``, loaded once per process and settings."""
    return _load_pipeline(_cache_key(config))


@load_once()
def _load_pipeline(key: str) -> Any:
    config = Config().replace(**json.loads(key))  # the settings that decide the pipeline
    pipe = _BUILDERS[config.editor](config)
    dtype = resolve_dtype(config)
    if config.random_weights and dtype != torch.float32:  # built in float32
        pipe.to(dtype=dtype)
    pipe.to(resolve_device(config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def clear_pipeline_cache() -> None:
    """Forget every loaded pipeline (frees memory once no editor holds them)."""
    _load_pipeline.cache_clear()
    _RUN_LOCKS.clear()


# ----------------------------------------------------------------------------------------------
class DiffusersEditor:
    """Shared request handling: validation, grouping by size, batching, per-request seeds."""

    name = "diffusers"

    def __init__(self, config: Config, pipeline: Any, multiple: int) -> None:
        self.steps_per_call = config.editor_steps
        self.config = config
        self.pipeline = pipeline
        self.multiple = multiple  # width and height must be multiples of this (latent grid)
        self.device = resolve_device(config)
        self._lock = _RUN_LOCKS.setdefault(id(pipeline), threading.Lock())

    def edit(self, requests: Sequence[EditRequest]) -> list[Image.Image]:
        """One RGB image per request, each the size of its request's image, in order."""
        for request in requests:
            self._check(request)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(request.image.size, []).append(index)
        results: list[Image.Image | None] = [None] * len(requests)
        batch = max(1, self.config.edit_batch)
        with self._lock, torch.inference_mode():
            for (width, height), indices in groups.items():
                for start in range(0, len(indices), batch):
                    chunk = indices[start : start + batch]
                    outputs = self._run([requests[i] for i in chunk], width, height)
                    for i, image in zip(chunk, outputs):
                        results[i] = image.convert("RGB")
        missing = [i for i, image in enumerate(results) if image is None]
        if missing:  # a pipeline returned fewer images than it was given
            raise RuntimeError(f"{self.name} returned no image for requests {missing}")
        return results  # type: ignore[return-value]

    def _check(self, request: EditRequest) -> None:
        width, height = request.image.size
        if request.mask.size != request.image.size:
            raise ValueError(f"mask size {request.mask.size} != image size {request.image.size}")
        if width % self.multiple or height % self.multiple:
            raise ValueError(
                f"{self.name} needs working sizes that are multiples of {self.multiple}, got "
                f"{width}x{height}; set work_multiple accordingly"
            )

    def _inputs(self, requests: Sequence[EditRequest]) -> tuple[list, list, list[str], list]:
        images = [r.image.convert("RGB") for r in requests]
        masks = [r.mask.convert("L") for r in requests]
        prompts = [self.config.prompt_template.format(prompt=r.prompt) for r in requests]
        generators = [
            torch.Generator(device=self.device).manual_seed(int(r.seed)) for r in requests
        ]
        return images, masks, prompts, generators

    def _run(self, requests: Sequence[EditRequest], width: int, height: int) -> list[Image.Image]:
        raise NotImplementedError


class SDInpaintEditor(DiffusersEditor):
    """Stable Diffusion inpainting: the repainted region starts from pure noise (strength 1)."""

    name = "sd-inpaint"

    def _run(self, requests: Sequence[EditRequest], width: int, height: int) -> list[Image.Image]:
        images, masks, prompts, generators = self._inputs(requests)
        return self.pipeline(
            prompt=prompts,
            image=images,
            mask_image=masks,
            height=height,
            width=width,
            strength=1.0,
            num_inference_steps=self.config.editor_steps,
            guidance_scale=self.config.guidance_scale,
            generator=generators,  # a list: diffusers draws each sample's noise from its own
            output_type="pil",
        ).images


class AmusedEditor(DiffusersEditor):
    """aMUSEd inpainting (MaskGIT-style decoding of VQ tokens)."""

    name = "amused"

    def _run(self, requests: Sequence[EditRequest], width: int, height: int) -> list[Image.Image]:
        from lregions_core.models.amused_sampling import amused_inpaint

        images, masks, prompts, generators = self._inputs(requests)
        return amused_inpaint(
            self.pipeline,
            images,
            masks,
            prompts,
            generators,
            num_inference_steps=self.config.editor_steps,
            guidance_scale=self.config.guidance_scale,
        )


@EDITORS.register("sd-inpaint")
def build_sd_inpaint(config: Config) -> SDInpaintEditor:
    """Stable Diffusion inpainting (default: SD 2 inpainting), one pipeline per process."""
    pipe = editor_pipeline(config.replace(editor="sd-inpaint"))
    return SDInpaintEditor(config, pipe, multiple=int(pipe.vae_scale_factor))


@EDITORS.register("amused")
def build_amused(config: Config) -> AmusedEditor:
    """aMUSEd inpainting (default preset: amused/amused-512), one pipeline per process."""
    pipe = editor_pipeline(config.replace(editor="amused"))
    down = 2 if pipe.transformer.config.downsample else 1  # the transformer halves the grid again
    return AmusedEditor(config, pipe, multiple=int(pipe.vae_scale_factor) * down)
