"""The diffusers editors: Stable Diffusion inpainting (``"sd-inpaint"``) and aMUSEd (``"amused"``)
here; SDXL inpainting (``"sdxl-inpaint"``) and FLUX.1 Fill (``"flux-fill"``) in
:mod:`lregions_core.models.editors_xl`, on the same :class:`DiffusersEditor`.

Each request gets its own ``torch.Generator`` seeded with ``request.seed``, and nothing random is
shared across a batch, so an edit is a function of (image, mask, prompt, seed) alone: the same
whether it runs alone or batched with others (up to float rounding of batched kernels).

Weights come from ``<weights_dir>/<org--name>`` or the Hugging Face cache (``lregions download``
fills it). With ``random_weights`` the pipeline is built in code instead, with
``editor_kwargs["architecture"]`` = ``"tiny"`` (tests) or ``"full"`` (the real architecture, the
default, for benchmarks); see :mod:`lregions_core.models.editor_components`.

Speed and memory: each distinct prompt is encoded once per editor (alone, so its embedding does
not depend on its batch-mates either); requests go to the model ``edit_batch`` at a time, in
equal parts; when the GPU runs out of memory the batch is halved and retried, and with one image
per batch the error says what to set. ``editor_scheduler`` and ``compile_unet`` give a pipeline
object of its own over the same weights (see :func:`editor_pipeline`). ``vae_slicing`` and
``vae_tiling`` are set on the VAE per call (aMUSEd's VQ-GAN has neither). ``editor_offload``
("model" or "sequential": diffusers' ``enable_model_cpu_offload`` /
``enable_sequential_cpu_offload``, which need the ``accelerate`` package) keeps the weights in CPU
memory and moves them to the GPU as they run: it needs a CUDA device, and an editor on the CPU
refuses it with an error rather than ignoring it (the setting would mean nothing there). An
offloaded load is a load of its own (not shared with a plain one), and cannot be compiled.

Each editor says its ``native_size``: the resolution its weights were trained at (the longer side
of the working image that suits it; ``work_size`` in its preset).

An editor whose diffusers pipeline class cannot be imported (diffusers outside
:data:`DIFFUSERS_REQUIREMENT`) fails with an :class:`EditorUnavailableError` naming the editor, the
class, the diffusers versions it needs and the one installed.

SD's safety checker is not loaded: it is not part of the method, and it would blank images.

Thread safety: serialised. A diffusers pipeline is not safe to call concurrently (``set_timesteps``
mutates its scheduler; the editors set attention processors and VAE slicing on shared modules,
and keep a prompt-embedding cache), so every call holds one lock per loaded weights, shared by
every pipeline view over them (:func:`editor_pipeline`), for its whole run. Each request's
randomness comes from its own ``torch.Generator``, so a serialised call gives the same edit
whichever thread makes it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import math
import sys
import threading
from collections import OrderedDict
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

logger = logging.getLogger(__name__)

# diffusers pipelines keep per-call state on the scheduler, and the editors set attention and
# VAE slicing on shared modules per call: one call at a time per loaded weights (GPU work is
# serial anyway). Keyed by the weights' cache key.
_RUN_LOCKS: dict[str, threading.Lock] = {}
PROMPT_CACHE_SIZE = 64  # text embeddings kept per editor (SD 2: 77 x 1024 values each)
# The diffusers versions the editors are written for: pyproject.toml's pin (a test keeps them equal).
DIFFUSERS_REQUIREMENT = ">=0.40,<0.43"


class EditorUnavailableError(RuntimeError):
    """The installed diffusers lacks the pipeline class an editor is built on."""


def pipeline_class(editor: str, class_name: str, note: str = "") -> Any:
    """``diffusers.<class_name>``, or an :class:`EditorUnavailableError` that names the editor,
    the class (with ``note``), the diffusers versions it needs and the installed one."""
    try:
        return getattr(importlib.import_module("diffusers"), class_name)
    except (ImportError, AttributeError) as exc:
        what = f"{class_name}, {note}" if note else class_name
        raise EditorUnavailableError(
            f"{editor} needs diffusers {DIFFUSERS_REQUIREMENT} ({what}); "
            f"installed: {_diffusers_version()}"
        ) from exc


def _diffusers_version() -> str:
    module = sys.modules.get("diffusers")
    if getattr(module, "__version__", None):
        return str(module.__version__)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return "none"


# Editors whose weights are bfloat16 and overflow in float16: dtype "auto" runs them in bfloat16
# on CUDA (the other models of the run keep float16).
BFLOAT16_EDITORS = ("flux-fill",)


def editor_dtype(config: Config) -> torch.dtype:
    """The editor's dtype: ``config.dtype``, where "auto" is float32 on the CPU, and on CUDA
    float16, or bfloat16 for :data:`BFLOAT16_EDITORS`."""
    auto_cuda = config.dtype == "auto" and resolve_device(config).type == "cuda"
    if auto_cuda and config.editor in BFLOAT16_EDITORS:
        return torch.bfloat16
    return resolve_dtype(config)


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
        "editor_offload",  # offloading hooks the modules: an offloaded load is one of its own
    )
    data = {name: getattr(config, name) for name in fields}
    data["device"] = str(resolve_device(config))  # "auto" and "cpu" may be the same pipeline
    data["dtype"] = str(editor_dtype(config)).removeprefix("torch.")
    return json.dumps(data, sort_keys=True, default=str)


def _load_pretrained(pipeline_class: Any, config: Config, **extra: Any) -> Any:
    """``from_pretrained`` from ``weights_dir`` or the hub cache; missing weights -> one error."""
    from huggingface_hub.errors import EntryNotFoundError

    source = local_path(config.weights_dir, config.editor_model) or config.editor_model
    # Other editor_kwargs (variant, revision, ...) go to from_pretrained.
    options = {k: v for k, v in config.editor_kwargs.items() if k != "architecture"}
    try:
        return pipeline_class.from_pretrained(
            str(source), dtype=editor_dtype(config), **extra, **options
        )
    except (OSError, EntryNotFoundError) as exc:  # hub, HTTP, offline and file errors are OSError
        raise WeightsUnavailableError("editor", config.editor_model, exc) from exc


def _build_sd_inpaint(config: Config) -> Any:
    StableDiffusionInpaintPipeline = pipeline_class("sd-inpaint", "StableDiffusionInpaintPipeline")
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
    AmusedInpaintPipeline = pipeline_class(
        "amused", "AmusedInpaintPipeline", "a deprecated pipeline"
    )
    if config.random_weights:
        from lregions_core.models.editor_components import amused_components

        return AmusedInpaintPipeline(**amused_components(_architecture(config)))
    return _load_pretrained(AmusedInpaintPipeline, config)


# Editor name -> the function that builds its pipeline (random weights or pretrained), on the CPU
# in float32 or the config's dtype; editors_xl adds its editors here.
BUILDERS: dict[str, Callable[[Config], Any]] = {
    "sd-inpaint": _build_sd_inpaint,
    "amused": _build_amused,
}


def editor_pipeline(config: Config) -> Any:
    """The diffusers pipeline for ``config.editor``: weights loaded once per process and settings,
    with the scheduler and compiled denoiser ``config`` asks for on top (sharing the weights)."""
    if config.editor_offload != "none":
        _check_offload(config, resolve_device(config))  # before the key resolves "auto"
    return _pipeline_view(_cache_key(config), config.editor_scheduler, config.compile_unet)


@load_once()
def _load_pipeline(key: str) -> Any:
    config = Config().replace(**json.loads(key))  # the settings that decide the pipeline
    device = resolve_device(config)
    pipe = BUILDERS[config.editor](config)
    dtype = editor_dtype(config)
    if config.random_weights and dtype != torch.float32:  # built in float32
        pipe.to(dtype=dtype)
    if config.editor_offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif config.editor_offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_offload(config: Config, device: torch.device) -> None:
    """Offloading moves weights between CPU memory and a CUDA GPU: refuse it elsewhere (on the
    CPU it would mean nothing), and say what to install when accelerate is missing."""
    if device.type != "cuda":
        raise ValueError(
            f"editor_offload={config.editor_offload!r} moves the editor's weights between CPU "
            f"memory and a CUDA GPU, but the editor runs on {device}; set editor_offload=none "
            f"(or device=cuda on a machine with a GPU)"
        )
    if importlib.util.find_spec("accelerate") is None:
        raise ImportError(
            f"editor_offload={config.editor_offload!r} needs the accelerate package: "
            f"pip install 'lregions[offload]' (accelerate>=0.17)"
        )


def _denoiser_name(pipe: Any) -> str:
    return "unet" if hasattr(pipe, "unet") else "transformer"  # SD, SDXL / aMUSEd, FLUX


def _unwrap(module: Any) -> Any:
    """The module itself, also when ``torch.compile`` wrapped it."""
    return getattr(module, "_orig_mod", module)


@load_once(maxsize=8)
def _pipeline_view(key: str, scheduler: str, compile_denoiser: bool) -> Any:
    """The loaded pipeline, or a new pipeline object over the same modules with another scheduler
    (schedulers keep per-call state, so it must not be swapped on a shared pipeline) and/or a
    compiled denoiser (compiled once per process: the compiled code is what takes minutes)."""
    base = _load_pipeline(key)
    if scheduler == "default" and not compile_denoiser:
        return base
    components = dict(base.components)
    if scheduler == "dpm-solver++":
        if "unet" not in components:
            raise ValueError(
                "editor_scheduler='dpm-solver++' applies to sd-inpaint and sdxl-inpaint only"
            )
        from diffusers import DPMSolverMultistepScheduler

        components["scheduler"] = DPMSolverMultistepScheduler.from_config(
            base.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
        )
    if compile_denoiser:
        if json.loads(key).get("editor_offload", "none") != "none":
            raise ValueError("compile_unet cannot be combined with editor_offload (the offloading "
                             "hooks move weights inside the compiled module)")
        name = _denoiser_name(base)
        components[name] = torch.compile(components[name])
    view = type(base)(**components, **_constructor_settings(base, components))
    view.set_progress_bar_config(disable=True)
    return view


def _constructor_settings(pipe: Any, components: dict[str, Any]) -> dict[str, Any]:
    """The pipeline's own settings that its constructor takes besides the components (SD's
    ``requires_safety_checker``; SDXL's ``requires_aesthetics_score`` and
    ``force_zeros_for_empty_prompt``), as the loaded pipeline has them."""
    import inspect

    names = inspect.signature(type(pipe).__init__).parameters
    return {
        name: pipe.config[name]
        for name in names
        if name not in components and name != "self" and name in pipe.config
    }


def clear_pipeline_cache() -> None:
    """Forget every loaded pipeline (frees memory once no editor holds them)."""
    _pipeline_view.cache_clear()
    _load_pipeline.cache_clear()
    _RUN_LOCKS.clear()


class EditorOutOfMemoryError(RuntimeError):
    """The GPU ran out of memory with one image per batch: only other settings can help."""


# ----------------------------------------------------------------------------------------------
class DiffusersEditor:
    """Shared request handling: validation, grouping by size, batching, per-request seeds,
    prompt embeddings encoded once, and smaller batches when the GPU runs out of memory."""

    name = "diffusers"
    native_size: int = 512  # the resolution the weights were trained at (longer side, pixels)
    # Levers the benchmark switches off to measure them (the defaults are what pays):
    attention = "sdpa"  # PyTorch's fused scaled-dot-product attention; "eager": matmul+softmax
    eager_attention = True  # whether the denoiser takes diffusers' eager AttnProcessor
    reuse_prompt_embeddings = True  # False: the text encoder runs on every call (diffusers' way)
    prompt_cache_size = PROMPT_CACHE_SIZE  # text embeddings kept

    def __init__(self, config: Config, pipeline: Any, multiple: int) -> None:
        self.steps_per_call = config.editor_steps
        self.config = config
        self.pipeline = pipeline
        self.multiple = multiple  # width and height must be multiples of this (latent grid)
        self.device = resolve_device(config)
        self.batch_limit = config.edit_batch  # halved when the GPU runs out of memory
        # One lock per loaded weights: every view of them shares modules whose settings
        # (attention, VAE slicing) and schedulers are set per call.
        self._lock = _RUN_LOCKS.setdefault(_cache_key(config), threading.Lock())
        self._embeddings: OrderedDict[str, Any] = OrderedDict()

    def edit(self, requests: Sequence[EditRequest]) -> list[Image.Image]:
        """One RGB image per request, each the size of its request's image, in order."""
        for request in requests:
            self._check(request)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(request.image.size, []).append(index)
        results: list[Image.Image | None] = [None] * len(requests)
        with self._lock, torch.inference_mode():
            self._configure_modules()
            for (width, height), indices in groups.items():
                pending = list(indices)
                while pending:
                    chunk = pending[: self._chunk_size(len(pending))]
                    outputs = self._run_fitting([requests[i] for i in chunk], width, height)
                    if outputs is None:  # out of memory: batch_limit was halved, try again
                        continue
                    for i, image in zip(chunk, outputs):
                        results[i] = image.convert("RGB")
                    pending = pending[len(chunk) :]
        missing = [i for i, image in enumerate(results) if image is None]
        if missing:  # a pipeline returned fewer images than it was given
            raise RuntimeError(f"{self.name} returned no image for requests {missing}")
        return results  # type: ignore[return-value]

    def _chunk_size(self, count: int) -> int:
        """Requests in the next batch: at most ``batch_limit``, in equal parts (10 at a limit of
        9 are 5 + 5, not 9 + 1: no nearly empty batch that leaves the GPU idle, and a lower
        memory peak)."""
        limit = max(1, self.batch_limit)
        return math.ceil(count / math.ceil(count / limit))

    def _run_fitting(
        self, requests: Sequence[EditRequest], width: int, height: int
    ) -> list[Image.Image] | None:
        """``_run``, or None after halving ``batch_limit`` when the GPU ran out of memory."""
        try:
            return self._run(requests, width, height)
        except torch.OutOfMemoryError as exc:
            detail = str(exc).split(".")[0]
        # Handled here, after the except block: the exception's frames (holding the failed
        # batch's tensors) are released before the retry allocates again.
        if len(requests) <= 1:
            raise EditorOutOfMemoryError(
                f"{self.name}: out of GPU memory editing one {width}x{height} image "
                f"(edit_batch is already down to 1). Lower work_size, use dtype=float16 or "
                f"bfloat16, keep vae_slicing=true, or free the GPU of other processes. "
                f"({detail})"
            )
        self.batch_limit = max(1, len(requests) // 2)
        logger.warning(
            "%s: out of GPU memory with %d images per batch at %dx%d; retrying with %d "
            "(set edit_batch=%d to start there)",
            self.name, len(requests), width, height, self.batch_limit, self.batch_limit,
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None

    def _configure_modules(self) -> None:
        """Apply this editor's attention, VAE slicing and VAE tiling choices to the shared
        modules."""
        denoiser = _unwrap(getattr(self.pipeline, _denoiser_name(self.pipeline)))
        if getattr(denoiser, "_lregions_attention", "sdpa") != self.attention:
            if not self.eager_attention:
                raise ValueError(f"{self.name}: attention {self.attention!r} is not available "
                                 f"(its transformer has attention processors of its own)")
            from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

            kinds = {"sdpa": AttnProcessor2_0, "eager": AttnProcessor}
            if self.attention not in kinds:
                raise ValueError(f"attention must be one of {sorted(kinds)}, got {self.attention!r}")
            denoiser.set_attn_processor(kinds[self.attention]())
            denoiser._lregions_attention = self.attention
        vae = getattr(self.pipeline, "vae", None)
        if vae is not None and hasattr(vae, "use_slicing"):
            vae.use_slicing = self.config.vae_slicing
        if vae is not None and hasattr(vae, "use_tiling"):
            vae.use_tiling = self.config.vae_tiling

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

    def _text_embeddings(self, texts: Sequence[str]) -> list[Any]:
        """Each text's embedding, cached. A text is encoded alone, so its embedding never
        depends on what else is in the batch (nor does the edit)."""
        found: dict[str, Any] = {}
        for text in dict.fromkeys(texts):
            if text in self._embeddings:
                self._embeddings.move_to_end(text)
                found[text] = self._embeddings[text]
            else:
                found[text] = self._encode_text(text)
        self._embeddings.update(found)
        while len(self._embeddings) > self.prompt_cache_size:
            self._embeddings.popitem(last=False)
        return [found[text] for text in texts]

    def _encode_text(self, text: str) -> Any:
        raise NotImplementedError

    def _run(self, requests: Sequence[EditRequest], width: int, height: int) -> list[Image.Image]:
        raise NotImplementedError


class SDInpaintEditor(DiffusersEditor):
    """Stable Diffusion inpainting: the repainted region starts from pure noise (strength 1)."""

    name = "sd-inpaint"
    native_size = 512  # SD 2 inpainting

    def _encode_text(self, text: str) -> torch.Tensor:
        device = self.pipeline._execution_device
        return self.pipeline.encode_prompt(text, device, 1, False)[0]  # (1, 77, D)

    def _run(self, requests: Sequence[EditRequest], width: int, height: int) -> list[Image.Image]:
        images, masks, prompts, generators = self._inputs(requests)
        text: dict[str, Any] = {"prompt": prompts}
        if self.reuse_prompt_embeddings:
            text = {"prompt_embeds": torch.cat(self._text_embeddings(prompts))}
            if self.config.guidance_scale > 1.0:  # diffusers' condition for guidance
                empty = self._text_embeddings([""] * len(prompts))
                text["negative_prompt_embeds"] = torch.cat(empty)
        return self.pipeline(
            **text,
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
    native_size = 512  # aMUSEd 512

    def _encode_text(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        from lregions_core.models.amused_sampling import encode_text

        return encode_text(self.pipeline, [text], self.pipeline._execution_device)

    def _texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from lregions_core.models.amused_sampling import encode_text

        if not self.reuse_prompt_embeddings:
            return encode_text(self.pipeline, texts, self.pipeline._execution_device)
        pooled, hidden = zip(*self._text_embeddings(texts))
        return torch.cat(pooled), torch.cat(hidden)

    def _run(self, requests: Sequence[EditRequest], width: int, height: int) -> list[Image.Image]:
        from lregions_core.models.amused_sampling import amused_inpaint

        images, masks, prompts, generators = self._inputs(requests)
        guided = self.config.guidance_scale > 1.0
        return amused_inpaint(
            self.pipeline,
            images,
            masks,
            self._texts(prompts),
            self._texts([""] * len(prompts)) if guided else None,
            generators,
            num_inference_steps=self.config.editor_steps,
            guidance_scale=self.config.guidance_scale,
        )


@EDITORS.register("sd-inpaint")
def build_sd_inpaint(config: Config) -> SDInpaintEditor:
    """Stable Diffusion inpainting (default: SD 2 inpainting), one pipeline per process."""
    config = config.replace(editor="sd-inpaint")
    pipe = editor_pipeline(config)
    return SDInpaintEditor(config, pipe, multiple=int(pipe.vae_scale_factor))


@EDITORS.register("amused")
def build_amused(config: Config) -> AmusedEditor:
    """aMUSEd inpainting (default preset: amused/amused-512), one pipeline per process."""
    config = config.replace(editor="amused")
    if config.vae_tiling:
        raise ValueError("vae_tiling applies to sd-inpaint, sdxl-inpaint and flux-fill; "
                         "aMUSEd's VQ-GAN has no tiled mode")
    pipe = editor_pipeline(config)
    down = 2 if pipe.transformer.config.downsample else 1  # the transformer halves the grid again
    return AmusedEditor(config, pipe, multiple=int(pipe.vae_scale_factor) * down)


# The SDXL and FLUX editors register themselves (imported last: they build on the above).
from lregions_core.models import editors_xl  # noqa: F401
