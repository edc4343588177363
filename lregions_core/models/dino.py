"""DINO (timm ViT) features: the last block's CLS-to-patch attention and the final patch tokens.

Registered as ``"dino"`` in :data:`~lregions_core.registry.FEATURE_EXTRACTORS`. The model is
built once per process for a given set of settings (see :func:`load_dino`), so every extractor
built from equal settings shares it.

Thread safety: safe to call concurrently (the batch's task threads and the evaluator share one
model). A call keeps everything it computes in its own tensors: the last block's input comes
from timm's ``forward_intermediates`` (the output of the block before it), never from a hook or
any other state on the shared module, so one photo's call can never see another's tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lregions_core.config import Config
from lregions_core.interfaces import Features
from lregions_core.loading import heavy_import, load_once
from lregions_core.models.runtime import resolve_device, resolve_dtype, seeded
from lregions_core.models.weights import WeightsUnavailableError, local_path
from lregions_core.registry import FEATURE_EXTRACTORS

# A local weights folder may hold any of these (timm / Hugging Face / open_clip naming).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _weights_file(path: Path) -> Path:
    """The checkpoint file for a local ``path`` (a file, or a folder holding one)."""
    if path.is_file():
        return path
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"no {' / '.join(WEIGHT_FILES)} in {path}")


def _settings_key(config: Config) -> str:
    """The settings that decide the loaded model, as a hashable string for the cache."""
    return json.dumps(
        {
            "model": config.feature_model,
            "kwargs": config.feature_kwargs,
            "random": config.random_weights,
            "weights_dir": config.weights_dir,
            "device": str(resolve_device(config)),
            "dtype": str(resolve_dtype(config)).removeprefix("torch."),
        },
        sort_keys=True,
    )


@load_once()
def load_dino(key: str) -> torch.nn.Module:
    """Build (or load) the timm model described by ``key`` (see :func:`_settings_key`), once."""
    timm = heavy_import("timm")
    settings: dict[str, Any] = json.loads(key)
    name: str = settings["model"]
    kwargs: dict[str, Any] = dict(num_classes=0, dynamic_img_size=True, **settings["kwargs"])
    pretrained = not settings["random"]
    if pretrained:
        local = local_path(settings["weights_dir"], name)
        if local is not None:
            # timm's file loader uses torch.load(weights_only=True) for .bin and applies the
            # model's checkpoint filter (position-embedding resampling, key renames).
            kwargs["pretrained_cfg_overlay"] = {"file": str(_weights_file(local))}
    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}")
    # Random init draws from the global RNG: fork it so building neither disturbs the caller's
    # stream nor differs between processes.
    with seeded():
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except (OSError, RuntimeError) as exc:
            if not pretrained:
                raise
            raise WeightsUnavailableError("feature extractor", name, exc) from exc
    model.eval().requires_grad_(False)
    return model.to(device=settings["device"], dtype=getattr(torch, settings["dtype"]))


def _last_block_cls_attention(block: torch.nn.Module, x: torch.Tensor, prefix: int) -> torch.Tensor:
    """(B, N_patches) CLS-to-patch attention of ``block`` for its input ``x``, mean over heads.

    timm's fused attention never materialises the weights, so they are recomputed from the
    block's own qkv projection (same maths as its non-fused path), in float32.
    """
    attn = block.attn
    if getattr(attn, "qkv", None) is None:
        raise NotImplementedError(f"{type(attn).__name__} has no fused qkv projection")
    b, n, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
    q, k = attn.q_norm(q).float(), attn.k_norm(k).float()
    # Only the CLS query row is needed: softmax over all keys (prefix tokens included, as in
    # the model), then keep the patch keys.
    logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # (B, heads, 1, N)
    weights = logits.softmax(dim=-1)[:, :, 0, prefix:]
    return weights.mean(dim=1)


class DinoFeatures:
    """A :class:`~lregions_core.interfaces.FeatureExtractor` over a timm ViT (DINO weights)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.model = load_dino(_settings_key(config))
        self.name = f"dino:{config.feature_model}"
        patch = self.model.patch_embed.patch_size
        if patch[0] != patch[1]:
            raise ValueError(f"non-square patches {patch} are not supported")
        self.patch_size = int(patch[0])
        if getattr(self.model, "cls_token", None) is None:
            raise ValueError(f"{config.feature_model} has no CLS token to take attention from")
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        self.mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(3, 1, 1)
        self.std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(3, 1, 1)

    def input_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the model sees: longer side ``feature_size``, aspect kept, each side
        a multiple of the patch size (at least one patch)."""
        p, target = self.patch_size, self.config.feature_size
        scale = target / max(width, height)
        w, h = (max(1, math.floor(side * scale / p + 0.5)) * p for side in (width, height))
        return w, h

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """(1, 3, H, W) normalised input tensor on the model's device and dtype."""
        size = self.input_size(*image.size)
        resized = image.convert("RGB").resize(size, Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)
        x = (pixels.permute(2, 0, 1) - self.mean) / self.std
        param = next(self.model.parameters())
        return x.unsqueeze(0).to(device=param.device, dtype=param.dtype)

    @torch.inference_mode()
    def __call__(self, image: Image.Image) -> Features:
        x = self.preprocess(image)
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        prefix = int(self.model.num_prefix_tokens)  # CLS + register tokens
        blocks = len(self.model.blocks)
        if blocks < 2:
            raise ValueError(f"{self.config.feature_model} has {blocks} block: the attention is "
                             "taken from the last block's input, so at least 2 are needed")
        # The output of the second-to-last block is the last block's input, whatever the model
        # does before its blocks (position embedding interpolation, register tokens, norm_pre);
        # the final output is forward_features' (final norm applied).
        out = self.model.forward_intermediates(
            x, indices=[blocks - 2], return_prefix_tokens=True, output_fmt="NLC",
            output_dict=True)
        tokens = out["image_features"]  # (1, prefix + gh*gw, C)
        last_input = torch.cat([out["image_intermediates_prefix"][0],
                                out["image_intermediates"][0]], dim=1)
        attention = _last_block_cls_attention(self.model.blocks[-1], last_input, prefix)
        if attention.shape[-1] != gh * gw or tokens.shape[1] != prefix + gh * gw:
            raise RuntimeError(
                f"DINO features of a {image.width}x{image.height} image (model input "
                f"{x.shape[-1]}x{x.shape[-2]}, a {gw}x{gh} grid of {self.patch_size} px "
                f"patches + {prefix} prefix tokens): the model returned {tokens.shape[1]} "
                f"tokens and {attention.shape[-1]} attention weights")
        # Tokens are in row-major patch order, so (gh*gw, C) -> (gh, gw, C) -> (C, gh, gw).
        patches = tokens[0, prefix:].float().reshape(gh, gw, -1).permute(2, 0, 1)
        return Features(
            attention=attention[0].reshape(gh, gw).cpu().numpy().astype(np.float32),
            patches=np.ascontiguousarray(patches.cpu().numpy(), dtype=np.float32),
        )


@FEATURE_EXTRACTORS.register("dino")
def build_dino(config: Config) -> DinoFeatures:
    """The ``"dino"`` feature extractor for ``config`` (model shared per process)."""
    return DinoFeatures(config)
