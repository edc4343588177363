"""Tests for lregions_core.images: loading, working size, boxes, masks and paste-back."""

from __future__ import annotations

import io
import itertools
import os
import pickle
import struct
import zlib
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from lregions_core import images
from lregions_core.images import (
    MAX_PIXELS,
    ImageLoadError,
    box_mask,
    load_image,
    paste_back,
    paste_region,
    scale_box,
    to_working,
    working_size,
)


def _save(img: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    img.save(path, fmt, **kw)
    return path


def _px(img: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    assert img.mode == "RGB"
    return tuple(img.getpixel(xy))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR claiming width x height and no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


# ---------------------------------------------------------------- mode conversion


def test_rgb_png_roundtrip(tmp_path: Path) -> None:
    src = _noise(31, 17)
    out = load_image(_save(src, tmp_path / "a.png"))
    assert out.mode == "RGB" and out.size == (31, 17)
    assert np.array_equal(np.asarray(out), np.asarray(src))


def test_mode_1_and_l(tmp_path: Path) -> None:
    one = Image.new("1", (4, 2), 0)
    one.putpixel((1, 0), 1)
    out = load_image(_save(one, tmp_path / "one.png"))
    assert _px(out, (0, 0)) == (0, 0, 0) and _px(out, (1, 0)) == (255, 255, 255)
    gray = Image.new("L", (3, 3), 77)
    assert _px(load_image(_save(gray, tmp_path / "l.png")), (2, 2)) == (77, 77, 77)


def test_la_composited_over_white(tmp_path: Path) -> None:
    la = Image.new("LA", (2, 1), (0, 0))  # fully transparent black
    la.putpixel((1, 0), (40, 255))  # opaque dark gray
    out = load_image(_save(la, tmp_path / "la.png"))
    assert _px(out, (0, 0)) == (255, 255, 255)
    assert _px(out, (1, 0)) == (40, 40, 40)


def test_rgba_transparent_becomes_white_and_half_alpha_blends(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (3, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    out = load_image(_save(rgba, tmp_path / "rgba.png"))
    assert _px(out, (0, 0)) == (255, 255, 255)
    assert _px(out, (1, 0)) == (10, 20, 30)
    assert all(abs(v - 127) <= 2 for v in _px(out, (2, 0)))


def test_palette_colours_preserved(tmp_path: Path) -> None:
    p = Image.new("P", (3, 1))
    p.putpalette([255, 0, 0, 0, 128, 0, 10, 20, 250] + [0] * (256 * 3 - 9))
    p.putdata([0, 1, 2])
    out = load_image(_save(p, tmp_path / "p.png"))
    assert [_px(out, (i, 0)) for i in range(3)] == [(255, 0, 0), (0, 128, 0), (10, 20, 250)]


def test_palette_with_transparency(tmp_path: Path) -> None:
    p = Image.new("P", (2, 1))
    p.putpalette([1, 2, 3, 200, 100, 50] + [0] * (256 * 3 - 6))
    p.putdata([0, 1])
    out = load_image(_save(p, tmp_path / "pt.png", transparency=0))
    assert _px(out, (0, 0)) == (255, 255, 255)
    assert _px(out, (1, 0)) == (200, 100, 50)
    gif = load_image(_save(p, tmp_path / "pt.gif", transparency=0))
    assert _px(gif, (0, 0)) == (255, 255, 255) and _px(gif, (1, 0)) == (200, 100, 50)


@pytest.mark.parametrize("fmt,suffix", [("PNG", "png"), ("TIFF", "tif")])
def test_16_bit_scaled_by_257(tmp_path: Path, fmt: str, suffix: str) -> None:
    a = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    im = Image.fromarray(a)
    assert im.mode == "I;16"
    out = load_image(_save(im, tmp_path / f"g16.{suffix}", fmt))
    vals = [_px(out, (i, 0))[0] for i in range(4)]
    assert vals == [0, 1, 128, 255]
    assert _px(out, (3, 0)) == (255, 255, 255)


def test_16_bit_big_endian(tmp_path: Path) -> None:
    im = Image.frombytes("I;16B", (3, 1), np.array([65535, 32768, 0], dtype=">u2").tobytes())
    assert im.mode == "I;16B"
    out = load_image(_save(im, tmp_path / "be.tif", "TIFF"))
    assert [_px(out, (i, 0))[0] for i in range(3)] == [255, 128, 0]


def test_mode_i_16_bit_range_and_wide_range(tmp_path: Path) -> None:
    im = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32), "I")
    out = load_image(_save(im, tmp_path / "i.tif", "TIFF"))
    assert [_px(out, (i, 0))[0] for i in range(3)] == [0, 128, 255]
    # Values outside 0..65535 are not 16-bit samples: stretched min..max.
    wide = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32), "I")
    out = load_image(_save(wide, tmp_path / "iw.tif", "TIFF"))
    assert [_px(out, (i, 0))[0] for i in range(3)] == [0, 128, 255]


def test_float_min_max_stretched(tmp_path: Path) -> None:
    im = Image.fromarray(np.array([[-0.5, 0.0, 0.5, 1.5]], dtype=np.float32), "F")
    out = load_image(_save(im, tmp_path / "f.tif", "TIFF"))
    assert [_px(out, (i, 0))[0] for i in range(4)] == [0, 64, 128, 255]


def test_cmyk_cyan(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (8, 8), (255, 0, 0, 0))
    for name, fmt in (("c.tif", "TIFF"), ("c.jpg", "JPEG")):
        out = load_image(_save(cmyk, tmp_path / name, fmt))
        r, g, b = _px(out, (4, 4))
        assert r <= 10 and g >= 245 and b >= 245, (name, (r, g, b))


def test_ycbcr_and_lab(tmp_path: Path) -> None:
    ycc = Image.new("RGB", (4, 4), (200, 30, 60)).convert("YCbCr")
    out = load_image(_save(ycc, tmp_path / "y.tif", "TIFF"))
    assert all(abs(a - b) <= 3 for a, b in zip(_px(out, (1, 1)), (200, 30, 60), strict=True))
    lab = Image.new("LAB", (2, 2), (255, 128, 128))  # L*=100, a=b=0: white
    out = load_image(_save(lab, tmp_path / "lab.tif", "TIFF"))
    assert all(v >= 250 for v in _px(out, (0, 0)))


def test_hsv_and_unconvertible_modes() -> None:
    # HSV cannot be written to any file format, so exercise the conversion step directly.
    hsv = Image.new("HSV", (1, 1), (0, 255, 255))
    assert _px(images._to_rgb(hsv), (0, 0)) == (255, 0, 0)
    la_pre = Image.new("La", (1, 1), (90, 255))
    assert _px(images._to_rgb(la_pre), (0, 0)) == (90, 90, 90)


def test_exif_orientation_applied(tmp_path: Path) -> None:
    # 4 wide x 2 high, left half red, right half blue; orientation 6 = rotate 90 clockwise.
    a = np.zeros((2, 4, 3), np.uint8)
    a[:, :2] = (255, 0, 0)
    a[:, 2:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = load_image(_save(Image.fromarray(a), tmp_path / "rot.png", exif=exif))
    assert out.size == (2, 4)
    assert _px(out, (0, 0)) == (255, 0, 0) and _px(out, (1, 3)) == (0, 0, 255)


def test_bytes_and_memory_url(tmp_path: Path) -> None:
    buf = io.BytesIO()
    _noise(5, 7).save(buf, "PNG")
    data = buf.getvalue()
    assert load_image(data).size == (5, 7)
    with fsspec.open("memory://lregions-test/x.png", "wb") as f:
        f.write(data)
    try:
        out = load_image("memory://lregions-test/x.png")
    finally:
        fsspec.filesystem("memory").rm("memory://lregions-test/x.png")
    assert np.array_equal(np.asarray(out), np.asarray(_noise(5, 7)))
    p = _save(_noise(5, 7), tmp_path / "u.png")
    assert load_image(p.as_uri()).size == (5, 7)  # file:// URL
    assert load_image(str(p)).size == (5, 7)


# ---------------------------------------------------------------- errors


def _error(source, **kw) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        load_image(source, **kw)
    err = info.value
    assert isinstance(err, ValueError)
    assert str(err) == f"cannot read image {err.path}: {err.problem}"
    return err


def test_missing_file(tmp_path: Path) -> None:
    err = _error(tmp_path / "nope.png")
    assert err.path == str(tmp_path / "nope.png") and err.problem == "file not found"
    assert "nope.png" in str(err)
    assert _error("memory://lregions-test/absent.png").problem == "file not found"


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    err = _error(tmp_path / "empty.png")
    assert "empty.png" in str(err) and err.problem == "empty file (0 bytes)"
    assert _error(b"").path == "<bytes>"


def test_text_file_named_png(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("hello, not an image\n")
    err = _error(tmp_path / "notes.png")
    assert "notes.png" in str(err) and err.problem == "not an image file (unrecognised format)"
    assert _error(b"garbage").path == "<bytes>"


def test_directory(tmp_path: Path) -> None:
    assert "directory" in _error(tmp_path).problem


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_permission_denied(tmp_path: Path) -> None:
    p = _save(_noise(2, 2), tmp_path / "locked.png")
    p.chmod(0)
    try:
        err = _error(p)
    finally:
        p.chmod(0o644)
    assert "locked.png" in str(err) and "permission denied" in err.problem


@pytest.mark.parametrize(
    "exc,problem",
    [
        (PermissionError(13, "Permission denied"), "permission denied (Permission denied)"),
        (ConnectionError("host unreachable"), "ConnectionError: host unreachable"),
        (ValueError("Protocol not known: zz"), "ValueError: Protocol not known: zz"),
    ],
)
def test_open_errors_become_image_load_error(monkeypatch, exc: Exception, problem: str) -> None:
    # Works as root too (root can read a chmod 0 file), and covers remote-backend failures.
    def fail(*_a, **_k):
        raise exc

    monkeypatch.setattr(images.fsspec, "open", fail)
    err = _error("zz://bucket/photo.png")
    assert err.path == "zz://bucket/photo.png" and err.problem == problem


@pytest.mark.parametrize("fmt,name", [("PNG", "cut.png"), ("JPEG", "cut.jpg")])
def test_truncated(tmp_path: Path, fmt: str, name: str) -> None:
    full = _save(_noise(64, 64), tmp_path / f"full_{name}", fmt)
    data = full.read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    err = _error(tmp_path / name)
    assert name in str(err) and err.problem.startswith("truncated or corrupt image data:")


def test_too_large_from_explicit_limit(tmp_path: Path) -> None:
    p = _save(Image.new("L", (1100, 1000)), tmp_path / "big.png")
    err = _error(p, max_pixels=1_000_000)
    assert "big.png" in str(err)
    assert err.problem == (
        "image too large: 1100 x 1000 = 1100000 pixels exceeds the limit of 1000000 "
        "(decompression bomb?)"
    )
    assert load_image(p, max_pixels=1_100_000).size == (1100, 1000)


def test_too_large_checked_from_header_before_decoding(tmp_path: Path) -> None:
    # The header claims 9000 x 9000 but there is no pixel data: decoding would report
    # truncation, so "too large" proves the check happened first. Also just under PIL's limit.
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(9000, 9000))
    assert 9000 * 9000 > MAX_PIXELS
    err = _error(p)
    assert err.problem == (
        "image too large: 9000 x 9000 = 81000000 pixels exceeds the limit of 80000000 "
        "(decompression bomb?)"
    )
    # With the limit raised, decoding is attempted and finds no data.
    assert _error(p, max_pixels=10**8).problem.startswith("truncated or corrupt")


def test_pil_decompression_bomb_caught(tmp_path: Path) -> None:
    p = tmp_path / "huge.png"
    p.write_bytes(_png_header_only(20000, 20000))  # over twice PIL's limit: PIL refuses
    err = _error(p, max_pixels=10**12)
    assert "huge.png" in str(err) and err.problem.startswith("image too large")
    assert "decompression bomb" in err.problem


def test_pil_bomb_warning_is_error_locally_only(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    p = _save(Image.new("L", (40, 40)), tmp_path / "w.png")  # 1600 px: PIL warns
    err = _error(p, max_pixels=1500)
    assert err.problem.startswith("image too large")
    with pytest.warns(Image.DecompressionBombWarning):  # global behaviour untouched
        Image.open(p).close()


def test_zero_size_image(monkeypatch) -> None:
    # PIL's own plugins refuse 0-pixel headers; guard against any that would not.
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: Image.new("RGB", (0, 3)))
    assert _error(b"x").problem == "zero-size image (0 x 3)"


def test_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(ImageLoadError("a.png", "file not found")))
    assert (err.path, err.problem) == ("a.png", "file not found")
    assert str(err) == "cannot read image a.png: file not found"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_no_file_handles_left_open(tmp_path: Path) -> None:
    good = _save(_noise(8, 8), tmp_path / "g.jpg", "JPEG")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(good.read_bytes()[:200])
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        load_image(good)
        with pytest.raises(ImageLoadError):
            load_image(bad)
    assert len(os.listdir("/proc/self/fd")) == before


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    "args,expected",
    [
        ((640, 480, 512, 64), (512, 384)),
        ((480, 640, 512, 64), (384, 512)),
        ((1000, 100, 512, 64), (512, 64)),
        ((512, 512, 512, 8), (512, 512)),
        ((10, 10000, 512, 64), (64, 512)),
        ((333, 217, 512, 8), (512, 336)),  # 333.6 -> 336
    ],
)
def test_working_size_examples(args, expected) -> None:
    assert working_size(*args) == expected


def test_working_size_properties() -> None:
    rng = np.random.default_rng(1)
    for _ in range(500):
        w, h = (int(v) for v in rng.integers(16, 5000, 2))
        size = int(rng.choice([256, 384, 512, 768]))
        mult = int(rng.choice([8, 16, 32, 64]))
        ww, wh = working_size(w, h, size, mult)
        assert ww % mult == 0 and wh % mult == 0 and ww >= mult and wh >= mult
        assert max(ww, wh) == size  # size is a multiple here
        exact = (w * size / max(w, h), h * size / max(w, h))
        assert abs(ww - exact[0]) <= mult / 2 + 1e-9 or ww == mult
        assert abs(wh - exact[1]) <= mult / 2 + 1e-9 or wh == mult
    with pytest.raises(ValueError):
        working_size(0, 10, 512, 64)


def test_to_working() -> None:
    out = to_working(Image.new("RGBA", (640, 480), (0, 0, 0, 0)), 512, 64)
    assert out.mode == "RGB" and out.size == (512, 384)
    assert _px(out, (100, 100)) == (255, 255, 255)
    same = Image.new("RGB", (512, 384), (1, 2, 3))
    assert to_working(same, 512, 64) is not same


def test_scale_box() -> None:
    assert scale_box((10, 20, 30, 40), (100, 200), (50, 400)) == (5.0, 40.0, 15.0, 80.0)
    assert scale_box((0, 0, 512, 384), (512, 384), (333, 217)) == (0.0, 0.0, 333.0, 217.0)


def test_box_mask_extents() -> None:
    m = np.asarray(box_mask((10, 8), (1.5, 2.0, 4.2, 5.0)))
    assert m.shape == (8, 10) and m.dtype == np.uint8
    ys, xs = np.nonzero(m)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (1, 4, 2, 4)
    assert set(np.unique(m)) == {0, 255}
    assert int((m == 255).sum()) == 4 * 3
    clipped = np.asarray(box_mask((10, 8), (-3.0, -1.0, 20.0, 2.5)))
    assert clipped[:3].all() and not clipped[3:].any()
    assert not np.asarray(box_mask((10, 8), (2.0, 2.0, 2.0, 6.0))).any()  # zero width
    assert box_mask((10, 8), (0, 0, 1, 1)).mode == "L"
    with pytest.raises(ValueError):
        box_mask((10, 8), (5, 0, 4, 3))


# ---------------------------------------------------------------- paste-back


W, H = 333, 217
WORK = working_size(W, H, 512, 8)  # (512, 336)
BOX_WORK = (100.3, 80.6, 250.2, 201.1)


def _pair() -> tuple[Image.Image, Image.Image]:
    source = _noise(W, H, seed=2)
    edited = Image.new("RGB", WORK, (250, 10, 120))
    return source, edited


def test_paste_region_is_box_rounded_out_plus_feather() -> None:
    x0, y0, x1, y1 = scale_box(BOX_WORK, WORK, (W, H))
    inner = (int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1)))
    assert paste_region((W, H), BOX_WORK, WORK, 0) == inner
    assert paste_region((W, H), BOX_WORK, WORK, 5) == (
        inner[0] - 5,
        inner[1] - 5,
        inner[2] + 5,
        inner[3] + 5,
    )
    assert paste_region((W, H), (0, 0, 512, 336), WORK, 9) == (0, 0, W, H)
    assert paste_region((W, H), (600, 0, 700, 10), WORK, 3) == (0, 0, 0, 0)


@pytest.mark.parametrize("feather", [0, 1, 6])
def test_paste_back_outside_identical_inside_edit(feather: int) -> None:
    source, edited = _pair()
    out = paste_back(source, edited, BOX_WORK, WORK, feather)
    assert out.mode == "RGB" and out.size == (W, H)
    o, s = np.asarray(out), np.asarray(source)
    up = np.asarray(edited.resize((W, H), Image.Resampling.BICUBIC))
    rx0, ry0, rx1, ry1 = paste_region((W, H), BOX_WORK, WORK, feather)
    outside = np.ones((H, W), bool)
    outside[ry0:ry1, rx0:rx1] = False
    assert np.array_equal(o[outside], s[outside])
    bx0, by0, bx1, by1 = paste_region((W, H), BOX_WORK, WORK, 0)
    assert np.array_equal(o[by0:by1, bx0:bx1], up[by0:by1, bx0:bx1])
    if feather == 0:  # hard edge: everything is either source or edit
        assert (rx0, ry0, rx1, ry1) == (bx0, by0, bx1, by1)


def test_feather_ramp_monotone_and_strictly_between() -> None:
    # Flat source and edit so the ramp is visible as plain numbers.
    source = Image.new("RGB", (W, H), (0, 0, 0))
    edited = Image.new("RGB", WORK, (255, 255, 255))
    feather = 4
    out = np.asarray(paste_back(source, edited, BOX_WORK, WORK, feather))[..., 0].astype(int)
    bx0, by0, bx1, by1 = paste_region((W, H), BOX_WORK, WORK, 0)
    row = (by0 + by1) // 2
    right = out[row, bx1 - 1 : bx1 + feather + 1]  # last box pixel, ramp, then source
    expected = [255] + [round(255 * (1 - d / (feather + 1))) for d in range(1, feather + 1)] + [0]
    assert right.tolist() == expected
    assert all(0 < v < 255 for v in right[1:-1])
    assert all(a > b for a, b in itertools.pairwise(right))
    left = out[row, bx0 - feather - 1 : bx0 + 1][::-1]
    assert left.tolist() == expected
    # Chebyshev: the diagonal corner pixel at (d, d) has the same weight as (d, 0).
    assert out[by0 - 2, bx0 - 2] == out[row, bx0 - 2]


def test_paste_back_hard_edge_and_empty_box() -> None:
    source, edited = _pair()
    out = np.asarray(paste_back(source, edited, BOX_WORK, WORK, 0))
    bx0, by0, _, by1 = paste_region((W, H), BOX_WORK, WORK, 0)
    s = np.asarray(source)
    assert np.array_equal(out[:, bx0 - 1], s[:, bx0 - 1])
    assert np.array_equal(out[by0:by1, bx0], np.tile([250, 10, 120], (by1 - by0, 1)))
    none = paste_back(source, edited, (600, 0, 700, 10), WORK, 3)
    assert np.array_equal(np.asarray(none), s)
    with pytest.raises(ValueError):
        paste_back(source, edited.resize((64, 64)), BOX_WORK, WORK, 2)


def test_paste_back_accepts_non_rgb_inputs() -> None:
    source = Image.new("L", (W, H), 30)
    edited = Image.new("RGBA", WORK, (255, 0, 0, 255))
    out = paste_back(source, edited, BOX_WORK, WORK, 2)
    assert out.mode == "RGB" and out.size == (W, H)
    assert _px(out, (0, 0)) == (30, 30, 30)
