"""Random access to a prepared split, for trainers that draw seeded batches from anywhere in it.

A paper-scale split does not fit in memory (ImageNet 256 is ~250 GB of uint8), so rows are read
from the shards on demand. Shards are written uncompressed (`ZIP_STORED`) by default, and a
stored `.npy` member of a zip is a contiguous byte range: its offset, dtype and shape are read
from the zip and npy headers once per shard, and each requested row is then one positional read
(`os.preadv`) straight into the caller's buffer, served by the page cache. Deflate-compressed
shards cannot be read in place; they are decompressed on first use and kept in a small LRU.

Open files are bounded: the readers keep at most `max_open` shard files open (an LRU of
descriptors; the row offsets stay known after a file is closed, so reopening costs one
`open`). Memory-mapping every member instead, as this module once did, costs one descriptor per
shard member (Python's `mmap` keeps a duplicate descriptor for its lifetime), which the ImageNet
latent cache alone (~310 shards x 3 members) takes past the common soft limit of 1024. The
default bound is a sixteenth of the process's soft `RLIMIT_NOFILE` (at least 8), so a trainer's
readers (latents, targets, images) together stay well inside it.

Reading is verifying: each shard's sha256 (listed in the manifest) is checked when the shard is
first opened, before any of its data is used (`runtime.integrity`: once per process and file,
lazily, so a paper-scale cache costs nothing up front). `verify=False` or `SPECMATCH_VERIFY=0`
skip the check, and the provenance of what is made then records it.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import struct
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SpecmatchError
from ..runtime import integrity
from .shards import MANIFEST, _split_entry, read_manifest

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zip local file header (30 bytes)


@dataclass(frozen=True)
class MemberLayout:
    """Where a stored .npy member's data lies in its zip: byte offset, dtype and shape."""

    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    @property
    def row_spec(self) -> tuple[np.dtype, tuple[int, ...]]:
        return self.dtype, self.shape[1:]


def member_layout(path: Path, member: str) -> MemberLayout | None:
    """The layout of `member` (an .npy) inside the zip at `path`, or None when the member is
    compressed (and so cannot be read in place)."""
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
            f.seek(info.header_offset + _LOCAL_HEADER.size + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise SpecmatchError(f"{path}: {member} has npy format version {version}, expected 1.0 or 2.0")
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    if fortran:
        raise SpecmatchError(f"{path}: {member} is Fortran-ordered; shards are written C-ordered")
    return MemberLayout(offset, np.dtype(dtype), tuple(int(s) for s in shape))


def _member_memmap(path: Path, member: str) -> np.memmap | None:
    """A read-only memmap of `member` (holds a file descriptor while it lives): for tests and
    tools that edit or inspect one shard, not for bulk reading."""
    lay = member_layout(path, member)
    if lay is None:
        return None
    return np.memmap(path, dtype=lay.dtype, mode="r", offset=lay.offset, shape=lay.shape)


def default_max_open() -> int:
    """Shard files a reader keeps open at most: a sixteenth of the soft descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 256
    return max(8, int(soft) // 16)


class ShardedArrays:
    """Rows of the same named arrays spread over npz shards, read by global index: stored
    members by positional reads through at most `max_open` open files, deflated ones
    decompressed on first use into a small LRU (`cache_shards`). Serves the dataset splits
    (images, labels) and the caches (latents, targets). Thread-safe (one lock per reader).

    `sha256s` are the manifest's hashes of the files: each file is checked against its hash when
    first opened (`verify`: None follows `$SPECMATCH_VERIFY`, on by default)."""

    def __init__(self, files: list[Path], counts: list[int], members: tuple[str, ...], source: str,
                 cache_shards: int = 4, sha256s: list[str | None] | None = None, verify: bool | None = None,
                 max_open: int | None = None):
        self.files, self.members, self.source = list(files), tuple(members), source
        self.sha256s = list(sha256s) if sha256s is not None else [None] * len(self.files)
        if len(self.sha256s) != len(self.files):
            raise ValueError(f"{source}: {len(self.files)} files but {len(self.sha256s)} sha256s")
        self.verify = integrity.resolve(verify)
        for p in self.files:
            if not p.is_file():
                raise SpecmatchError(f"{p}: shard listed in {source} is missing")
        self.starts = np.asarray(np.cumsum([0] + list(counts[:-1])) if counts else [], dtype=np.int64)
        self.counts = [int(c) for c in counts]
        self.count = int(sum(counts))
        self.max_open = max(1, int(max_open) if max_open is not None else default_max_open())
        self._layouts: dict[int, tuple[MemberLayout, ...]] = {}
        self._plans: dict[int, tuple[tuple[int, int], ...]] = {}  # (offset, row bytes) per member
        self._fds: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._lru: collections.OrderedDict[int, tuple[np.ndarray, ...]] = collections.OrderedDict()
        self._cache = max(1, cache_shards)
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return self.count

    # -- shards ------------------------------------------------------------------------------

    def _open(self, i: int) -> tuple[MemberLayout, ...] | None:
        """The members' layouts of shard i (None when the shard is deflated), checking the file
        the first time this process touches it."""
        if i in self._layouts:
            return self._layouts[i]
        if i in self._lru:
            return None
        path = self.files[i]
        # Before any data of the file is used; hashed once per process (memo), so a shard
        # whose descriptor or decompressed copy was evicted is not hashed again.
        integrity.check_file(path, self.sha256s[i], self.source, self.verify)
        try:
            layouts = [member_layout(path, f"{m}.npy") for m in self.members]
        except KeyError as e:
            with zipfile.ZipFile(path) as zf:
                names = [n[:-4] for n in zf.namelist()]
            raise SpecmatchError(f"{path}: shard has no {e.args[0]!r} (members: {names})") from None
        if any(lay is None for lay in layouts):
            self._decompressed(i)
            return None
        first = self._layouts.get(next(iter(self._layouts))) if self._layouts else None
        for k, (m, lay) in enumerate(zip(self.members, layouts)):
            if lay.shape[:1] != (self.counts[i],):
                raise SpecmatchError(f"{path}: member {m!r} holds {lay.shape[:1]} rows, {self.source} says "
                                     f"{self.counts[i]}")
            if first is not None and lay.row_spec != first[k].row_spec:
                raise SpecmatchError(f"{path}: member {m!r} is {lay.dtype} {lay.shape[1:]}, other shards of "
                                     f"{self.source} {first[k].dtype} {first[k].shape[1:]}")
        self._layouts[i] = tuple(layouts)
        self._plans[i] = tuple((lay.offset, lay.row_bytes) for lay in layouts)
        return self._layouts[i]

    def _fd(self, i: int) -> int:
        fd = self._fds.get(i)
        if fd is not None:
            self._fds.move_to_end(i)
            return fd
        while len(self._fds) >= self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        fd = os.open(self.files[i], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._fds[i] = fd
        return fd

    def _decompressed(self, i: int) -> tuple[np.ndarray, ...]:
        if i in self._lru:
            self._lru.move_to_end(i)
            return self._lru[i]
        path = self.files[i]
        integrity.check_file(path, self.sha256s[i], self.source, self.verify)
        with np.load(path, allow_pickle=False) as z:
            missing = [m for m in self.members if m not in z.files]
            if missing:
                raise SpecmatchError(f"{path}: shard has no {missing} (members: {z.files})")
            arrays = tuple(z[m] for m in self.members)
        self._lru[i] = arrays
        if len(self._lru) > self._cache:
            self._lru.popitem(last=False)
        return arrays

    def close(self) -> None:
        """Close the open shard files (reading again reopens them)."""
        with self._lock:
            while self._fds:
                os.close(self._fds.popitem()[1])

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- rows --------------------------------------------------------------------------------

    def row_specs(self) -> tuple[tuple[np.dtype, tuple[int, ...]], ...]:
        """(dtype, shape of one row) of every member, as the first shard stores them."""
        with self._lock:
            if not self.files:
                raise IndexError(f"{self.source}: no shards")
            lay = self._open(0)
            if lay is not None:
                return tuple((m.dtype, m.shape[1:]) for m in lay)
            return tuple((a.dtype, a.shape[1:]) for a in self._decompressed(0))

    def out_arrays(self, n: int) -> tuple[np.ndarray, ...]:
        """Empty arrays for `n` rows of every member."""
        return tuple(np.empty((n,) + shape, dtype) for dtype, shape in self.row_specs())

    def get(self, indices, out: tuple[np.ndarray, ...] | None = None) -> tuple[np.ndarray, ...]:
        """The member arrays' rows at the given global indices, one array per member; `out`:
        arrays to fill instead (C-contiguous, one row per index, the members' dtypes)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            raise IndexError(f"{self.source}: no indices requested")
        if idx.min() < 0 or idx.max() >= self.count:
            raise IndexError(f"{self.source}: index out of range [0, {self.count})")
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        with self._lock:
            if out is None:
                out = self.out_arrays(idx.size)
            elif len(out) != len(self.members) or any(o.shape[0] != idx.size or not o.flags.c_contiguous
                                                      for o in out):
                raise ValueError(f"{self.source}: `out` must hold {len(self.members)} C-contiguous arrays of "
                                 f"{idx.size} rows")
            # byte views of the outputs, one row per index
            flats = [o.reshape(idx.size, -1).view(np.uint8) for o in out]
            order = np.argsort(shard, kind="stable")
            bounds = np.flatnonzero(np.diff(shard[order])) + 1
            for sel in np.split(order, bounds):
                s = int(shard[sel[0]])
                rows = idx[sel] - self.starts[s]
                lay = self._open(s)
                if lay is None:
                    for o, a in zip(out, self._decompressed(s)):
                        o[sel] = a[rows]
                    continue
                for o, ml in zip(out, lay):
                    if (o.dtype, o.shape[1:]) != ml.row_spec:
                        raise ValueError(f"{self.source}: `out` holds {o.dtype} {o.shape[1:]}, the member "
                                         f"{ml.dtype} {ml.shape[1:]}")
                self._read_rows(s, rows, sel, flats)
        return tuple(out)

    def get_tensors(self, indices, pin: bool = False):
        """`get` into torch tensors, allocated in pinned (page-locked) memory when `pin`: a CUDA
        trainer's loader reads there, and the copies to the GPU then run asynchronously."""
        import torch

        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        outs = tuple(torch.empty((idx.size,) + shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype,
                                 pin_memory=pin) for dtype, shape in self.row_specs())
        self.get(idx, out=tuple(t.numpy() for t in outs))
        return outs

    def _read_rows(self, s: int, rows: np.ndarray, sel: np.ndarray, flats: list[np.ndarray]) -> None:
        """Rows `rows` of shard s into the output rows `sel`: one positional read per member and
        run of consecutive rows that land on consecutive output rows."""
        fd = self._fd(s)
        if rows.size == 1:
            runs = [(int(rows[0]), int(sel[0]), 1)]
        else:
            brk = np.flatnonzero((np.diff(rows) != 1) | (np.diff(sel) != 1)) + 1
            first = np.concatenate([[0], brk])
            runs = list(zip(rows[first].tolist(), sel[first].tolist(),
                            np.diff(np.concatenate([first, [rows.size]])).tolist()))
        for (offset, row_bytes), flat in zip(self._plans[s], flats):
            for r, d, k in runs:
                dst = flat[d:d + k]
                got = os.preadv(fd, [dst], offset + r * row_bytes)
                if got != dst.nbytes:
                    raise SpecmatchError(f"{self.files[s]}: short read ({got} of {dst.nbytes} bytes at offset "
                                         f"{offset + r * row_bytes}): the file is truncated")


class SplitReader(ShardedArrays):
    """Images and labels of one split by global index (the manifest's shard order)."""

    def __init__(self, folder: str | os.PathLike, split: str, cache_shards: int = 4, verify: bool | None = None,
                 max_open: int | None = None):
        self.folder = Path(folder)
        man = read_manifest(self.folder)
        entry = _split_entry(man, split, self.folder)
        self.split, self.resolution = split, int(man["resolution"])
        self.images_sha256 = entry["images_sha256"]
        super().__init__([self.folder / s["file"] for s in entry["shards"]],
                         [int(s["count"]) for s in entry["shards"]], ("images", "labels"),
                         f"{self.folder / MANIFEST} (split {split!r})", cache_shards,
                         [s.get("sha256") for s in entry["shards"]], verify, max_open)

    def get(self, indices, out=None) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images (B, H, W, 3) and int64 labels (B,) at the given global indices."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            r = self.resolution
            return np.empty((0, r, r, 3), np.uint8), np.empty((0,), np.int64)
        images, labels = super().get(idx, out)
        return images, labels.astype(np.int64, copy=False)


class ShardedCache(ShardedArrays):
    """A cache folder written by a stage (latent cache, target cache): `manifest.json` with its
    `schema`, `count` and `shards` (file, count), read by global index. Subclasses name the
    schema, the members and the stage that writes them."""

    SCHEMA = ""
    MEMBERS: tuple[str, ...] = ()
    WHAT = "cache"
    STAGE = ""

    def __init__(self, folder: str | os.PathLike, cache_shards: int = 4, verify: bool | None = None,
                 max_open: int | None = None):
        self.folder = Path(folder)
        self.manifest = self.read_manifest(self.folder)
        man = self.manifest
        super().__init__([self.folder / s["file"] for s in man["shards"]], [int(s["count"]) for s in man["shards"]],
                         self.MEMBERS, str(self.folder / "manifest.json"), cache_shards,
                         [s.get("sha256") for s in man["shards"]], verify, max_open)
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
