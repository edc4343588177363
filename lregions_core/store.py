"""Where a batch keeps its files: one output folder, a local path or any fsspec URL (``s3://``,
``gs://``, ``memory://`` ...). A crash never leaves half a file that a later run would trust:

- on object stores a single PUT is already atomic (the object appears whole or not at all), so a
  file is written once, straight to its name;
- on file systems it is written under a temporary name beside its target and renamed (a rename
  is atomic there). Temporary names start with ``.`` so readers of a folder skip them.

Only PNG, JSON and Parquet are written or read: no pickle.

Thread safety: a :class:`Store` keeps no state of its own beyond its root, so task threads may
share one or make their own. Two threads (or processes) writing the same name each write a
temporary file of their own and rename it (or PUT it) whole: the last whole file wins, and no
reader ever sees a mix. Stages only ever write one content under one name (the name is a hash
of what decides it), so which writer wins does not matter.
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from PIL import Image

from lregions_core.loading import heavy_import

# fsspec protocols whose single write is atomic: object stores (one PUT or one completed
# multipart upload makes the object appear whole) and the in-memory file system.
ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})


class Store:
    """Files under ``root``, addressed by POSIX-style relative paths that never leave it."""

    def __init__(self, root: str) -> None:
        self.fs, path = fsspec.core.url_to_fs(str(root))
        self.root = path.rstrip("/") or "/"
        self.url = str(root).rstrip("/") or str(root)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.atomic_put = bool(ATOMIC_PUT_PROTOCOLS.intersection(protocols))
        self.local = "file" in protocols or "local" in protocols

    def path(self, rel: str) -> str:
        full = posixpath.normpath(posixpath.join(self.root, rel))
        if full != self.root and not full.startswith(self.root.rstrip("/") + "/"):
            raise ValueError(f"path {rel!r} escapes the output folder {self.url}")
        return full

    def url_of(self, rel: str) -> str:
        """``rel`` as a URL or path a user can open (``s3://bucket/out/rel``, ``/data/out/rel``)."""
        return posixpath.join(self.url, rel) if rel else self.url

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def size(self, rel: str) -> int:
        """A file's byte size, from the file system's metadata (a stat; on object stores a HEAD
        request, or a listing the file system has cached)."""
        return self.fs.size(self.path(rel))

    def listdir(self, rel: str) -> list[str]:
        """Names of the files and folders directly in ``rel`` (none when it does not exist), as
        other processes left them: listing caches are dropped first."""
        folder = self.path(rel)
        self.fs.invalidate_cache(folder)
        try:
            entries = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    # -- writing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[Any]:
        """A binary file to write ``rel`` through; it appears under its name, whole, only when
        the block ends without an exception (see the module docstring)."""
        target = self.path(rel)
        if self.atomic_put:
            handle = self.fs.open(target, "wb")  # one PUT, or one multipart upload, at close
            try:
                yield handle
            except BaseException:
                handle.discard()  # abort: closing would publish what was written so far
                handle.closed = True  # and nothing left to flush when it is collected
                raise
            handle.close()
            return
        folder = posixpath.dirname(target)
        self.fs.makedirs(folder, exist_ok=True)
        tmp = posixpath.join(folder, f".{posixpath.basename(target)}.{uuid.uuid4().hex}.tmp")
        try:
            with self.fs.open(tmp, "wb") as handle:
                yield handle
            self.fs.mv(tmp, target)  # a rename on local disks: atomic
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    def write_bytes(self, rel: str, data: bytes) -> str:
        if self.atomic_put:
            target = self.path(rel)
            self.fs.pipe_file(target, data)  # one PUT: no temporary copy to move afterwards
            return target
        with self.open_write(rel) as handle:
            handle.write(data)
        return self.path(rel)

    def write_json(self, rel: str, value: Any) -> str:
        return self.write_bytes(rel, json.dumps(value, indent=2, default=_jsonable).encode())

    def write_png(self, rel: str, image: Image.Image) -> str:
        return self.write_bytes(rel, encode_png(image))

    def write_parquet(self, rel: str, frame) -> str:
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        return self.write_bytes(rel, buffer.getvalue())

    def remove(self, rels: list[str]) -> None:
        """Delete files (those already gone are ignored); one request per batch on object
        stores."""
        paths = [self.path(rel) for rel in rels]
        if not paths:
            return
        try:
            self.fs.rm(paths)
        except FileNotFoundError:
            for path in paths:  # some were gone: delete the rest one by one
                try:
                    self.fs.rm(path)
                except FileNotFoundError:
                    pass

    def remove_tree(self, rel: str) -> None:
        """Delete a folder and everything in it (nothing when it does not exist)."""
        folder = self.path(rel)
        if folder == self.root:
            raise ValueError(f"refusing to delete the whole output folder {self.url}")
        self.fs.invalidate_cache(folder)
        try:
            self.fs.rm(folder, recursive=True)
        except FileNotFoundError:
            pass

    # -- reading ---------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as handle:
            return handle.read()

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def read_png(self, rel: str, mode: str = "RGB") -> Image.Image:
        image = Image.open(io.BytesIO(self.read_bytes(rel)))
        image.load()
        return image.convert(mode)

    def read_parquet(self, rel: str):
        pd = heavy_import("pandas")
        return pd.read_parquet(io.BytesIO(self.read_bytes(rel)))


def encode_png(image: Image.Image) -> bytes:
    """``image`` as PNG file bytes (what :meth:`Store.write_png` writes)."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays in records."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
