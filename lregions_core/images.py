"""Image input/output and the geometry between the input image and the editor's working size.

* :func:`load_image` turns any readable file, fsspec URL or byte string into a fully loaded RGB
  image, and every way of failing into one typed :class:`ImageLoadError`.
* :func:`working_size` / :func:`to_working` give the size the editor works at.
* :func:`scale_box`, :func:`box_mask` map boxes between sizes and rasterise them as masks.
* :func:`paste_back` / :func:`paste_region` put the edited region back into the original input,
  leaving every pixel outside ``paste_region`` bit-identical to the input.
* :class:`Matte` (from :func:`box_matte` or an object mask's :func:`mask_matte`) says how much
  of the edit each input pixel takes; :func:`compose` makes the final image with it and
  :func:`edit_layer` the RGBA layer that gives the same final image over the input.

Boxes are ``(x0, y0, x1, y1)`` in pixel-edge coordinates: pixel ``i`` spans ``[i, i + 1]``, so a
box over a whole ``W x H`` image is ``(0, 0, W, H)``.
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lregions_core import remote
from lregions_core.loading import heavy_import

__all__ = [
    "CHANGE_THRESHOLD",
    "MAX_PIXELS",
    "ImageLoadError",
    "Matte",
    "TransientImageError",
    "box_mask",
    "box_matte",
    "changed_pixels",
    "compose",
    "edit_layer",
    "load_image",
    "mask_matte",
    "paste_back",
    "paste_region",
    "render",
    "scale_box",
    "to_working",
    "working_size",
]

_log = logging.getLogger(__name__)

MAX_PIXELS = 80_000_000
"""Default limit on width * height, checked from the header before any pixel is decoded."""

Box = Sequence[float]


class ImageLoadError(ValueError):
    """An input that cannot be read as an image; says which file and what is wrong with it."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"cannot read image {path}: {problem}")

    def __reduce__(self):  # keep the two-argument constructor picklable (worker processes)
        return (type(self), (self.path, self.problem))


class TransientImageError(ImageLoadError):
    """An image URL that could not be read for a reason that may pass (timeouts, broken
    connections, 408, 429, 5xx) after every try: the row fails, and the next run tries again."""

    transient = True


def _read_bytes(source: str | os.PathLike[str]) -> bytes:
    """All bytes of a local path or fsspec URL; the handle is closed before returning."""
    path = os.fspath(source)
    try:
        with fsspec.open(str(path), "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(path, "is a directory, not a file") from None
    except PermissionError as e:
        raise ImageLoadError(path, f"permission denied ({e.strerror or e})") from None
    except (OSError, ValueError, ImportError) as e:
        # fsspec raises ValueError for unknown protocols, ImportError for missing backends.
        raise ImageLoadError(path, f"{type(e).__name__}: {e}") from None


SKIMAGE_PREFIX = "skimage:"
# Callables in skimage.data that are not sample images.
_NOT_SAMPLES = frozenset({"download_all", "file_hash", "lbp_frontal_face_cascade_filename"})


def skimage_sample(name: str):
    """The loader of scikit-image's bundled sample photo ``name`` (``skimage.data.<name>``),
    or None when there is no such sample."""
    data = heavy_import("skimage.data")  # lazy: only callers that use samples pay for it

    if not name.isidentifier() or name.startswith("_") or name in _NOT_SAMPLES:
        return None
    loader = getattr(data, name, None)
    return loader if callable(loader) else None


def read_source(location: str | os.PathLike[str]) -> bytes | np.ndarray:
    """The raw content behind an image location: the file's bytes (local path, fsspec URL, or
    http(s) URL read by :func:`lregions_core.remote.fetch` with timeouts and retries), or the
    pixel array of ``skimage:NAME``. Failures raise :class:`ImageLoadError`; an http(s) read
    that failed for a passing reason raises its subclass :class:`TransientImageError`."""
    path = os.fspath(location)
    if remote.is_http(path):
        try:
            return remote.fetch(path)
        except remote.FetchError as exc:
            error = TransientImageError if exc.transient else ImageLoadError
            raise error(path, exc.detail) from None
    if path.startswith(SKIMAGE_PREFIX):
        loader = skimage_sample(path[len(SKIMAGE_PREFIX) :])
        if loader is None:
            raise ImageLoadError(path, "no such scikit-image sample")
        return loader()
    return _read_bytes(path)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB with sensible values (see :func:`load_image`)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16"):
        # 16-bit data: 65535 -> 255; clipping instead would saturate almost every pixel.
        a = np.asarray(img).astype(np.float64) / 257.0
        return _gray_to_rgb(a)
    if mode == "I":
        # 32-bit ints usually hold 16-bit samples (e.g. TIFF/PNG via older decoders): treat
        # 0..65535 as 16-bit, anything outside that range is stretched like float data.
        a = np.asarray(img).astype(np.float64)
        if a.size and a.min() >= 0 and a.max() <= 65535:
            return _gray_to_rgb(a / 257.0)
        return _gray_to_rgb(_stretch(a))
    if mode == "F":
        return _gray_to_rgb(_stretch(np.asarray(img).astype(np.float64)))
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode == "P":
        return img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels have arbitrary colour underneath; composite over white instead.
        rgba = img.convert("RGBA") if img.mode != "La" else img.convert("LA").convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV and whatever else PIL converts


def _stretch(a: np.ndarray) -> np.ndarray:
    """Scale min..max to 0..255 (NaN/inf ignored); a constant image keeps its clipped value."""
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return np.zeros_like(a)
    lo, hi = float(finite.min()), float(finite.max())
    a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    if hi <= lo:
        return np.clip(a, 0.0, 255.0)
    return (a - lo) * (255.0 / (hi - lo))


def _gray_to_rgb(a: np.ndarray) -> Image.Image:
    g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.stack([g, g, g], axis=-1)), "RGB")


def load_image(
    source: str | os.PathLike[str] | bytes, *, max_pixels: int | None = None
) -> Image.Image:
    """Read ``source`` (local path, fsspec URL, ``skimage:NAME`` or raw bytes) as a fully loaded
    RGB image.

    EXIF orientation is applied. Images over ``max_pixels`` (default :data:`MAX_PIXELS`) are
    refused from their header, before decoding. PIL's own decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``) still applies as a hard error at twice its value; its warning
    level is treated as an error unless the caller raised ``max_pixels`` above it.
    Every failure raises :class:`ImageLoadError`.
    """
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        path, data = "<bytes>", bytes(source)
    else:
        path = os.fspath(source)
        raw = read_source(path)
        if isinstance(raw, np.ndarray):  # a bundled sample: already pixels
            return _to_rgb(Image.fromarray(raw))
        data = raw
    if not data:
        raise ImageLoadError(path, "empty file (0 bytes)")

    pil_limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        # Local only: other code keeps PIL's default warning behaviour.
        if pil_limit is not None and limit <= pil_limit:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
        else:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as opened:
                img = opened
                w, h = img.size
                if w <= 0 or h <= 0:
                    raise ImageLoadError(path, f"zero-size image ({w} x {h})")
                if w * h > limit:
                    raise ImageLoadError(
                        path,
                        f"image too large: {w} x {h} = {w * h} pixels exceeds the limit of "
                        f"{limit} (decompression bomb?)",
                    )
                try:
                    img.load()  # decode now: lazy decoding would hide truncation until later
                except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
                    raise ImageLoadError(path, f"truncated or corrupt image data: {e}") from None
                try:
                    img = ImageOps.exif_transpose(img)
                except Exception as e:  # noqa: BLE001 - broken EXIF must not lose a good image
                    _log.debug("ignoring unusable EXIF orientation in %s: %s", path, e)
                try:
                    out = _to_rgb(img)
                except (ValueError, OSError) as e:
                    raise ImageLoadError(path, f"unsupported mode {img.mode!r}: {e}") from None
                if out is opened:  # leaving the with-block closes it, which drops its pixels
                    out = out.copy()
                out.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageLoadError(path, f"image too large: {e} (decompression bomb?)") from None
        except UnidentifiedImageError:
            raise ImageLoadError(path, "not an image file (unrecognised format)") from None
        except ImageLoadError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
            # Plugins report malformed headers with any of these.
            raise ImageLoadError(path, f"corrupt image header: {e}") from None
    return out


CHANGE_THRESHOLD = 24
"""A pixel counts as changed when any channel moved by more than this (of 255)."""


def changed_pixels(image: np.ndarray, source: np.ndarray) -> np.ndarray:
    """(H, W) bool: where any channel of ``image`` differs from ``source`` by more than
    :data:`CHANGE_THRESHOLD` (both (H, W, 3) arrays of 0..255 values)."""
    # Channel by channel: numpy reduces a length-3 last axis many times slower.
    d = np.abs(np.asarray(image, np.int16) - np.asarray(source, np.int16))
    return (d[..., 0] > CHANGE_THRESHOLD) | (d[..., 1] > CHANGE_THRESHOLD) | (
        d[..., 2] > CHANGE_THRESHOLD)


def _round_multiple(x: float, multiple: int) -> int:
    # floor(x + 0.5) rather than round(): banker's rounding sends 1.5 up but 2.5 down.
    return max(multiple, math.floor(x / multiple + 0.5) * multiple)


def working_size(width: int, height: int, size: int, multiple: int) -> tuple[int, int]:
    """(w, h) the editor works at: longer side scaled to ``size``, aspect ratio kept, each side
    rounded to the nearest multiple of ``multiple`` (at least ``multiple``)."""
    if width <= 0 or height <= 0 or size <= 0 or multiple <= 0:
        raise ValueError(f"working_size needs positive values, got {width, height, size, multiple}")
    scale = size / max(width, height)
    return _round_multiple(width * scale, multiple), _round_multiple(height * scale, multiple)


def to_working(image: Image.Image, size: int, multiple: int) -> Image.Image:
    """``image`` as RGB, resized (Lanczos) to :func:`working_size`."""
    rgb = _to_rgb(image)
    target = working_size(rgb.width, rgb.height, size, multiple)
    if rgb.size == target:
        return rgb.copy()
    return rgb.resize(target, Image.Resampling.LANCZOS)


def scale_box(
    box: Box, from_size: tuple[int, int], to_size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """Map a pixel-edge box on a ``from_size`` image to a ``to_size`` image (x, y scaled apart)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    sx = to_size[0] / from_size[0]
    sy = to_size[1] / from_size[1]
    return x0 * sx, y0 * sy, x1 * sx, y1 * sy


def pixel_box(box: Box, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Integer pixel-edge box covering every pixel ``box`` touches, clipped to ``size``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0 or y1 < y0:
        raise ValueError(f"box must have x0 <= x1 and y0 <= y1, got {tuple(box)}")
    w, h = size
    return (
        min(max(math.floor(x0), 0), w),
        min(max(math.floor(y0), 0), h),
        min(max(math.ceil(x1), 0), w),
        min(max(math.ceil(y1), 0), h),
    )


def box_mask(size: tuple[int, int], box: Box) -> Image.Image:
    """Mode "L" mask of ``size``: 255 on every pixel ``box`` touches, 0 elsewhere."""
    w, h = size
    x0, y0, x1, y1 = pixel_box(box, size)
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y1, x0:x1] = 255
    return Image.fromarray(m, "L")


def input_box(
    source_size: tuple[int, int], box_work: Box, work_size: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    """The working box in input pixels, rounded outward and clipped; None if it covers nothing."""
    x0, y0, x1, y1 = pixel_box(scale_box(box_work, work_size, source_size), source_size)
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def paste_region(
    source_size: tuple[int, int], box_work: Box, work_size: tuple[int, int], feather: int
) -> tuple[int, int, int, int]:
    """Integer rectangle (x0, y0, x1, y1) of the input outside which :func:`paste_back` returns
    the input unchanged: the box rounded outward, grown by ``feather``, clipped.
    ``(0, 0, 0, 0)`` when the box covers no input pixel."""
    if feather < 0:
        raise ValueError(f"feather must be >= 0, got {feather}")
    ib = input_box(source_size, box_work, work_size)
    if ib is None:
        return 0, 0, 0, 0
    w, h = source_size
    x0, y0, x1, y1 = ib
    return max(x0 - feather, 0), max(y0 - feather, 0), min(x1 + feather, w), min(y1 + feather, h)


@dataclass(frozen=True)
class Matte:
    """How much of the edit each input pixel takes: ``alpha`` (uint8, 0 = the input's pixel,
    255 = the edit's) over the integer rectangle ``region`` (x0, y0, x1, y1) of the input; every
    pixel outside ``region`` has alpha 0. Quantised to 8 bits here, once, so the final image and
    the edit layer (:func:`edit_layer`) agree: the input composited with the layer is the final
    image up to the compositor's rounding."""

    region: tuple[int, int, int, int]
    alpha: np.ndarray  # (y1 - y0, x1 - x0) uint8


def box_matte(
    source_size: tuple[int, int], box_work: Box, work_size: tuple[int, int], feather: int
) -> Matte:
    """The box's matte: 255 on the box (rounded outward to input pixels) and
    ``round(255 * max(0, 1 - d / (feather + 1)))`` outside it, ``d`` the Chebyshev distance in
    pixels from the box (a rectangular ramp, exactly :func:`paste_region`)."""
    region = paste_region(source_size, box_work, work_size, feather)
    ib = input_box(source_size, box_work, work_size)
    if ib is None:
        return Matte((0, 0, 0, 0), np.zeros((0, 0), np.uint8))
    rx0, ry0, rx1, ry1 = region
    bx0, by0, bx1, by1 = ib
    xs = np.arange(rx0, rx1)
    ys = np.arange(ry0, ry1)
    dx = np.maximum(np.maximum(bx0 - xs, xs - (bx1 - 1)), 0)
    dy = np.maximum(np.maximum(by0 - ys, ys - (by1 - 1)), 0)
    d = np.maximum(dx[None, :], dy[:, None]).astype(np.float64)
    weight = np.clip(1.0 - d / (feather + 1), 0.0, 1.0)
    return Matte(region, np.rint(255.0 * weight).astype(np.uint8))


def soft_mask(mask: np.ndarray, ramp: int) -> np.ndarray:
    """(H, W) float64 in [0, 1] from a boolean mask: 1 deep inside, falling to
    ``1 / (ramp + 1)`` on its edge pixels (by Euclidean distance to the nearest pixel outside),
    0 outside. ``ramp=0`` keeps the hard mask."""
    mask = np.asarray(mask, dtype=bool)
    if ramp <= 0 or not mask.any():
        return mask.astype(np.float64)
    distance = heavy_import("scipy.ndimage").distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    return np.clip(distance / (ramp + 1), 0.0, 1.0)


def mask_matte(
    source_size: tuple[int, int],
    mask_work: Image.Image,
    box_work: Box,
    work_size: tuple[int, int],
    ramp: int,
) -> Matte:
    """The matte of an object mask (mode "L" at ``work_size``, 255 = edited): softened inside
    its edge over ``ramp`` working pixels (:func:`soft_mask`), resized bilinearly to the input
    and cut to the box (rounded outward), so nothing outside the box ever changes."""
    if tuple(mask_work.size) != tuple(work_size):
        raise ValueError(f"mask is {mask_work.size}, expected the working size {work_size}")
    ib = input_box(source_size, box_work, work_size)
    if ib is None:
        return Matte((0, 0, 0, 0), np.zeros((0, 0), np.uint8))
    soft = soft_mask(np.asarray(mask_work.convert("L")) > 127, ramp)
    full = Image.fromarray(soft.astype(np.float32), "F").resize(source_size, Image.Resampling.BILINEAR)
    x0, y0, x1, y1 = ib
    alpha = np.rint(255.0 * np.clip(np.asarray(full)[y0:y1, x0:x1], 0.0, 1.0)).astype(np.uint8)
    return Matte(ib, alpha)


def _upsampled(edited: Image.Image, work_size: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    if tuple(edited.size) != tuple(work_size):
        raise ValueError(f"edited image is {edited.size}, expected the working size {work_size}")
    return np.asarray(_to_rgb(edited).resize(size, Image.Resampling.BICUBIC))


def render(
    source: Image.Image, edited: Image.Image, work_size: tuple[int, int], matte: Matte,
    *, layer: bool = True,
) -> tuple[Image.Image, Image.Image | None]:
    """The final image (:func:`compose`) and, with ``layer``, the edit layer
    (:func:`edit_layer`), from one bicubic upsampling of ``edited``."""
    src = _to_rgb(source)
    up = _upsampled(edited, work_size, src.size)
    return _blend(src, up, matte), _layer(src.size, up, matte) if layer else None


def compose(
    source: Image.Image, edited: Image.Image, work_size: tuple[int, int], matte: Matte
) -> Image.Image:
    """The final image: ``edited`` (at ``work_size``, upsampled bicubically to the source size)
    blended over ``source`` by ``matte``: ``rint(s * (255 - a) / 255 + e * a / 255)``. Where the
    alpha is 0 the output is the source bit for bit; where it is 255, the upsampled edit."""
    return render(source, edited, work_size, matte, layer=False)[0]


def edit_layer(
    source_size: tuple[int, int], edited: Image.Image, work_size: tuple[int, int], matte: Matte
) -> Image.Image:
    """The edit as an RGBA layer at the input's size: colour = the upsampled edit, alpha = the
    matte (0 and black wherever the edit does not reach), so ``input`` composited with it
    ("over", e.g. ``Image.alpha_composite``) gives :func:`compose`'s final image within one
    grey level per channel."""
    return _layer(source_size, _upsampled(edited, work_size, source_size), matte)


def _blend(src: Image.Image, up: np.ndarray, matte: Matte) -> Image.Image:
    out = np.array(src, dtype=np.uint8)  # a copy: everything outside the region stays as is
    x0, y0, x1, y1 = matte.region
    if x1 <= x0 or y1 <= y0:
        return Image.fromarray(out, "RGB")
    a = matte.alpha[..., None].astype(np.float64) / 255.0
    s = out[y0:y1, x0:x1].astype(np.float64)
    e = up[y0:y1, x0:x1].astype(np.float64)
    out[y0:y1, x0:x1] = np.clip(np.rint(s * (1.0 - a) + e * a), 0, 255).astype(np.uint8)
    return Image.fromarray(out, "RGB")


def _layer(size: tuple[int, int], up: np.ndarray, matte: Matte) -> Image.Image:
    width, height = size
    layer = np.zeros((height, width, 4), np.uint8)
    x0, y0, x1, y1 = matte.region
    if x1 > x0 and y1 > y0:
        alpha = matte.alpha
        layer[y0:y1, x0:x1, :3] = np.where(alpha[..., None] > 0, up[y0:y1, x0:x1], 0)
        layer[y0:y1, x0:x1, 3] = alpha
    return Image.fromarray(layer, "RGBA")


def changed_region(matte: Matte) -> tuple[int, int, int, int]:
    """The smallest rectangle outside which the matte is 0 (outside it, output == input);
    ``(0, 0, 0, 0)`` when nothing changes."""
    ys, xs = np.nonzero(matte.alpha)
    if xs.size == 0:
        return 0, 0, 0, 0
    x0, y0 = matte.region[:2]
    return x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1


def paste_back(
    source: Image.Image,
    edited: Image.Image,
    box_work: Box,
    work_size: tuple[int, int],
    feather: int,
) -> Image.Image:
    """Blend the edited box back into the full-size ``source`` (:func:`compose` with the box's
    :func:`box_matte`): weight 1 on the box, a ramp over ``feather`` pixels outside it, the
    source bit for bit beyond (:func:`paste_region`), the upsampled edit exactly on the box."""
    matte = box_matte(source.size, box_work, work_size, feather)
    return compose(source, edited, work_size, matte)  # compose checks the edit's size
