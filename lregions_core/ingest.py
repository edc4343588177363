"""Manifests from published editing benchmarks and photo sets: :func:`ingest` turns a source in
one of :data:`FORMATS` into a manifest CSV that :func:`~lregions_core.manifest.read_manifest`
reads back without errors, plus ``<manifest stem>.rejected.csv`` naming every source record that
could not become a row and why.

Every candidate row is checked by :func:`~lregions_core.manifest.read_manifest` itself (the
manifest is written, read back, and rows with an error move to the rejected file), so ingested
rows obey exactly the rules of hand-written manifests. Records the format itself rules out
(an image outside its folder, no image bytes, an undecodable mask, a prompt naming an unknown
photo) are rejected before that, with their reason.

Ids come from the source's own ids (PIE-Bench keys, Emu Edit ``idx``, MagicBrush
``img_id``-``turn_index``, Unsplash ``photo_id``, TEdBench and folder image names), made safe
for folder names (:func:`safe_id`). Where a source legitimately repeats a key (one image, several
prompts: TEdBench, folder, Unsplash with a prompts CSV) the later occurrences get ``-2``, ``-3``
... in source order; elsewhere a repeated id is rejected as a duplicate.

Pixels that exist only inside a source file (Parquet image bytes, PIE-Bench run-length masks,
MagicBrush masks) are written once, content-addressed (the file name is a hash of its bytes), to
``images/`` and ``masks/`` beside the manifest: ingesting again writes nothing new. Masks are
written as greyscale PNGs, 255 on the edit region, 0 elsewhere (the ``target_mask`` convention).
Paths in the manifest are relative to it. Only local output folders are supported.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from lregions_core.manifest import ManifestError, read_manifest

__all__ = ["FORMATS", "IngestError", "IngestResult", "decode_rle", "ingest", "safe_id"]

FORMATS = ("tedbench", "pie-bench", "emu-edit", "magicbrush", "unsplash", "folder")
COLUMNS = ("id", "image", "prompt", "source", "target_box", "target_mask")
REJECT_COLUMNS = ("record", "id", "reason")
PIE_MASK_SHAPE = (512, 512)  # PIE-Bench's masks are run lengths over its 512x512 images
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_FORMAT_EXT = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp",
               "TIFF": "tif"}


class IngestError(ValueError):
    """The source as a whole cannot be read (a missing or malformed index file, a wrong option);
    names the file and the problem. Single bad records are rejected instead."""


class _Reject(Exception):
    """One source record that cannot become a row; the message is the reason."""


@dataclass
class _Candidate:
    """A would-be manifest row; ``record`` says where in the source it came from."""

    record: str
    key: str
    prompt: str = ""
    image: str = ""
    source: str | None = None
    target_mask: str | None = None
    target_box: str | None = None


@dataclass
class IngestResult:
    """What :func:`ingest` wrote: the manifest, its rows and the rejected records (``record``,
    ``id``, ``reason`` each), and the rejected file (None when nothing was rejected)."""

    manifest: str
    rows: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    rejected_path: str | None = None
    written: list[str] = field(default_factory=list)  # image and mask files new this time


# -- small helpers ------------------------------------------------------------------------------
def safe_id(raw: Any) -> str:
    """A manifest-safe id for a source's own id: kept as is when already safe, else its unsafe
    characters become "-" and a short hash of the raw id is appended (so distinct raw ids stay
    distinct); at most 100 characters, never starting with "." and never containing ".."."""
    text = str(raw).strip()
    cleaned = _UNSAFE.sub("-", text).replace("..", "-").lstrip(".-")[:100]
    if cleaned == text and cleaned:
        return cleaned
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
    return f"{cleaned[:90].rstrip('.-')}-{digest}" if cleaned else digest


def _clean_text(value: Any) -> str:
    """A caption or prompt as one line of text ("" for None/NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return " ".join(str(value).split())


def _unbracket(text: Any) -> str:
    """PIE-Bench prompts without the square brackets that mark the changed words."""
    return _clean_text(re.sub(r"[\[\]]", "", _clean_text(text)))


def _inside(folder: str, name: Any, what: str) -> str:
    """``name`` (a relative path from a source file) joined onto ``folder``; rejects anything
    absolute or leading out of ``folder``."""
    if not isinstance(name, str) or not name.strip():
        raise _Reject(f"no {what} name")
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        raise _Reject(f"{what} {name!r} is an absolute path")
    base = os.path.abspath(folder)
    path = os.path.normpath(os.path.join(base, name))
    if os.path.commonpath([base, path]) != base:
        raise _Reject(f"{what} {name!r} leads outside {folder}")
    if not os.path.isfile(path):
        raise _Reject(f"{what} not found: {path}")
    return path


def _write_atomic(path: str, data: bytes) -> None:
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class _Writer:
    """Content-addressed files under the output folder: ``<kind>/<hash>.<ext>``, written once."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.written: list[str] = []

    def put(self, kind: str, data: bytes, ext: str) -> str:
        """The path (relative to the output folder) of ``data`` stored as ``kind``."""
        rel = f"{kind}/{hashlib.sha256(data).hexdigest()[:20]}.{ext}"
        path = os.path.join(self.out_dir, *rel.split("/"))
        if not os.path.exists(path):
            _write_atomic(path, data)
            self.written.append(rel)
        return rel

    def image(self, data: Any) -> str:
        """Stores an image's bytes as they are (named by their format); rejects non-images."""
        if not isinstance(data, (bytes, bytearray, memoryview)) or not bytes(data):
            raise _Reject("no image bytes")
        data = bytes(data)
        try:
            with Image.open(io.BytesIO(data)) as image:
                fmt = image.format
        except (OSError, ValueError, SyntaxError) as exc:
            raise _Reject(f"image bytes are not a readable image ({type(exc).__name__})") from None
        return self.put("images", data, _FORMAT_EXT.get(fmt or "", "img"))

    def mask(self, edit: np.ndarray, stored: np.ndarray | None = None) -> tuple[str, str | None]:
        """Stores the (H, W) bool edit region (``stored`` when given) as a 0/255 PNG; returns
        its path and the bounding box of ``edit`` (``x0,y0,x1,y1``, None when it is empty)."""
        buffer = io.BytesIO()
        pixels = np.where(edit if stored is None else stored, 255, 0).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(buffer, "PNG")
        return self.put("masks", buffer.getvalue(), "png"), _bbox(edit)


def _bbox(edit: np.ndarray) -> str | None:
    ys, xs = np.nonzero(edit)
    if not len(xs):
        return None
    return f"{xs.min()},{ys.min()},{xs.max() + 1},{ys.max() + 1}"


def decode_rle(mask: Any, shape: tuple[int, int] = PIE_MASK_SHAPE) -> np.ndarray:
    """PIE-Bench's run-length mask as (H, W) bool (True = edit): ``[start, length]`` pairs, as a
    list of pairs or a flat list alternating start and length, over the pixels in row-major
    order. A run that overruns the image is cut at its end (as PIE-Bench's decoder does).
    Raises ValueError for anything else (odd length, negative or non-integer values, a start
    past the end)."""
    if not isinstance(mask, list):
        raise ValueError(  # noqa: TRY004 - every kind of bad mask is a ValueError
            f"mask is a {type(mask).__name__}, not a list of run lengths")
    if mask and all(isinstance(pair, list) and len(pair) == 2 for pair in mask):
        flat = [v for pair in mask for v in pair]
    else:
        flat = mask
    if len(flat) % 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        raise ValueError("mask is not a list of integer [start, length] pairs")
    total = shape[0] * shape[1]
    out = np.zeros(total, dtype=bool)
    for start, length in zip(flat[::2], flat[1::2]):
        if start < 0 or length < 0 or start >= total:
            raise ValueError(f"run [{start}, {length}] is outside the {shape[1]}x{shape[0]} "
                             "image")
        out[start : start + length] = True
    return out.reshape(shape)


def with_pie_border(edit: np.ndarray) -> np.ndarray:
    """``edit`` with its first and last rows and columns marked as edited, as PIE-Bench's
    ``mask_decode`` does before its metrics."""
    out = edit.copy()
    out[0, :] = out[-1, :] = out[:, 0] = out[:, -1] = True
    return out


def mask_from_image(data: bytes) -> np.ndarray:
    """MagicBrush's ``mask_img`` as (H, W) bool (True = edit). A mask with transparency marks
    the edit region as transparent (alpha under 128: DALL-E 2's inpainting convention, which
    MagicBrush's annotation tool used); an opaque one marks it white (grey level over 127).
    Raises ValueError when the bytes are not an image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            rgba = image.convert("RGBA") if has_alpha else None
            grey = image.convert("L")
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"not a readable image ({type(exc).__name__})") from None
    if rgba is not None:
        alpha = np.asarray(rgba)[..., 3]
        if (alpha < 128).any():
            return alpha < 128
    return np.asarray(grey) > 127


def _load_json(path: str, kind: type, expected: str) -> Any:
    """A source's JSON index file, which must be a ``kind`` (``expected`` describes it)."""
    try:
        with open(path, encoding="utf-8") as handle:
            found = json.load(handle)
    except FileNotFoundError:
        raise IngestError(f"{path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise IngestError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(found, kind):
        raise IngestError(f"{path}: expected {expected}")
    return found


def _read_csv(path: str, required: tuple[str, ...], delimiter: str = ",") -> list[dict]:
    """Rows of a CSV/TSV with a header (lowercased column names); IngestError when unreadable
    or a ``required`` column is missing."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            fields = [f.strip().lower() for f in reader.fieldnames or []]
            rows = [{k.strip().lower(): (v or "") for k, v in r.items() if k} for r in reader]
    except FileNotFoundError:
        raise IngestError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise IngestError(f"{path}: not readable ({exc})") from None
    missing = [c for c in required if c not in fields]
    if missing:
        raise IngestError(f"{path}: missing column(s) {', '.join(missing)}; found {fields}")
    return rows


# -- readers: each yields candidates, or rejections as (record, key, reason) tuples -----------


def _records(records: Iterable[tuple[str, str, Any]], make) -> Iterator:
    """``make(record, key, value)`` for each (record, key, value): a candidate, or a rejection
    tuple. Every reader's values are objects (JSON objects, table rows): others are rejected."""
    for record, key, value in records:
        if not isinstance(value, dict):
            yield record, key, f"not an object but a {type(value).__name__}"
            continue
        try:
            yield make(record, key, value)
        except _Reject as why:
            yield record, key, str(why)


def _tedbench(source: str, writer: _Writer, opts: dict) -> Iterator:
    entries = _load_json(os.path.join(source, "input_list.json"), list,
                         "a JSON list of {img_name, target_text}")

    def make(record: str, key: str, entry: dict) -> _Candidate:
        image = _inside(os.path.join(source, "originals"), entry.get("img_name"), "image")
        return _Candidate(record, key, _clean_text(entry.get("target_text")), image)

    named = [(f"input_list.json[{i}]",
              safe_id(_stem(e.get("img_name") if isinstance(e, dict) else "") or "image"), e)
             for i, e in enumerate(entries)]
    yield from _records(_numbered(named), make)


def _stem(name: Any) -> str:
    return os.path.splitext(os.path.basename(str(name or "").replace("\\", "/")))[0]


def _numbered(records: list[tuple[str, str, Any]]) -> list[tuple[str, str, Any]]:
    """Keys of repeated source keys numbered in order: ``k``, ``k-2``, ``k-3`` ..."""
    seen: dict[str, int] = {}
    out = []
    for record, key, value in records:
        seen[key.lower()] = seen.get(key.lower(), 0) + 1
        n = seen[key.lower()]
        out.append((record, key if n == 1 else f"{key}-{n}", value))
    return out


def _pie_bench(source: str, writer: _Writer, opts: dict) -> Iterator:
    mapping = _load_json(os.path.join(source, "mapping_file.json"), dict,
                         "a JSON object keyed by id")

    def make(record: str, key: str, entry: dict) -> _Candidate:
        image = _inside(os.path.join(source, "annotation_images"), entry.get("image_path"),
                        "image")
        try:
            edit = decode_rle(entry.get("mask"))
        except ValueError as exc:
            raise _Reject(f"undecodable mask: {exc}") from None
        # PIE-Bench's own decoder marks the image's 1-pixel border as edited too ("to avoid
        # annotation errors in boundary"), and its metrics use that mask: so does target_mask.
        # The target_box is the annotated region's.
        mask, box = writer.mask(edit, with_pie_border(edit))
        return _Candidate(record, key, _unbracket(entry.get("editing_prompt")), image,
                          _unbracket(entry.get("original_prompt")) or None, mask, box)

    yield from _records(((f"mapping_file.json[{k!r}]", safe_id(k), v)
                         for k, v in mapping.items()),
                        make)


def _parquet_rows(source: str) -> Iterator[tuple[str, dict]]:
    """(record, row) of every row of a Parquet file or of every ``*.parquet`` under a folder
    (sorted), read in small batches so image bytes never all sit in memory."""
    import pyarrow.parquet as pq

    if os.path.isdir(source):
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(source) for f in names
                       if f.endswith(".parquet"))
        if not files:
            raise IngestError(f"{source}: no .parquet files in this folder")
    elif os.path.isfile(source):
        files = [source]
    else:
        raise IngestError(f"{source}: file or folder not found")
    for path in files:
        try:
            handle = pq.ParquetFile(path)
        except (OSError, ValueError) as exc:
            raise IngestError(f"{path}: not a readable Parquet file ({exc})") from None
        number = 0
        for batch in handle.iter_batches(batch_size=32):
            for row in batch.to_pylist():
                yield f"{os.path.basename(path)}[{number}]", row
                number += 1


def _image_bytes(value: Any) -> Any:
    """The bytes of a Parquet image cell: ``{"bytes": ..., "path": ...}`` or raw bytes."""
    return value.get("bytes") if isinstance(value, dict) else value


def _require(row: dict, columns: tuple[str, ...], source: str, fmt: str) -> None:
    missing = [c for c in columns if c not in row]
    if missing:
        raise IngestError(f"{source}: not {fmt} Parquet: missing column(s) {', '.join(missing)}")


def _emu_edit(source: str, writer: _Writer, opts: dict) -> Iterator:
    def make(record: str, key: str, row: dict) -> _Candidate:
        prompt = _clean_text(row.get("output_caption")) or _clean_text(row.get("instruction"))
        image = writer.image(_image_bytes(row.get("image")))
        return _Candidate(record, key, prompt, image, _clean_text(row.get("input_caption")) or None)

    def records() -> Iterator[tuple[str, str, dict]]:
        for record, row in _parquet_rows(source):
            _require(row, ("image", "instruction", "idx"), source, "Emu Edit")
            yield record, safe_id(row["idx"]), row

    yield from _records(records(), make)


def _magicbrush(source: str, writer: _Writer, opts: dict) -> Iterator:
    def make(record: str, key: str, row: dict) -> _Candidate:
        image = writer.image(_image_bytes(row.get("source_img")))
        mask_data = _image_bytes(row.get("mask_img"))
        mask = box = None
        if mask_data is not None:
            try:
                mask, box = writer.mask(mask_from_image(bytes(mask_data)))
            except (ValueError, TypeError) as exc:
                raise _Reject(f"undecodable mask_img: {exc}") from None
        return _Candidate(record, key, _clean_text(row.get("instruction")), image, None, mask,
                          box)

    def records() -> Iterator[tuple[str, str, dict]]:
        for record, row in _parquet_rows(source):
            _require(row, ("img_id", "turn_index", "source_img", "instruction"), source,
                     "MagicBrush")
            yield record, safe_id(f"{row['img_id']}-{row['turn_index']}"), row

    yield from _records(records(), make)


def _with_width(url: str, width: int | None) -> str:
    """``url`` asking the image service (imgix) for a copy ``width`` px wide."""
    if not width:
        return url
    return f"{url}{'&' if '?' in url else '?'}w={int(width)}"


def _unsplash(source: str, writer: _Writer, opts: dict) -> Iterator:
    tsv = os.path.join(source, "photos.tsv000") if os.path.isdir(source) else source
    photos = _read_csv(tsv, ("photo_id", "photo_image_url"), delimiter="\t")
    by_id = {p["photo_id"].strip(): p for p in photos}
    prompts_csv, prompt = opts.get("prompts"), opts.get("prompt")
    if bool(prompts_csv) == bool(prompt):
        raise IngestError("unsplash needs exactly one of --prompts CSV or --prompt TEXT")
    if prompts_csv:
        wanted = _read_csv(prompts_csv, ("photo_id", "prompt"))
        name = os.path.basename(prompts_csv)
        records = _numbered([(f"{name} row {i}", safe_id(w["photo_id"]), w)
                             for i, w in enumerate(wanted, start=1)])
    else:
        records = [(f"{os.path.basename(tsv)} row {i}", safe_id(p["photo_id"]),
                    {"photo_id": p["photo_id"], "prompt": prompt})
                   for i, p in enumerate(photos, start=1)]

    def make(record: str, key: str, want: dict) -> _Candidate:
        photo = by_id.get(want["photo_id"].strip())
        if photo is None:
            raise _Reject(f"photo_id {want['photo_id']!r} is not in {tsv}")
        url = photo["photo_image_url"].strip()
        if not url.startswith(("https://", "http://")):
            raise _Reject(f"photo_image_url {url!r} is not an http(s) URL")
        caption = (_clean_text(want.get("source")) or _clean_text(photo.get("ai_description"))
                   or _clean_text(photo.get("photo_description")))
        return _Candidate(record, key, _clean_text(want["prompt"]),
                          _with_width(url, opts.get("width")), caption or None)

    yield from _records(records, make)


def _folder(source: str, writer: _Writer, opts: dict) -> Iterator:
    if not os.path.isdir(source):
        raise IngestError(f"{source}: not a folder")
    if not opts.get("prompts"):
        raise IngestError("folder needs --prompts CSV (columns image,prompt[,source])")
    wanted = _read_csv(opts["prompts"], ("image", "prompt"))
    name = os.path.basename(opts["prompts"])
    records = _numbered([(f"{name} row {i}", safe_id(_stem(w["image"]) or "image"), w)
                         for i, w in enumerate(wanted, start=1)])

    def make(record: str, key: str, want: dict) -> _Candidate:
        image = _inside(source, want["image"].strip(), "image")
        return _Candidate(record, key, _clean_text(want["prompt"]), image,
                          _clean_text(want.get("source")) or None)

    yield from _records(records, make)


READERS = {"tedbench": _tedbench, "pie-bench": _pie_bench, "emu-edit": _emu_edit,
           "magicbrush": _magicbrush, "unsplash": _unsplash, "folder": _folder}


# -- the manifest -------------------------------------------------------------------------------
def _csv_bytes(columns: tuple[str, ...], rows: list[dict]) -> bytes:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows([{c: ("" if r.get(c) is None else r[c]) for c in columns} for r in rows])
    return buffer.getvalue().encode("utf-8")


def _write_if_changed(path: str, data: bytes) -> None:
    try:
        with open(path, "rb") as handle:
            if handle.read() == data:
                return
    except OSError:
        pass
    _write_atomic(path, data)


def rejected_path(manifest: str) -> str:
    """``<manifest without .csv>.rejected.csv``."""
    stem = manifest[:-4] if manifest.lower().endswith(".csv") else manifest
    return f"{stem}.rejected.csv"


def ingest(fmt: str, source: str | os.PathLike, out: str | os.PathLike, *,
           limit: int | None = None, prompts: str | None = None, prompt: str | None = None,
           width: int | None = None) -> IngestResult:
    """Write the manifest ``out`` (a local CSV path) for the source ``source`` in format
    ``fmt`` (one of :data:`FORMATS`; see the module docstring), from at most ``limit`` source
    records (the first ones, rejected ones included). ``prompts`` (a CSV) and ``prompt`` give
    the prompts of the ``unsplash`` and ``folder`` formats, ``width`` the width Unsplash photos
    are fetched at. Raises :class:`IngestError` when the source as a whole is unusable."""
    if fmt not in READERS:
        raise IngestError(f"unknown format {fmt!r}; one of: {', '.join(FORMATS)}")
    if "://" in os.fspath(out):
        raise IngestError(f"{out}: ingest writes local manifests only")
    manifest = os.path.abspath(os.fspath(out))
    out_dir = os.path.dirname(manifest)
    writer = _Writer(out_dir)
    opts = {"prompts": prompts, "prompt": prompt, "width": width}
    candidates: list[_Candidate] = []
    rejected: list[dict] = []
    for item in itertools.islice(READERS[fmt](os.fspath(source), writer, opts), limit):
        if isinstance(item, tuple):
            rejected.append(dict(zip(REJECT_COLUMNS, item)))
        else:
            candidates.append(item)

    rows = [_row(c, out_dir) for c in candidates]
    if rows:  # the manifest's own checks decide which rows stand
        checked = _check(out_dir, _csv_bytes(COLUMNS, rows))
        good = []
        for row, cand, result in zip(rows, candidates, checked):
            if result.error:
                rejected.append({"record": cand.record, "id": row["id"], "reason": result.error})
            else:
                good.append(row)
        rows = good
    _write_if_changed(manifest, _csv_bytes(COLUMNS, rows))
    reject_file = rejected_path(manifest)
    if rejected:
        _write_if_changed(reject_file, _csv_bytes(REJECT_COLUMNS, rejected))
    elif os.path.exists(reject_file):
        os.remove(reject_file)  # an earlier run's rejections no longer hold
    return IngestResult(manifest, rows, rejected, reject_file if rejected else None,
                        writer.written)


def _check(out_dir: str, data: bytes) -> list:
    """:func:`read_manifest` of the manifest ``data`` as if it lay in ``out_dir`` (a temporary
    file there, so relative paths resolve as they will)."""
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".ingest-check.", suffix=".csv")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        return read_manifest(tmp)
    except ManifestError as exc:  # not expected for rows written by ingest: say so loudly
        raise IngestError(f"the manifest written does not read back: {exc}") from None
    finally:
        os.remove(tmp)


def _row(cand: _Candidate, out_dir: str) -> dict:
    def rel(path: str | None) -> str | None:
        if path is None or "://" in path:
            return path
        full = path if os.path.isabs(path) else os.path.join(out_dir, path)
        return os.path.relpath(full, out_dir).replace(os.sep, "/")

    return {"id": cand.key, "image": rel(cand.image), "prompt": cand.prompt,
            "source": cand.source, "target_box": cand.target_box,
            "target_mask": rel(cand.target_mask)}
