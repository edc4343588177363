"""Where a batch keeps its files: one output folder (local path or fsspec URL), every file written
atomically (temporary name, then rename), so a crash never leaves half a file that a later run
would trust. Only PNG, JSON and Parquet are written or read: no pickle.
"""

from __future__ import annotations

import io
import json
import posixpath
import uuid
from typing import Any

import fsspec
from PIL import Image


class Store:
    """Files under ``root``, addressed by POSIX-style relative paths that never leave it."""

    def __init__(self, root: str) -> None:
        self.fs, path = fsspec.core.url_to_fs(str(root))
        self.root = path.rstrip("/") or "/"
        self.url = str(root)

    def path(self, rel: str) -> str:
        full = posixpath.normpath(posixpath.join(self.root, rel))
        if full != self.root and not full.startswith(self.root.rstrip("/") + "/"):
            raise ValueError(f"path {rel!r} escapes the output folder {self.url}")
        return full

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    # -- writing ---------------------------------------------------------------------------
    def write_bytes(self, rel: str, data: bytes) -> str:
        target = self.path(rel)
        folder = posixpath.dirname(target)
        self.fs.makedirs(folder, exist_ok=True)
        tmp = posixpath.join(folder, f".{posixpath.basename(target)}.{uuid.uuid4().hex}.tmp")
        with self.fs.open(tmp, "wb") as handle:
            handle.write(data)
        try:
            self.fs.mv(tmp, target)  # a rename on local disks: atomic
        except Exception:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise
        return target

    def write_json(self, rel: str, value: Any) -> str:
        return self.write_bytes(rel, json.dumps(value, indent=2, default=_jsonable).encode())

    def write_png(self, rel: str, image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return self.write_bytes(rel, buffer.getvalue())

    def write_parquet(self, rel: str, frame) -> str:
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        return self.write_bytes(rel, buffer.getvalue())

    # -- reading ---------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as handle:
            return handle.read()

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def read_png(self, rel: str) -> Image.Image:
        image = Image.open(io.BytesIO(self.read_bytes(rel)))
        image.load()
        return image.convert("RGB")

    def read_parquet(self, rel: str):
        import pandas as pd

        return pd.read_parquet(io.BytesIO(self.read_bytes(rel)))


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays in records."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
