"""Batch manifests: a CSV of edit jobs, fully checked before any work starts.

:func:`read_manifest` raises :class:`ManifestError` for problems with the whole file and sets
:attr:`ManifestRow.error` for problems with one row, so the rest of the batch can still run.
Images are not decoded here: local paths are checked to exist, URLs only when loaded. A
``target_mask`` (the ground-truth edit region, 255 = edit) is checked like ``image``, and a local
one's header must also be an image's.
:func:`safe_item_dir` joins an item id onto an output folder and refuses anything that escapes.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import posixpath
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass

import fsspec
from PIL import Image

from lregions_core import remote
from lregions_core.images import SKIMAGE_PREFIX, skimage_sample

__all__ = ["ManifestError", "ManifestRow", "read_manifest", "safe_item_dir"]

REQUIRED = ("image", "prompt")
KNOWN = (*REQUIRED, "source", "id", "seed", "target_box", "target_mask")

# Ids name output folders: one path component, never hidden, never "..", bounded length.
_ID_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")  # used with fullmatch
_ID_RULE = (
    "ids may contain only letters, digits, '.', '_' and '-', must not start with '.', "
    "at most 100 characters"
)
_INT_RE = re.compile(r"[+-]?[0-9]+")
_MAX_SEED = 2**63 - 1  # torch and numpy generators both accept 0 .. 2**63 - 1


class ManifestError(ValueError):
    """A problem with the manifest as a whole; says which file and what is wrong with it."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"bad manifest {path}: {problem}")

    def __reduce__(self):  # keep the two-argument constructor picklable (worker processes)
        return (type(self), (self.path, self.problem))


@dataclass(frozen=True)
class ManifestRow:
    """One job. ``row`` is the 1-based data-row number (header excluded); ``image`` is resolved
    (absolute local path, fsspec URL or ``skimage:NAME``); ``target_mask`` likewise (a local path
    or URL of a mask image, 255 = the edit region); ``error`` is None for a valid row."""

    row: int
    id: str
    image: str
    prompt: str
    source: str | None = None
    seed: int | None = None
    target_box: tuple[int, int, int, int] | None = None
    error: str | None = None
    target_mask: str | None = None

    def to_record(self) -> dict:
        """Plain JSON-ready dict (the box as a list). ``target_mask`` is left out when there is
        none, so rows without one keep the records (and run fingerprints) they always had."""
        box = list(self.target_box) if self.target_box is not None else None
        record = {**dataclasses.asdict(self), "target_box": box}
        if record["target_mask"] is None:
            del record["target_mask"]
        return record

    @classmethod
    def from_record(cls, record: dict) -> ManifestRow:
        """The inverse of :meth:`to_record` (rows travel between processes as records)."""
        box = record.get("target_box")
        return cls(**{**record, "target_box": tuple(box) if box is not None else None})


def _read_text(path: str) -> str:
    """Whole manifest as text; every way of failing becomes a ManifestError. An http(s) URL is
    read by :func:`lregions_core.remote.fetch` (timeouts, retries), anything else by fsspec."""
    try:
        if remote.is_http(path):
            data = remote.fetch(path)
        else:
            with fsspec.open(path, "rb") as f:
                data = f.read()
    except remote.FetchError as e:
        raise ManifestError(path, f"cannot read: {e.detail}") from None
    except (OSError, ValueError, ImportError) as e:
        # fsspec raises ValueError for unknown protocols, ImportError for missing backends.
        known = {FileNotFoundError: "file not found", IsADirectoryError: "is a directory"}
        problem = known.get(type(e), f"cannot read: {type(e).__name__}: {e}")
        raise ManifestError(path, problem) from None
    try:
        text = data.decode("utf-8-sig")  # spreadsheet exports often start with a BOM
    except UnicodeDecodeError as e:
        raise ManifestError(path, f"not UTF-8 text (bad byte at offset {e.start})") from None
    if "\x00" in text:
        raise ManifestError(path, "contains NUL characters (not a text CSV file?)")
    return text


def _parse_csv(path: str, text: str) -> list[list[str]]:
    # strict: an unbalanced quote would otherwise silently swallow the rest of the file.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        return list(reader)
    except csv.Error as e:
        raise ManifestError(path, f"not parseable as CSV (line {reader.line_num}): {e}") from None


def _resolve_image(raw: str, base: str) -> tuple[str, str | None]:
    """(resolved image, error or None). ``base`` is the manifest's folder (local or URL)."""
    if not raw:
        return raw, "empty image"
    if raw.startswith(SKIMAGE_PREFIX):
        name = raw[len(SKIMAGE_PREFIX) :]
        if skimage_sample(name) is not None:
            return raw, None
        return raw, f"unknown scikit-image sample {name!r} (e.g. skimage:chelsea)"
    if "://" in raw:
        return raw, None  # checked when loaded: no network round trips while validating
    if "://" in base and not os.path.isabs(raw):
        proto, folder = base.split("://", 1)
        return f"{proto}://{posixpath.normpath(posixpath.join(folder, raw))}", None
    path = os.path.normpath(os.path.join(base, raw))  # join keeps an absolute raw path as is
    if not os.path.exists(path):
        return path, f"image not found: {path}"
    if os.path.isdir(path):
        return path, f"image is a directory: {path}"
    return path, None


def _resolve_mask(raw: str, base: str) -> tuple[str | None, str | None]:
    """(resolved target_mask or None, error or None): resolved like an image; a local file's
    header must be an image's (a cheap check: the pixels are decoded when evaluating)."""
    if not raw:
        return None, None
    if raw.startswith(SKIMAGE_PREFIX):
        return raw, f"target_mask must be a file or URL, got {raw!r}"
    path, error = _resolve_image(raw, base)
    if error:
        return path, error.replace("image", "target_mask", 1)
    if "://" in path:
        return path, None
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - reading the header is the check
    except (OSError, ValueError) as exc:
        return path, f"target_mask {path} is not a readable image ({type(exc).__name__})"
    return path, None


def _parse_seed(raw: str) -> tuple[int | None, str | None]:
    if not raw:
        return None, None
    if _INT_RE.fullmatch(raw) and 0 <= int(raw) <= _MAX_SEED:
        return int(raw), None
    return None, f"seed must be an integer from 0 to {_MAX_SEED}, got {raw!r}"


def _parse_box(raw: str) -> tuple[tuple[int, int, int, int] | None, str | None]:
    if not raw:
        return None, None
    parts = [p.strip() for p in raw.split(",")]
    if len(parts) == 4 and all(re.fullmatch(r"[0-9]+", p) for p in parts):
        x0, y0, x1, y1 = (int(p) for p in parts)
        if x0 < x1 and y0 < y1:
            return (x0, y0, x1, y1), None
    return None, f"target_box must be x0,y0,x1,y1 with x0<x1, y0<y1, got {raw!r}"


def _slug(image: str) -> str:
    """Short lowercase ASCII slug of the image's file stem ("" when nothing usable is left)."""
    name = image.split(":", 1)[1] if image.startswith("skimage:") else image
    stem = posixpath.splitext(posixpath.basename(name.replace("\\", "/").rstrip("/")))[0]
    ascii_ = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_.lower()).strip("-")[:24].strip("-")


def _derived_id(image: str, prompt: str, source: str | None, seed: object, box: object) -> str:
    # Hash the raw image cell, not the resolved path, so moving the manifest's folder keeps ids;
    # JSON keeps fields unambiguous (no separator collisions, None differs from "").
    key = json.dumps([image, prompt, source, seed, box], ensure_ascii=False)
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:10]
    slug = _slug(image)
    return f"{slug}-{digest}" if slug else digest


def _id_problem(item_id: str) -> str | None:
    ok = _ID_RE.fullmatch(item_id) and ".." not in item_id
    return None if ok else f"unsafe id {item_id!r}: {_ID_RULE}"


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Read and check a whole manifest (local path or fsspec URL) before any work is done.

    Raises :class:`ManifestError` for file-level problems; row-level problems are reported in
    each row's ``error``. Rows whose cells are all empty are skipped (but still counted in
    ``row``). Duplicate ids are found ignoring case; the first occurrence stays valid.
    """
    path = os.fspath(path)
    records = _parse_csv(path, _read_text(path))
    # Blank lines above the header are skipped; a file of only blank lines counts as empty.
    start = next((i for i, r in enumerate(records) if any(c.strip() for c in r)), None)
    if start is None:
        raise ManifestError(path, "empty file")
    header = [h.strip().lower() for h in records[start]]
    dupes = sorted(h for h, n in Counter(header).items() if h and n > 1)
    if dupes:
        raise ManifestError(path, f"duplicate column names: {', '.join(dupes)}")
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        found = ", ".join(repr(h) for h in header)
        raise ManifestError(path, f"missing required column(s) {', '.join(missing)}; found {found}")
    col = {name: header.index(name) for name in KNOWN if name in header}

    # Relative images resolve against the manifest's folder, never the current directory.
    local = path.removeprefix("file://")
    if "://" in local:
        proto, rest = local.split("://", 1)
        base = f"{proto}://{posixpath.dirname(rest)}"
    else:
        base = os.path.dirname(os.path.abspath(local))

    rows: list[ManifestRow] = []
    first_row_of: dict[str, int] = {}  # lowercased: "A" and "a" share a folder on macOS/Windows
    for number, record in enumerate(records[start + 1 :], start=1):
        cells = [c.strip() for c in record]
        if not any(cells):
            continue  # blank lines and spreadsheet rows of bare commas
        get = defaultdict(str, {n: cells[i] for n, i in col.items() if i < len(cells)})
        image, image_err = _resolve_image(get["image"], base)
        seed, seed_err = _parse_seed(get["seed"])
        box, box_err = _parse_box(get["target_box"])
        mask, mask_err = _resolve_mask(get["target_mask"], base)
        source = get["source"] or None
        # Unparseable seed/box cells hash as their raw text: such rows are errors anyway.
        seed_key = get["seed"] if seed_err else seed
        box_key = get["target_box"] if box_err else box
        item_id = get["id"] or _derived_id(get["image"], get["prompt"], source, seed_key, box_key)
        extra = len(cells) > len(header) and any(cells[len(header) :])
        errors = [
            f"row has {len(cells)} fields but the header has {len(header)}" if extra else None,
            image_err,
            None if get["prompt"] else "empty prompt",
            seed_err,
            box_err,
            mask_err,
            _id_problem(item_id) if get["id"] else None,
        ]
        if item_id.lower() in first_row_of:
            errors.append(f"duplicate id {item_id!r} (also row {first_row_of[item_id.lower()]})")
        else:
            first_row_of[item_id.lower()] = number
        error = "; ".join(e for e in errors if e) or None
        rows.append(ManifestRow(number, item_id, image, get["prompt"], source, seed, box, error,
                                target_mask=mask))
    if not rows:
        raise ManifestError(path, "no data rows (only a header)")
    return rows


def safe_item_dir(out_dir: str, item_id: str) -> str:
    """``out_dir`` joined with ``item_id``, refusing any id that is not one safe path component
    or that would land outside ``out_dir`` (defence in depth for unvalidated ids)."""
    if not isinstance(item_id, str) or _id_problem(item_id):
        raise ValueError(f"unsafe item id {item_id!r} for {out_dir}: {_ID_RULE}")
    out_dir = os.fspath(out_dir)
    if "://" in out_dir:
        # The id is one component without "/" or "..": appending cannot leave the folder.
        return posixpath.join(out_dir, item_id)
    joined = os.path.join(out_dir, item_id)
    # realpath too: a pre-existing symlink named like the id must not lead elsewhere.
    for norm in (os.path.abspath, os.path.realpath):
        b, f = norm(out_dir), norm(joined)
        if f == b or os.path.commonpath([b, f]) != b:
            raise ValueError(f"item id {item_id!r} escapes {out_dir}")
    return joined
