"""ADM's npz batches: reference batches in, sample batches out (openai/guided-diffusion
`evaluations/`), and the `export-adm` stage.

A reference batch (e.g. `VIRTUAL_imagenet256_labeled.npz`) holds `arr_0`, uint8 images (N, H, W,
3) (10,000 for ImageNet: the precision/recall reference), and the statistics of the whole
dataset: `mu` (2048), `sigma` (2048 x 2048) of the pool features, `mu_s` (2023), `sigma_s` of
the spatial features. The evaluator uses the stored statistics whenever `mu` is present and
computes them from `arr_0` otherwise; `fid ref --reference-batch` does the same.

A sample batch is what the evaluator reads as its second argument: `arr_0` uint8 (N, H, W, 3) and,
for class-conditional samples, `arr_1` labels. It must never contain `mu`: the evaluator would
take stored statistics instead of measuring the images. `specmatch export-adm` writes one from a
`specmatch sample` output (or any prepared split), streaming: a 50k x 256 x 256 batch is 9.8 GB.

Both are read member by member from the zip, header first and rows in batches, so that neither
is ever loaded whole (as the evaluator's own streaming reader does).
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np

from ..data.reader import SplitReader
from ..data import sample_folder
from ..errors import SpecmatchError
from ..runtime import integrity
from ..runtime.atomic import atomic_dir
from ..runtime.hashing import ImageStreamHash, sha256_file
from ..runtime.provenance import Provenance

log = logging.getLogger(__name__)

IMAGES, LABELS = "arr_0", "arr_1"
POOL_DIM, SPATIAL_DIM = 2048, 2023
# The statistics of a reference batch and their shapes (all four, or none).
STAT_SHAPES = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM), "mu_s": (SPATIAL_DIM,),
               "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}
FILE = "samples.npz"
EXPORT_JSON = "adm_export.json"
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # zip entry dates: the same images give the same bytes
_READ_ROWS = 256
_REPLACE_REFERENCE = ("replace the reference batch (`specmatch resources check` compares it with its checksum; "
                      "docs/metrics.md names its source)")
_REMAKE_SAMPLES = "write the sample batch again (`specmatch export-adm` of its sample folder)"


def _read_exact(f: BinaryIO, size: int, where: str) -> bytearray:
    """`size` bytes (a writable buffer: the arrays made on it are writable, as torch wants them)."""
    data = bytearray()
    while len(data) < size:
        chunk = f.read(size - len(data))
        if not chunk:
            raise SpecmatchError(f"{where}: the array data ends after {len(data)} of {size} bytes (truncated file)")
        data += chunk
    return data


def _header(f: BinaryIO, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"npy format version {version}")
        return read(f)
    except ValueError as e:
        raise SpecmatchError(f"{where}: not a readable .npy member ({e})") from None


def members(path: str | Path, remedy: str = "") -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of every array of an npz file, read from the headers only; errors
    name the file and end with `remedy` (what to do about it)."""
    path = Path(path)
    tail = f"; {remedy}" if remedy else ""
    if not path.is_file():
        raise SpecmatchError(f"{path}: no such npz file{tail}")
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    continue
                with zf.open(name) as f:
                    shape, fortran, dtype = _header(f, f"{path}: key {name[:-4]!r}")
                if fortran:
                    raise SpecmatchError(f"{path}: key {name[:-4]!r} is Fortran-ordered; expected a C-ordered array")
                out[name[:-4]] = (tuple(shape), dtype)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise SpecmatchError(f"{path}: not an npz file, or a damaged one ({type(e).__name__}: {e}){tail}") from None
    return out


def iter_rows(path: str | Path, key: str, batch_size: int = _READ_ROWS, remedy: str = "") -> Iterator[np.ndarray]:
    """The rows of one array of an npz file in batches, without loading the array; errors name
    the file and the key and end with `remedy`."""
    path = Path(path)
    where = f"{path}: key {key!r}"
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
            shape, _, dtype = _header(f, where)
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            for i in range(0, shape[0], batch_size):
                b = min(batch_size, shape[0] - i)
                yield np.frombuffer(_read_exact(f, b * row, where), dtype=dtype).reshape((b, *shape[1:]))
    except (zipfile.BadZipFile, EOFError) as e:  # a CRC mismatch or a cut file, found while reading
        raise SpecmatchError(f"{where}: corrupt or truncated ({e})" + (f"; {remedy}" if remedy else "")) from None


def _check_images(path: Path, found: dict, key: str = IMAGES) -> tuple[int, tuple[int, int, int]]:
    if key not in found:
        raise SpecmatchError(f"{path}: no key {key!r} (the uint8 images, N x H x W x 3); keys: {sorted(found)}")
    shape, dtype = found[key]
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[0] < 1:
        raise SpecmatchError(f"{path}: key {key!r} is {dtype}{shape}, expected uint8 images (N, H, W, 3), N >= 1")
    return int(shape[0]), tuple(int(v) for v in shape[1:])


@dataclass(frozen=True)
class ReferenceBatch:
    """An ADM reference batch: its images (`images()` streams arr_0) and, when it stores them,
    the dataset's statistics (mu, sigma, mu_s, sigma_s; float64)."""

    path: Path
    sha256: str
    n_images: int
    image_shape: tuple[int, int, int]
    stats: dict[str, np.ndarray] | None

    def images(self, batch_size: int = _READ_ROWS) -> Iterator[np.ndarray]:
        return iter_rows(self.path, IMAGES, batch_size, _REPLACE_REFERENCE)


def read_reference_batch(path: str | Path, sha256: str | None = None) -> ReferenceBatch:
    """Validate and open an ADM reference batch: `arr_0` uint8 (N, H, W, 3) and either all of
    mu, sigma, mu_s, sigma_s with the evaluator's shapes, finite, or none of them. Errors name
    the file and the key. `sha256`: the file's, when the caller hashed it already."""
    path = Path(path)
    found = members(path, _REPLACE_REFERENCE)
    n, shape = _check_images(path, found)
    present = [k for k in STAT_SHAPES if k in found]
    stats = None
    if present:
        missing = [k for k in STAT_SHAPES if k not in found]
        if missing:
            raise SpecmatchError(f"{path}: has {present} but no key {missing[0]!r}: an ADM reference batch stores "
                                 "all of mu, sigma, mu_s, sigma_s (or none, and they are computed from arr_0)")
        for k, want in STAT_SHAPES.items():
            got_shape, dtype = found[k]
            if got_shape != want or dtype.kind != "f":
                raise SpecmatchError(f"{path}: key {k!r} is {dtype}{got_shape}, expected float {want} (the ADM "
                                     "evaluator's Inception statistics)")
        stats = {k: np.asarray(v, dtype=np.float64)
                 for k, v in integrity.load_npz(path, tuple(STAT_SHAPES), _REPLACE_REFERENCE).items()}
        for k, v in stats.items():
            if not np.isfinite(v).all():
                raise SpecmatchError(f"{path}: key {k!r} holds non-finite values")
    return ReferenceBatch(path, sha256 or sha256_file(path), n, shape, stats)


def _write_member(zf: zipfile.ZipFile, key: str, dtype: np.dtype, shape: tuple[int, ...],
                  rows: Iterable[np.ndarray]) -> int:
    info = zipfile.ZipInfo(f"{key}.npy", date_time=_FIXED_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    written = 0
    with zf.open(info, "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                 "fortran_order": False, "shape": tuple(shape)})
        for r in rows:
            r = np.ascontiguousarray(r, dtype=dtype)
            f.write(memoryview(r).cast("B"))
            written += r.shape[0]
    return written


def write_sample_batch(path: str | Path, chunks: Iterable[tuple[np.ndarray, np.ndarray]], n: int,
                       image_shape: tuple[int, int, int]) -> str:
    """Write ADM's sample layout: `arr_0` uint8 (n, H, W, 3) streamed from (images, labels)
    chunks, then `arr_1` int64 labels (n,); no other key. Returns the sha256 of the images
    (`ImageStreamHash`, as the dataset manifests record it)."""
    hasher = ImageStreamHash(tuple(image_shape))
    labels: list[np.ndarray] = []

    def image_rows():
        for images, lab in chunks:
            hasher.update(images)
            labels.append(np.asarray(lab, np.int64))
            yield images

    with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        got = _write_member(zf, IMAGES, np.uint8, (n, *image_shape), image_rows())
        if got != n:
            raise SpecmatchError(f"{path}: {got} images written, {n} announced")
        _write_member(zf, LABELS, np.int64, (n,), [np.concatenate(labels) if labels else np.zeros(0, np.int64)])
    return hasher.hexdigest()


@dataclass(frozen=True)
class SampleBatch:
    path: Path
    n: int
    image_shape: tuple[int, int, int]
    labels: np.ndarray | None

    def images(self, batch_size: int = _READ_ROWS) -> Iterator[np.ndarray]:
        return iter_rows(self.path, IMAGES, batch_size, _REMAKE_SAMPLES)


def read_sample_batch(path: str | Path) -> SampleBatch:
    """An ADM sample batch, checked: arr_0 uint8 (N, H, W, 3), arr_1 (if present) N integer
    labels, and no `mu` (which would make the evaluator skip the images)."""
    path = Path(path)
    found = members(path, _REMAKE_SAMPLES)
    n, shape = _check_images(path, found)
    if "mu" in found:
        raise SpecmatchError(f"{path}: has a key 'mu': the ADM evaluator would read stored statistics instead of "
                             "measuring the images; a sample batch holds arr_0 (and arr_1) only")
    labels = None
    if LABELS in found:
        lshape, ldtype = found[LABELS]
        if lshape != (n,) or ldtype.kind not in "iu":
            raise SpecmatchError(f"{path}: key {LABELS!r} is {ldtype}{lshape}, expected {n} integer labels")
        labels = integrity.load_npz(path, (LABELS,), _REMAKE_SAMPLES)[LABELS]
    return SampleBatch(path, n, shape, labels)


def export(samples: str | Path, split: str, name: str, out: str | Path) -> dict[str, Any]:
    """`specmatch export-adm`: the images of a split (the `samples` split of a `specmatch sample`
    output) as an ADM sample batch `OUT/samples.npz`, with `adm_export.json` (count, shape, the
    images' sha256, equal to the source manifest's, the npz sha256, the sampling protocol) and
    provenance.json."""
    folder = Path(samples)
    reader = SplitReader(folder, split)
    n = len(reader)
    if n == 0:
        raise SpecmatchError(f"{folder}: split {split!r} has no images")
    res = reader.resolution
    sampling = sample_folder.read(folder)
    prov = Provenance("export-adm", name, {"split": split})
    prov.add_input(folder, "samples")

    def chunks():
        for i in range(0, n, _READ_ROWS):
            yield reader.get(np.arange(i, min(n, i + _READ_ROWS)))

    with atomic_dir(out) as tmp:
        images_sha = write_sample_batch(tmp / FILE, chunks(), n, (res, res, 3))
        if images_sha != reader.images_sha256:
            raise SpecmatchError(f"{folder}: the images read hash to {images_sha}, the manifest records "
                                 f"{reader.images_sha256} (split {split!r}); the folder changed or is corrupt")
        info = {"name": name, "source": str(folder), "split": split, "n": n, "image_shape": [res, res, 3],
                "images_sha256": images_sha, "npz": FILE, "npz_sha256": sha256_file(tmp / FILE),
                "keys": [IMAGES, LABELS], "sampling": None if sampling is None else sampling.to_json()}
        (tmp / EXPORT_JSON).write_text(json.dumps(info, indent=1) + "\n")
        prov.protocol = {"layout": "ADM sample batch: arr_0 uint8 NHWC, arr_1 int64 labels",
                         "images_sha256": images_sha}
        prov.write(out, tmp)
    log.info("export-adm %s: %d images of %s (%s) -> %s", name, n, folder, split, Path(out) / FILE)
    return info
