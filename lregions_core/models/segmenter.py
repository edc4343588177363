"""Text-prompted segmentation (``"clipseg"``): which pixels of a crop show what a text names.

The region learner finds a *box*; with ``region_shape`` "mask" or "auto" the pipeline asks a
:class:`~lregions_core.interfaces.Segmenter` which pixels inside that box belong to the object
the source caption names, and edits only those. This module provides CLIPSeg (Lüddecke & Ecker,
"Image Segmentation Using Text and Image Prompts", CVPR 2022) through transformers'
``CLIPSegForImageSegmentation``.

Weights: ``segmenter_model`` (default ``CIDAS/clipseg-rd64-refined``) is looked up as
``<weights_dir>/<org--name>`` first, then in the Hugging Face cache (``lregions download`` fills
either), safetensors only; when neither has it, :class:`WeightsUnavailableError` says so. With
``random_weights`` the model is built in code instead, from ``segmenter_kwargs["architecture"]``:
``"tiny"`` (tests, the smoke run) or ``"full"`` (the rd64-refined architecture with random
weights, for speed and memory measurements; the default). Random weights are initialised under a
fixed seed, so every build in every process is the same model.

Pixels: each crop is squashed to the square input the model expects (CLIPSeg's decoder needs a
square patch grid), rescaled to [0, 1] and normalised with ImageNet's mean and standard deviation,
by the same image-processor class and settings as the published checkpoint's
``preprocessor_config.json`` (352 x 352 px, bilinear). The map comes back as the sigmoid of the
logits, resized bilinearly to the crop's own size.

Batch independence: every text is encoded alone (and cached), and the model has no randomness at
inference, so a map depends on its own image and text only; batched and single runs agree up to
float rounding of batched kernels.

Thread safety: serialised. One call at a time per loaded model (``ClipSegBundle.lock``, held for
the whole call): the tokenizer (a Rust tokenizer refuses concurrent use) and the text cache are
shared, and the GPU work is serial anyway.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from lregions_core.config import Config
from lregions_core.loading import heavy_import, load_once
from lregions_core.models.runtime import resolve_device, resolve_dtype, seeded
from lregions_core.models.weights import WeightsUnavailableError, local_path
from lregions_core.registry import SEGMENTERS

ARCHITECTURES = ("tiny", "full")
SEGMENT_BATCH = 16  # images per CLIPSeg forward pass
TEXT_CACHE_SIZE = 256  # text embeddings kept per loaded model (projection_dim floats each)

# The published checkpoint's image preprocessing (CIDAS/clipseg-rd64-refined,
# preprocessor_config.json: a ViTImageProcessor with these settings).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RD64_INPUT_SIZE = 352  # its processor's size; the ViT's position grid (224 px) is interpolated

# CIDAS/clipseg-rd64-refined's architecture (config.json): a CLIP ViT-B/16 with a 64-wide
# decoder fed by blocks 3, 6 and 9, and the "refined" (conv + two transposed convs) head.
RD64_REFINED = {
    "text": {
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_attention_heads": 8,
        "num_hidden_layers": 12,
    },
    "vision": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "image_size": 224,
        "patch_size": 16,
    },
    "projection_dim": 512,
    "reduce_dim": 64,
    "extract_layers": [3, 6, 9],
    "decoder_num_attention_heads": 4,
    "decoder_intermediate_size": 2048,
    "use_complex_transposed_convolution": True,
    "input_size": RD64_INPUT_SIZE,
}
# The same structure, small: 2 + 2 blocks of width 32, a 16-wide decoder fed by both vision
# blocks, 64 px inputs (a 4 x 4 grid of 16 px patches) and the refined head. About 1.6 M
# parameters, nearly all of them the text tower's 49408-token embedding.
TINY = {
    "text": {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
    },
    "vision": {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "image_size": 64,
        "patch_size": 16,
    },
    "projection_dim": 32,
    "reduce_dim": 16,
    "extract_layers": [0, 1],
    "decoder_num_attention_heads": 2,
    "decoder_intermediate_size": 32,
    "use_complex_transposed_convolution": True,
    "input_size": 64,
}
_SPECS = {"tiny": TINY, "full": RD64_REFINED}


def _architecture(config: Config) -> str:
    architecture = str(config.segmenter_kwargs.get("architecture", "full"))
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"segmenter architecture must be one of {ARCHITECTURES}, got {architecture!r}"
        )
    return architecture


def _settings_key(config: Config) -> str:
    """The settings that decide the loaded model, as a hashable string for the cache."""
    data = {
        "segmenter_model": config.segmenter_model,
        "segmenter_kwargs": config.segmenter_kwargs,
        "random_weights": config.random_weights,
        "weights_dir": config.weights_dir,
        "device": str(resolve_device(config)),  # "auto" and "cpu" may be the same model
        "dtype": str(resolve_dtype(config)).removeprefix("torch."),
    }
    return json.dumps(data, sort_keys=True, default=str)


@dataclass(eq=False)
class ClipSegBundle:
    """One loaded CLIPSeg model with its tokenizer, image processor and text-embedding cache."""

    model: Any
    tokenizer: Any
    image_processor: Any
    device: torch.device
    dtype: torch.dtype
    lock: threading.Lock = field(default_factory=threading.Lock)
    text_cache: OrderedDict[str, torch.Tensor] = field(default_factory=OrderedDict)


def clipseg_config(architecture: str) -> Any:
    """The ``CLIPSegConfig`` of a random-weight build (see :data:`TINY`, :data:`RD64_REFINED`).
    Token ids match the offline CLIP tokenizer, so the text tower pools at ``<|endoftext|>``."""
    transformers = heavy_import("transformers")
    spec = _SPECS[architecture]
    text = {
        **spec["text"],
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }
    top = {k: v for k, v in spec.items() if k not in ("text", "vision", "input_size")}
    return transformers.CLIPSegConfig(text_config=text, vision_config=dict(spec["vision"]), **top)


def _random_parts(architecture: str) -> tuple[Any, Any, Any]:
    """Model, tokenizer and image processor built in code (random weights, no download)."""
    from lregions_core.models.tokenizer import clip_tokenizer_offline

    transformers = heavy_import("transformers")
    size = _SPECS[architecture]["input_size"]
    with seeded():
        model = transformers.CLIPSegForImageSegmentation(clipseg_config(architecture))
        # transformers draws the decoder's linear and conv weights with standard deviation 1,
        # which saturates the sigmoid (logits in the hundreds: maps of 0s and 1s); PyTorch's
        # own initialisation keeps the random maps graded.
        for module in model.decoder.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                module.reset_parameters()
    image_processor = transformers.ViTImageProcessor(
        do_resize=True,
        size={"height": size, "width": size},
        resample=2,  # PIL bilinear, as in the published preprocessor_config.json
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    return model, clip_tokenizer_offline(77), image_processor


def _pretrained_parts(settings: dict[str, Any], dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """Model, tokenizer and image processor from ``weights_dir`` or the hub cache."""
    transformers = heavy_import("transformers")
    from huggingface_hub.errors import EntryNotFoundError

    name = settings["segmenter_model"]
    source = str(local_path(settings["weights_dir"], name) or name)
    # Other segmenter_kwargs (revision, ...) go to from_pretrained; "architecture" is ours.
    options = {k: v for k, v in settings["segmenter_kwargs"].items() if k != "architecture"}
    revision = {"revision": options["revision"]} if "revision" in options else {}
    try:
        model = transformers.CLIPSegForImageSegmentation.from_pretrained(
            source, dtype=dtype, use_safetensors=True, **options
        )
        processor = transformers.CLIPSegProcessor.from_pretrained(source, **revision)
    except (OSError, EntryNotFoundError) as exc:  # hub, HTTP, offline and file errors
        raise WeightsUnavailableError("segmenter", name, exc) from exc
    return model, processor.tokenizer, processor.image_processor


@load_once()
def load_clipseg(key: str) -> ClipSegBundle:
    """Build (or load) the CLIPSeg model described by ``key`` (see :func:`_settings_key`), once
    per process and settings; concurrent callers wait for the one load."""
    settings: dict[str, Any] = json.loads(key)
    device, dtype = torch.device(settings["device"]), getattr(torch, settings["dtype"])
    if settings["random_weights"]:
        architecture = str(settings["segmenter_kwargs"].get("architecture", "full"))
        model, tokenizer, image_processor = _random_parts(architecture)
        model = model.to(dtype=dtype)  # built in float32
    else:
        model, tokenizer, image_processor = _pretrained_parts(settings, dtype)
    model = model.to(device).eval().requires_grad_(False)
    return ClipSegBundle(model, tokenizer, image_processor, device, dtype)


def clear_segmenter_cache() -> None:
    """Forget every loaded segmenter model (frees memory once no segmenter holds one)."""
    load_clipseg.cache_clear()


def check_inputs(images: Sequence[Image.Image], texts: Sequence[str]) -> None:
    """One non-empty text per non-empty image, or a ValueError saying what is wrong."""
    if len(images) != len(texts):
        raise ValueError(
            f"segment needs one text per image, got {len(images)} images and {len(texts)} texts"
        )
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"segment: text {index} is empty ({text!r}); name what to segment")
    for index, image in enumerate(images):
        if image.width < 1 or image.height < 1:
            raise ValueError(f"segment: image {index} is empty ({image.width}x{image.height})")


# ----------------------------------------------------------------------------------------------
class ClipSegSegmenter:
    """A :class:`~lregions_core.interfaces.Segmenter` over transformers' CLIPSeg."""

    name = "clipseg"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.bundle = load_clipseg(_settings_key(config))
        self.batch_size = SEGMENT_BATCH

    def segment(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[np.ndarray]:
        """For each (image, text) pair, a float32 (H, W) map in [0, 1] at the image's size."""
        check_inputs(images, texts)
        maps: list[np.ndarray] = []
        bundle = self.bundle
        # One call at a time per loaded model: the text cache is shared, GPU work serial anyway.
        with bundle.lock, torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                chunk = slice(start, start + self.batch_size)
                maps.extend(self._segment(images[chunk], texts[chunk]))
        return maps

    def _segment(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[np.ndarray]:
        bundle = self.bundle
        rgb = [image.convert("RGB") for image in images]
        pixels = bundle.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(bundle.device, bundle.dtype)
        embeddings = torch.cat(self._text_embeddings(texts))
        logits = bundle.model(pixel_values=pixels, conditional_embeddings=embeddings).logits
        # CLIPSeg squeezes its channel dimension; some releases squeeze the batch of one too.
        logits = logits.reshape(len(rgb), *logits.shape[-2:]).float()
        probabilities = torch.sigmoid(logits)
        maps = []
        for probability, image in zip(probabilities, rgb):
            resized = torch.nn.functional.interpolate(
                probability[None, None],
                size=(image.height, image.width),
                mode="bilinear",
                align_corners=False,
            )[0, 0]
            maps.append(resized.clamp_(0.0, 1.0).cpu().numpy().astype(np.float32, copy=False))
        return maps

    def _text_embeddings(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Each text's conditional embedding (1, projection_dim), cached. A text is encoded
        alone, so neither its padding nor its embedding depends on the batch."""
        cache = self.bundle.text_cache
        found: dict[str, torch.Tensor] = {}
        for text in dict.fromkeys(texts):
            if text in cache:
                cache.move_to_end(text)
                found[text] = cache[text]
            else:
                found[text] = self._encode_text(text)
        cache.update(found)
        while len(cache) > TEXT_CACHE_SIZE:
            cache.popitem(last=False)
        return [found[text] for text in texts]

    def _encode_text(self, text: str) -> torch.Tensor:
        bundle = self.bundle
        tokens = bundle.tokenizer(
            [text], padding=True, truncation=True, max_length=77, return_tensors="pt"
        )
        return bundle.model.get_conditional_embeddings(
            batch_size=1,
            input_ids=tokens["input_ids"].to(bundle.device),
            attention_mask=tokens["attention_mask"].to(bundle.device),
        )


@SEGMENTERS.register("clipseg")
def build_clipseg(config: Config) -> ClipSegSegmenter:
    """CLIPSeg (default: CIDAS/clipseg-rd64-refined), one model per process and settings."""
    if config.random_weights:
        _architecture(config)  # a clear error for an unknown architecture, before any work
    return ClipSegSegmenter(config)
