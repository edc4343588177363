"""CLIP (open_clip) scorer: the method's three losses and the selection similarities.

Registered as ``"clip"`` in :data:`~lregions_core.registry.SCORERS`. The model is built once per
process for a given set of settings (see :func:`load_clip`), and text embeddings are computed
once per text per loaded model.

Pixels: every image (source and candidates alike) goes PIL uint8 -> float in [0, 1] -> resize ->
CLIP mean/std, through the same functions. The reference mixed 0..255 and 0..1 inputs; here
there is one path. The *full view* squashes the whole image to the model's square input (no
centre crop, so nothing the editor changed is cut away); the other views are random augmented
crops that depend only on the candidate's seed.

Architectures: ``clip_model`` names an open_clip config (e.g. ``ViT-B-16``, which also picks the
tokenizer); ``clip_kwargs`` are open_clip's top-level model-config overrides (``embed_dim``,
``vision_cfg``, ``text_cfg`` replace the named config's entries). The tiny preset uses this to
build a small random ViT with the real CLIP tokenizer, without registering a new config.

Thread safety: safe to call concurrently (the batch's task threads and the evaluator share one
loaded model). Forward passes keep no state on the model (the structure tokens come from
open_clip's ``forward_intermediates``, not from hooks); the tokenizer (a Hugging Face fast
tokenizer for some models, which refuses concurrent calls) and the text-embedding cache, a
bounded LRU, are used under the bundle's lock (a text two threads miss at once is encoded twice, with the same
result); the augmented views seed torch's global generator inside
:func:`~lregions_core.models.runtime.seeded`, which serialises them, so each candidate's views
depend on its own seed alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from lregions_core.config import Config
from lregions_core.interfaces import CandidateScores
from lregions_core.loading import heavy_import, load_once
from lregions_core.models.runtime import resolve_device, resolve_dtype, seeded
from lregions_core.models.weights import WeightsUnavailableError, local_path
from lregions_core.registry import SCORERS

NEUTRAL_SOURCE_PROMPT = "a photo"  # T_src when the user gives no source caption
ENCODE_BATCH = 64  # images per CLIP forward (bounds memory for many candidates x views)
WEIGHT_FILES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors", "model.safetensors")
PRECISIONS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
TEXT_CACHE_SIZE = 4096  # text embeddings kept per loaded model (a batch's prompts, bounded)


@dataclass
class ClipBundle:
    """One loaded CLIP model, its tokenizer and preprocessing, and its text-embedding cache
    (least recently used first; read and written only under ``lock``)."""

    model: Any
    tokenizer: Any
    image_size: int
    mean: torch.Tensor  # (3, 1, 1)
    std: torch.Tensor  # (3, 1, 1)
    depth: int  # visual transformer blocks
    text_cache: OrderedDict[str, torch.Tensor] = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _settings_key(config: Config) -> str:
    """The settings that decide the loaded model, as a hashable string for the cache."""
    return json.dumps(
        {
            "model": config.clip_model,
            "pretrained": None if config.random_weights else config.clip_pretrained,
            "kwargs": config.clip_kwargs,
            "weights_dir": config.weights_dir,
            "device": str(resolve_device(config)),
            "dtype": str(resolve_dtype(config)).removeprefix("torch."),
        },
        sort_keys=True,
    )


def _local_checkpoint(weights_dir: str | None, name: str) -> str | None:
    """A checkpoint file for ``name`` under ``weights_dir`` (the file, or one in its folder)."""
    path = local_path(weights_dir, name)
    if path is None:
        return None
    if path.is_file():
        return str(path)
    for file in WEIGHT_FILES:
        if (path / file).is_file():
            return str(path / file)
    raise FileNotFoundError(f"no {' / '.join(WEIGHT_FILES)} in {path}")


@contextlib.contextmanager
def _quiet_random_init(asked_for_random: bool):
    """open_clip warns "No pretrained weights loaded" on the root logger; when random weights
    were asked for (tiny preset, benchmarks) that warning is noise."""
    if not asked_for_random:
        yield
        return
    root = logging.getLogger()
    silence = logging.Filter()
    silence.filter = lambda record: "No pretrained weights loaded" not in record.getMessage()
    root.addFilter(silence)
    try:
        yield
    finally:
        root.removeFilter(silence)


@load_once()
def load_clip(key: str) -> ClipBundle:
    """Build (or load) the open_clip model described by ``key`` (see :func:`_settings_key`)."""
    open_clip = heavy_import("open_clip")
    settings: dict[str, Any] = json.loads(key)
    name: str = settings["model"]
    pretrained: str | None = settings["pretrained"]
    if open_clip.get_model_config(name) is None:
        raise ValueError(f"unknown open_clip model {name!r}; see open_clip.list_models()")
    weights_name = f"{name}/{pretrained}"
    if pretrained:
        # open_clip takes a checkpoint file path in place of a tag (loaded weights_only).
        pretrained = _local_checkpoint(settings["weights_dir"], weights_name) or pretrained
    # Random init draws from the global RNG: fork it so building neither disturbs the caller's
    # stream nor differs between processes.
    with seeded(), _quiet_random_init(not pretrained):
        try:
            # create_model, not create_model_and_transforms: its transforms centre-crop, and
            # the scorer does its own preprocessing (see the module docstring).
            model = open_clip.create_model(
                name,
                pretrained=pretrained,
                precision=PRECISIONS[settings["dtype"]],
                device=settings["device"],
                **settings["kwargs"],
            )
        except (OSError, RuntimeError) as exc:
            if not pretrained:
                raise
            raise WeightsUnavailableError("CLIP scorer", weights_name, exc) from exc
    model.eval().requires_grad_(False)
    visual = model.visual
    if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
        raise ValueError(f"{name}: the scorer needs an open_clip ViT image tower")
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size", visual.image_size)
    size = size if isinstance(size, int) else size[0]
    return ClipBundle(
        model=model,
        tokenizer=open_clip.get_tokenizer(name),  # truncates to its context length (77)
        image_size=int(size),
        mean=torch.tensor(cfg["mean"], dtype=torch.float32).view(3, 1, 1),
        std=torch.tensor(cfg["std"], dtype=torch.float32).view(3, 1, 1),
        depth=len(visual.transformer.resblocks),
    )


@dataclass(frozen=True, eq=False)
class ClipContext:
    """What all candidates of one source share (float32, on the model's device)."""

    prompt: str
    source_prompt: str
    text_embedding: torch.Tensor  # (D,) L2-normalised E_txt(T)
    text_direction: torch.Tensor  # (D,) E_txt(T) - E_txt(T_src)
    source_embedding: torch.Tensor  # (D,) L2-normalised E_img(X), full view
    source_selfsim: torch.Tensor  # (N, N) cosine self-similarity of X's patch tokens


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of (B, D) ``a`` with (D,) ``b``; 0 where either is the zero vector."""
    norms = a.norm(dim=-1) * b.norm()
    return (a @ b) / norms.clamp_min(1e-12)


class ClipScorer:
    """A :class:`~lregions_core.interfaces.Scorer` over an open_clip ViT."""

    # Resize and augment on the model's device (on a GPU this keeps 16 views x candidates of
    # CPU image warping off the critical path); False: on the CPU, a benchmark lever.
    augment_on_device = True

    def __init__(self, config: Config) -> None:
        self.config = config
        self.bundle = load_clip(_settings_key(config))
        self.name = f"clip:{config.clip_model}/{config.clip_pretrained}"
        self.image_size = self.bundle.image_size
        # Tokens after this many blocks feed L_str (clamped to the model's depth).
        self.structure_layer = min(max(1, config.clip_structure_layer), self.bundle.depth)
        visual = self.bundle.model.visual
        self.device = next(visual.parameters()).device
        conv = getattr(visual, "conv1", None)
        self.input_dtype = (
            conv.weight.dtype if conv is not None else next(visual.parameters()).dtype
        )
        # The difference of two normalised embeddings below this norm is numerical noise
        # (batch-size dependent kernels), not an edit direction.
        self.zero_delta = 1e-4 if self.input_dtype == torch.float32 else 5e-3
        self.mean = self.bundle.mean.to(self.device)
        self.std = self.bundle.std.to(self.device)
        self._augment = self._build_augment()

    # --- pixels -----------------------------------------------------------------------------
    @staticmethod
    def pixels(image: Image.Image) -> torch.Tensor:
        """(3, H, W) float32 in [0, 1] from a PIL image (uint8 0..255), on the CPU."""
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    def full_view(self, pixels: torch.Tensor) -> torch.Tensor:
        """The whole image squashed to the model's square input, still in [0, 1]."""
        v2 = heavy_import("torchvision.transforms.v2")
        F = heavy_import("torchvision.transforms.v2.functional")

        size = [self.image_size, self.image_size]
        out = F.resize(pixels, size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        return out.clamp_(0.0, 1.0)  # bicubic overshoots

    def _build_augment(self) -> Any:
        v2 = heavy_import("torchvision.transforms.v2")
        return v2.Compose(
            [
                v2.RandomResizedCrop(self.image_size, scale=(0.6, 1.0), antialias=True),
                v2.RandomHorizontalFlip(p=0.5),
                v2.RandomAffine(degrees=10, translate=(0.05, 0.05)),
                v2.RandomPerspective(distortion_scale=0.2, p=0.5),
                v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
            ]
        )

    def augmented_views(self, pixels: torch.Tensor, seed: int, count: int) -> list[torch.Tensor]:
        """``count`` random views of ``pixels``; a pure function of the pixels and ``seed``."""
        # v2 transforms draw their parameters from the global CPU generator: fork it, so the
        # views depend only on the seed and the caller's random stream is left untouched.
        with seeded(seed):
            return [self._augment(pixels).clamp_(0.0, 1.0) for _ in range(count)]

    def _normalise(self, views: torch.Tensor) -> torch.Tensor:
        x = (views.to(self.device) - self.mean) / self.std
        return x.to(dtype=self.input_dtype)

    def _pixels_for_views(self, image: Image.Image) -> torch.Tensor:
        """:meth:`pixels`, on the device where views are made (see ``augment_on_device``)."""
        pixels = self.pixels(image)
        return pixels.to(self.device, non_blocking=True) if self.augment_on_device else pixels

    # --- encoders ---------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, D) L2-normalised float32 text embeddings; a text is encoded once (alone) while
        it stays among the :data:`TEXT_CACHE_SIZE` most recently used."""
        bundle = self.bundle
        with bundle.lock:
            found = {t: bundle.text_cache[t] for t in texts if t in bundle.text_cache}
            for text in found:
                bundle.text_cache.move_to_end(text)
        missing = list(dict.fromkeys(t for t in texts if t not in found))
        # Each text alone, outside the lock (the model itself is safe to share): an embedding
        # then never depends on which other texts happened to be missing from the cache.
        for text in missing:
            with bundle.lock:  # a Hugging Face (Rust) tokenizer refuses concurrent calls
                tokens = bundle.tokenizer([text])
            embedding = bundle.model.encode_text(tokens.to(self.device))
            found[text] = torch.nn.functional.normalize(embedding.float(), dim=-1)[0]
        if missing:
            with bundle.lock:
                bundle.text_cache.update((t, found[t]) for t in missing)
                while len(bundle.text_cache) > TEXT_CACHE_SIZE:
                    bundle.text_cache.popitem(last=False)
        return torch.stack([found[t] for t in texts])

    @torch.inference_mode()
    def encode_views(self, views: torch.Tensor) -> torch.Tensor:
        """(B, D) L2-normalised float32 embeddings of (B, 3, S, S) views in [0, 1]."""
        out = [
            self.bundle.model.encode_image(self._normalise(chunk)).float()
            for chunk in views.split(ENCODE_BATCH)
        ]
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    @torch.inference_mode()
    def encode_full(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (B, D) and patch-token self-similarities (B, N, N) of full views."""
        embeddings, selfsims = [], []
        for chunk in views.split(ENCODE_BATCH):
            out = self.bundle.model.visual.forward_intermediates(
                self._normalise(chunk),
                indices=[self.structure_layer - 1],  # output of block `structure_layer`
                output_fmt="NLC",  # (B, N_patches, C), class token already split off
            )
            embeddings.append(out["image_features"].float())
            tokens = torch.nn.functional.normalize(out["image_intermediates"][0].float(), dim=-1)
            selfsims.append(tokens @ tokens.transpose(1, 2))
        return torch.nn.functional.normalize(torch.cat(embeddings), dim=-1), torch.cat(selfsims)

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(B, D) full-view embeddings of PIL images: the path source and candidates share."""
        views = torch.stack([self.full_view(self._pixels_for_views(im)) for im in images])
        return self.encode_full(views)[0]

    # --- Scorer protocol --------------------------------------------------------------------
    @torch.inference_mode()
    def prepare(self, source: Image.Image, prompt: str, source_prompt: str | None) -> ClipContext:
        """Text embeddings, the source's embedding and self-similarity, computed once."""
        src_text = source_prompt.strip() if source_prompt and source_prompt.strip() else None
        src_text = src_text or NEUTRAL_SOURCE_PROMPT
        text, text_src = self.encode_text([prompt, src_text])
        embedding, selfsim = self.encode_full(self.full_view(self._pixels_for_views(source))[None])
        return ClipContext(
            prompt=prompt,
            source_prompt=src_text,
            text_embedding=text,
            text_direction=text - text_src,
            source_embedding=embedding[0],
            source_selfsim=selfsim[0],
        )

    @torch.inference_mode()
    def score(
        self, context: ClipContext, candidates: Sequence[Image.Image], seeds: Sequence[int]
    ) -> list[CandidateScores]:
        """Losses and similarities of each candidate against ``context`` (batched)."""
        if len(candidates) != len(seeds):
            raise ValueError(f"{len(candidates)} candidates but {len(seeds)} seeds")
        if not candidates:
            return []
        pixels = [self._pixels_for_views(im) for im in candidates]
        full = torch.stack([self.full_view(p) for p in pixels])
        embeddings, selfsims = self.encode_full(full)  # (B, D), (B, N, N)

        extra = self.config.clip_views - 1
        sims = embeddings @ context.text_embedding  # view 0 of L_clip, and text_sim
        view_sims = sims[:, None]
        if extra > 0:
            aug = [
                v
                for p, s in zip(pixels, seeds, strict=True)
                for v in self.augmented_views(p, s, extra)
            ]
            aug_emb = self.encode_views(torch.stack(aug)).view(len(candidates), extra, -1)
            view_sims = torch.cat([view_sims, aug_emb @ context.text_embedding], dim=1)
        loss_clip = 1.0 - view_sims.mean(dim=1)

        delta = embeddings - context.source_embedding
        loss_dir = 1.0 - _cosine(delta, context.text_direction)
        # An unchanged image has no direction: define the loss as 1 (cosine 0), not NaN/noise.
        loss_dir = torch.where(delta.norm(dim=-1) <= self.zero_delta, 1.0, loss_dir)
        loss_str = ((selfsims - context.source_selfsim) ** 2).mean(dim=(1, 2))
        image_sim = embeddings @ context.source_embedding

        rows = torch.stack([loss_clip, loss_dir, loss_str, sims, image_sim], dim=1).cpu().tolist()
        return [
            CandidateScores(loss_clip=lc, loss_dir=ld, loss_str=ls, text_sim=ts, image_sim=im)
            for lc, ld, ls, ts, im in rows
        ]


@SCORERS.register("clip")
def build_clip(config: Config) -> ClipScorer:
    """The ``"clip"`` scorer for ``config`` (model and text embeddings shared per process)."""
    return ClipScorer(config)
