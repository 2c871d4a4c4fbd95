"""Content hashes used by manifests, provenance records and the audit."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    """The one serialisation whose hash identifies a parameter set: sorted keys, no spaces."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def sha256_json(obj: Any) -> str:
    return sha256_bytes(canonical_json(obj).encode("ascii"))


def sha256_array(array) -> str:
    """Hash of an array's dtype, shape and C-order bytes: identifies image data independently of
    the container file (npz, shard layout) it was stored in."""
    import numpy as np

    a = np.ascontiguousarray(array)
    h = hashlib.sha256()
    h.update(f"{a.dtype.str}|{','.join(map(str, a.shape))}|".encode("ascii"))
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def list_files(root: str | os.PathLike, exclude: tuple[str, ...] = ()) -> list[Path]:
    """Every regular file under `root`, as sorted relative paths (hidden temporaries skipped)."""
    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            rel = Path(dirpath, name).relative_to(root)
            if rel.as_posix() not in exclude:
                out.append(rel)
    return sorted(out, key=lambda p: p.as_posix())


def hash_tree(root: str | os.PathLike, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under `root`, keyed by POSIX relative path."""
    root = Path(root)
    return {rel.as_posix(): sha256_file(root / rel) for rel in list_files(root, exclude)}


def tree_digest(file_hashes: dict[str, str]) -> str:
    """One hash for a folder: sha256 over the sorted `path sha256` lines."""
    lines = "".join(f"{p} {h}\n" for p, h in sorted(file_hashes.items()))
    return sha256_bytes(lines.encode("utf-8"))


class ImageStreamHash:
    """sha256 of a stream of equally shaped arrays fed in batches: dtype and item shape, then
    the C-order bytes of every item in order. It does not depend on how the stream was split
    into batches or shards, so a writer can hash what it writes and a reader can check it."""

    def __init__(self, item_shape: tuple[int, ...], dtype: str = "|u1"):
        self._h = hashlib.sha256()
        self._h.update(f"{dtype}|{','.join(map(str, item_shape))}|".encode("ascii"))
        self.item_shape, self.dtype, self.count = tuple(item_shape), dtype, 0

    def update(self, batch) -> "ImageStreamHash":
        import numpy as np

        b = np.ascontiguousarray(batch)
        if tuple(b.shape[1:]) != self.item_shape or b.dtype.str != self.dtype:
            raise ValueError(f"items {b.dtype.str}{tuple(b.shape[1:])} != {self.dtype}{self.item_shape}")
        self.count += b.shape[0]
        self._h.update(memoryview(b).cast("B"))
        return self

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def sha256_images(array) -> str:
    """`ImageStreamHash` of a whole array (N, ...) at once (e.g. uint8 images (N, H, W, 3))."""
    import numpy as np

    a = np.asarray(array)
    return ImageStreamHash(a.shape[1:], a.dtype.str).update(a).hexdigest()
