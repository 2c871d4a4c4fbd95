"""uint8 image shards (npz) and the dataset manifest that lists them.

A shard is an uncompressed (or deflated) .npz holding `images` (N, H, W, 3) uint8, `labels`
(N,) int64 and `sources` (N,) int64 (index into the manifest's `files`). numpy's own savez
stamps the current time into the zip entries, which would make two identical runs differ
byte for byte; this writer fixes the entry dates so that the same data gives the same bytes.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import SpecmatchError
from ..runtime import atomic, integrity
from ..runtime.hashing import ImageStreamHash, sha256_file

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = "specmatch.dataset/1"
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], compression: str = "none") -> None:
    """Write a deterministic .npz (loadable by `np.load`) atomically."""
    method = {"none": zipfile.ZIP_STORED, "deflate": zipfile.ZIP_DEFLATED}[compression]
    with atomic.atomic_file(path, "wb") as f:
        with zipfile.ZipFile(f, "w", compression=method, allowZip64=True) as zf:
            for name in sorted(arrays):
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_DATE)
                info.compress_type = method
                info.external_attr = 0o644 << 16
                zf.writestr(info, buf.getvalue())


class ShardWriter:
    """Collects one split's images and writes fixed-size shards, hashing as it goes."""

    def __init__(self, folder: Path, split: str, resolution: int, shard_size: int, compression: str = "none"):
        self.folder, self.split = Path(folder), split
        self.shard_size, self.compression = shard_size, compression
        self._hash = ImageStreamHash((resolution, resolution, 3))
        self._label_hash = ImageStreamHash((), dtype="<i8")
        self._buf: list[tuple[np.ndarray, int, int]] = []
        self.shards: list[dict[str, Any]] = []
        self.label_counts: dict[int, int] = {}

    def add(self, image: np.ndarray, label: int, source: int) -> None:
        self._buf.append((image, int(label), int(source)))
        self.label_counts[int(label)] = self.label_counts.get(int(label), 0) + 1
        if len(self._buf) == self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        images = np.stack([b[0] for b in self._buf]).astype(np.uint8, copy=False)
        labels = np.array([b[1] for b in self._buf], dtype=np.int64)
        sources = np.array([b[2] for b in self._buf], dtype=np.int64)
        self._hash.update(images)
        self._label_hash.update(labels)
        name = f"{self.split}-{len(self.shards):05d}.npz"
        write_npz(self.folder / name, {"images": images, "labels": labels, "sources": sources},
                  self.compression)
        self.shards.append({"file": name, "count": len(self._buf), "sha256": sha256_file(self.folder / name)})
        self._buf = []

    def add_shard(self, path: Path, sha256: str | None = None) -> None:
        """Take a finished shard file (images, labels, sources) into the split as it is, without
        writing it again: hard-linked into the folder under the split's next shard name (moved
        where the file system cannot link, e.g. another device), its images and labels hashed
        in order as if written here. Stage outputs that are made of shards a job wrote before
        (samples) are so stored once. `sha256`: the file's, where the caller has it already (the
        shard writer's record), so a large sample set is not read a second time for it."""
        import shutil

        self._flush()
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"].astype(np.int64, copy=False)
        self._hash.update(images)
        self._label_hash.update(labels)
        for lb in labels.tolist():
            self.label_counts[int(lb)] = self.label_counts.get(int(lb), 0) + 1
        name = f"{self.split}-{len(self.shards):05d}.npz"
        try:
            os.link(path, self.folder / name)
        except OSError:
            shutil.move(str(path), self.folder / name)
        self.shards.append({"file": name, "count": int(len(labels)),
                            "sha256": sha256 or sha256_file(self.folder / name)})

    def close(self) -> dict[str, Any]:
        self._flush()
        return {
            "count": self._hash.count,
            "shards": self.shards,
            "images_sha256": self._hash.hexdigest(),
            "labels_sha256": self._label_hash.hexdigest(),
            "label_counts": {str(k): v for k, v in sorted(self.label_counts.items())},
        }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    atomic.write_text(Path(folder) / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise SpecmatchError(f"{folder}: not a prepared dataset (no {MANIFEST}); run `specmatch prepare-data` first")
    with open(path, encoding="utf-8") as f:
        man = json.load(f)
    if man.get("schema") != MANIFEST_SCHEMA:
        raise SpecmatchError(f"{path}: unknown manifest schema {man.get('schema')!r}, expected {MANIFEST_SCHEMA!r}")
    return man


def _split_entry(man: dict[str, Any], split: str, folder: Path) -> dict[str, Any]:
    if split not in man["splits"]:
        raise SpecmatchError(f"{folder / MANIFEST}: no split {split!r} (has {sorted(man['splits'])})")
    return man["splits"][split]


def iter_shards(folder: str | os.PathLike, split: str, verify: bool | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yield each shard of a split as a dict of arrays, each checked against its sha256 in the
    manifest before it is read (`verify`: None follows `$SPECMATCH_VERIFY`, on by default)."""
    folder = Path(folder)
    man = read_manifest(folder)
    for shard in _split_entry(man, split, folder)["shards"]:
        path = folder / shard["file"]
        if not path.is_file():
            raise SpecmatchError(f"{path}: shard listed in {folder / MANIFEST} is missing")
        integrity.check_file(path, shard.get("sha256"), folder / MANIFEST, verify)
        with np.load(path, allow_pickle=False) as z:
            yield {k: z[k] for k in z.files}


def subset_indices(total: int, max_images: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of a seeded subset of `max_images` out of `total` (None = keep all)."""
    if max_images is None or total <= max_images:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, size=max_images, replace=False))


def iter_image_batches(folder: str | os.PathLike, split: str, batch_size: int, max_images: int | None = None,
                       seed: int = 0, verify: bool | None = None) -> Iterator[np.ndarray]:
    """uint8 image batches (B, H, W, 3) of a split, or of a seeded subset of it, in shard order."""
    folder = Path(folder)
    total = _split_entry(read_manifest(folder), split, folder)["count"]
    if total == 0:
        raise SpecmatchError(f"{folder}: split {split!r} has no images")
    keep = subset_indices(total, max_images, seed)
    offset = 0
    for shard in iter_shards(folder, split, verify=verify):
        imgs = shard["images"]
        if keep is not None:
            local = keep[(keep >= offset) & (keep < offset + len(imgs))] - offset
            offset += len(imgs)
            imgs = imgs[local]
        for i in range(0, len(imgs), batch_size):
            yield imgs[i:i + batch_size]
