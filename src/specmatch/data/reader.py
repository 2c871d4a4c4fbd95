"""Random access to a prepared split, for trainers that draw seeded batches from anywhere in it.

A paper-scale split does not fit in memory (ImageNet 256 is ~250 GB of uint8), so the shards'
arrays are memory-mapped: shards are written uncompressed (`ZIP_STORED`) by default, and a
stored `.npy` member of a zip is a contiguous byte range, so numpy can map it in place and the
page cache does the rest. numpy's own `np.load(..., mmap_mode=...)` ignores the mode for .npz
files, hence the few lines that find the member's offset. Deflate-compressed shards cannot be
mapped; they are decompressed on first use and kept in a small LRU cache.

Reading is verifying: each shard's sha256 (listed in the manifest) is checked when the shard is
first opened, before any of its data is used (`runtime.integrity`: once per process and file,
lazily, so a paper-scale cache costs nothing up front). `verify=False` or `SPECMATCH_VERIFY=0`
skip the check, and the provenance of what is made then records it.
"""

from __future__ import annotations

import collections
import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np

from ..errors import SpecmatchError
from ..runtime import integrity
from .shards import MANIFEST, _split_entry, read_manifest

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zip local file header (30 bytes)


def _member_memmap(path: Path, member: str) -> np.ndarray | None:
    """A read-only memmap of `member` (an .npy) inside the zip at `path`, or None when the
    member is compressed."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            header = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
            if header[0] != b"PK\x03\x04":
                raise SpecmatchError(f"{path}: corrupt zip header for {member}")
            name_len, extra_len = header[-2], header[-1]
            data_start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
            f.seek(data_start)
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise SpecmatchError(f"{path}: {member} has npy format version {version}, expected 1.0 or 2.0")
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    if fortran:
        raise SpecmatchError(f"{path}: {member} is Fortran-ordered; shards are written C-ordered")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


class ShardedArrays:
    """Rows of the same named arrays spread over npz shards, read by global index: stored
    members are memory-mapped, deflated ones decompressed on first use into a small LRU cache.
    Serves the dataset splits (images, labels) and the latent cache (mu, logvar, labels).

    `sha256s` are the manifest's hashes of the files: each file is checked against its hash when
    first opened (`verify`: None follows `$SPECMATCH_VERIFY`, on by default)."""

    def __init__(self, files: list[Path], counts: list[int], members: tuple[str, ...], source: str,
                 cache_shards: int = 4, sha256s: list[str | None] | None = None, verify: bool | None = None):
        self.files, self.members, self.source = list(files), tuple(members), source
        self.sha256s = list(sha256s) if sha256s is not None else [None] * len(self.files)
        if len(self.sha256s) != len(self.files):
            raise ValueError(f"{source}: {len(self.files)} files but {len(self.sha256s)} sha256s")
        self.verify = integrity.resolve(verify)
        for p in self.files:
            if not p.is_file():
                raise SpecmatchError(f"{p}: shard listed in {source} is missing")
        self.starts = list(np.cumsum([0] + list(counts[:-1]))) if counts else []
        self.count = int(sum(counts))
        self._mapped: dict[int, tuple[np.ndarray, ...]] = {}
        self._lru: collections.OrderedDict[int, tuple[np.ndarray, ...]] = collections.OrderedDict()
        self._cache = max(1, cache_shards)

    def __len__(self) -> int:
        return self.count

    def _shard(self, i: int) -> tuple[np.ndarray, ...]:
        if i in self._mapped:
            return self._mapped[i]
        if i in self._lru:
            self._lru.move_to_end(i)
            return self._lru[i]
        path = self.files[i]
        # Before any data of the file is used; hashed once per process (memo), so a shard
        # evicted from the LRU and opened again is not hashed again.
        integrity.check_file(path, self.sha256s[i], self.source, self.verify)
        maps = [_member_memmap(path, f"{m}.npy") for m in self.members]
        if all(a is not None for a in maps):
            self._mapped[i] = tuple(maps)
            return self._mapped[i]
        with np.load(path, allow_pickle=False) as z:
            missing = [m for m in self.members if m not in z.files]
            if missing:
                raise SpecmatchError(f"{path}: shard has no {missing} (members: {z.files})")
            arrays = tuple(z[m] for m in self.members)
        self._lru[i] = arrays
        if len(self._lru) > self._cache:
            self._lru.popitem(last=False)
        return arrays

    def get(self, indices) -> tuple[np.ndarray, ...]:
        """The member arrays' rows at the given global indices, one array per member."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.count):
            raise IndexError(f"{self.source}: index out of range [0, {self.count})")
        shard = np.searchsorted(np.asarray(self.starts), idx, side="right") - 1
        out: list[np.ndarray] | None = None
        for s in np.unique(shard):
            arrays = self._shard(int(s))
            if out is None:
                out = [np.empty((idx.size,) + a.shape[1:], a.dtype) for a in arrays]
            sel = np.nonzero(shard == s)[0]
            rows = idx[sel] - self.starts[s]
            for o, a in zip(out, arrays):
                o[sel] = a[rows]
        if out is None:
            raise IndexError(f"{self.source}: no indices requested")
        return tuple(out)


class SplitReader(ShardedArrays):
    """Images and labels of one split by global index (the manifest's shard order)."""

    def __init__(self, folder: str | os.PathLike, split: str, cache_shards: int = 4, verify: bool | None = None):
        self.folder = Path(folder)
        man = read_manifest(self.folder)
        entry = _split_entry(man, split, self.folder)
        self.split, self.resolution = split, int(man["resolution"])
        self.images_sha256 = entry["images_sha256"]
        super().__init__([self.folder / s["file"] for s in entry["shards"]],
                         [int(s["count"]) for s in entry["shards"]], ("images", "labels"),
                         f"{self.folder / MANIFEST} (split {split!r})", cache_shards,
                         [s.get("sha256") for s in entry["shards"]], verify)

    def get(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (B, H, W, 3) and int64 labels (B,) at the given global indices."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            r = self.resolution
            return np.empty((0, r, r, 3), np.uint8), np.empty((0,), np.int64)
        images, labels = super().get(idx)
        return images, labels.astype(np.int64, copy=False)


class ShardedCache(ShardedArrays):
    """A cache folder written by a stage (latent cache, target cache): `manifest.json` with its
    `schema`, `count` and `shards` (file, count), read by global index. Subclasses name the
    schema, the members and the stage that writes them."""

    SCHEMA = ""
    MEMBERS: tuple[str, ...] = ()
    WHAT = "cache"
    STAGE = ""

    def __init__(self, folder: str | os.PathLike, cache_shards: int = 4, verify: bool | None = None):
        self.folder = Path(folder)
        self.manifest = self.read_manifest(self.folder)
        man = self.manifest
        super().__init__([self.folder / s["file"] for s in man["shards"]], [int(s["count"]) for s in man["shards"]],
                         self.MEMBERS, str(self.folder / "manifest.json"), cache_shards,
                         [s.get("sha256") for s in man["shards"]], verify)
        if self.count != int(man["count"]):
            raise SpecmatchError(f"{self.folder / 'manifest.json'}: shards hold {self.count} entries, count says "
                                 f"{man['count']}")
        self.shape = tuple(int(v) for v in man["shape"])

    @classmethod
    def read_manifest(cls, folder: str | os.PathLike) -> dict:
        path = Path(folder) / "manifest.json"
        if not path.is_file():
            raise SpecmatchError(f"{folder}: not a {cls.WHAT} (no manifest.json); run `specmatch {cls.STAGE}`")
        man = json.loads(path.read_text())
        if man.get("schema") != cls.SCHEMA:
            raise SpecmatchError(f"{path}: schema {man.get('schema')!r}, expected {cls.SCHEMA!r}")
        return man

