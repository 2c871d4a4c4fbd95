"""Reading is verifying: a file listed in a manifest with its sha256 is checked before use.

Every reader of manifest-listed files (dataset shards, latent and target caches) calls
`check_file` before it uses any data of a file. The hash is computed once per process and file
version: `file_sha256` keeps a module-level memo keyed by (real path, size, mtime), so several
readers of the same shards in one process hash each shard once. The readers call it lazily, when
a shard is first opened, so a 250 GB cache costs nothing at construction and each shard is read
once more (streamed) before it is mapped.

Weight files and the other single files of a stage output (a model's `model.safetensors` and
snapshots, the reference statistics' `stats.npz`) have no manifest: the stage that wrote them
lists each with its sha256 in the folder's `provenance.json` (`outputs.files`), and
`check_recorded` checks a file against that record, through the same memo.

Opt-out: `SPECMATCH_VERIFY=0` in the environment (inherited by every stage command that
Snakemake, DVC or SLURM start), or `verify=False` passed to a reader. The provenance record of a
stage then says so (`environment.input_verification`, see `record`).

`load_npz` reads an npz file the pipeline wrote whole, so that a damaged one fails with its name
and the stage that makes it again instead of a bare `BadZipFile`.
"""

from __future__ import annotations

import json
import os
import threading
import zipfile
import zlib
from pathlib import Path
from typing import Any

from ..errors import SpecmatchError
from .hashing import sha256_file

ENV = "SPECMATCH_VERIFY"
# provenance.RECORD_NAME: that module imports this one, so the name is repeated here.
RECORD = "provenance.json"
_OFF = {"0", "false", "no", "off"}
_ON = {"", "1", "true", "yes", "on"}

_memo: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()
_checked: set[str] = set()
_unchecked: set[str] = set()


def enabled() -> bool:
    """Whether reading checks sha256s by default: `$SPECMATCH_VERIFY` unset or 1 (yes), 0 (no)."""
    value = os.environ.get(ENV)
    if value is None:
        return True
    v = value.strip().lower()
    if v in _OFF:
        return False
    if v in _ON:
        return True
    raise SpecmatchError(f"${ENV}={value!r}: expected 1 (check the sha256 of every input file read, the default) "
                         "or 0 (skip the check; the provenance records it)")


def resolve(verify: bool | None) -> bool:
    """A reader's `verify` argument: None follows `$SPECMATCH_VERIFY`, True/False force it."""
    return enabled() if verify is None else bool(verify)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, hashed (streamed) once per process for each (path, size, mtime)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    with _lock:
        digest = _memo.get(key)
    if digest is None:
        digest = sha256_file(real)
        with _lock:
            _memo[key] = digest
    return digest


def _skipped(path: str | os.PathLike) -> bool:
    with _lock:
        _unchecked.add(os.path.abspath(path))
    return False


def check_file(path: str | os.PathLike, expected: str | None, source: str | os.PathLike,
               verify: bool | None = None, remedy: str = "") -> bool:
    """Check that `path` has the sha256 `expected` that `source` (a manifest) lists for it.

    Returns True when checked, False when skipped (`verify` False, `$SPECMATCH_VERIFY=0`, or no
    sha256 listed): a skipped file is counted in `record()`. Raises SpecmatchError naming the
    file, the expected and the found hash and `source` when they differ; `remedy` replaces the
    generic advice ("restore it or run the stage that writes it again")."""
    if not resolve(verify) or not expected:
        return _skipped(path)
    found = file_sha256(path)
    if found != expected:
        raise SpecmatchError(
            f"{path}: sha256 {found} does not match sha256 {expected} listed in {source}: the file was modified "
            f"or is corrupt (a bad disk, a copy cut short) or was replaced by another file; "
            f"{remedy or 'restore it or run the stage that writes it again'} (${ENV}=0 skips this check, and "
            "the provenance of what is made then records it)")
    with _lock:
        _checked.add(os.path.abspath(path))
    return True


def recorded_sha256(folder: str | os.PathLike, rel: str, remedy: str) -> tuple[str, Path]:
    """The sha256 that the provenance record of the stage output `folder` lists for its file
    `rel` (a POSIX path relative to the folder), with the record's path. SpecmatchError naming
    the record and the key when there is no record, it is unreadable, or it does not list `rel`."""
    record_path = Path(folder) / RECORD
    skip = f"${ENV}=0 reads it unchecked, and the provenance of what is made then records it"
    if not record_path.is_file():
        raise SpecmatchError(
            f"{Path(folder) / rel}: cannot be verified: {record_path} is missing, which lists the sha256 of every "
            f"file its stage wrote (a folder copied in part, or not a finished stage output); {remedy} ({skip})")
    try:
        rec = json.loads(record_path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SpecmatchError(f"{record_path}: unreadable provenance record ({e}), so {rel} cannot be verified; "
                             f"{remedy} ({skip})") from None
    files = rec.get("outputs", {}).get("files") if isinstance(rec, dict) and isinstance(rec.get("outputs"), dict) \
        else None
    if not isinstance(files, dict):
        raise SpecmatchError(f"{record_path}: no key 'outputs.files' (the sha256 of each output file), so {rel} "
                             f"cannot be verified; {remedy} ({skip})")
    expected = files.get(rel)
    if not isinstance(expected, str):
        raise SpecmatchError(f"{record_path}: key 'outputs.files' does not list {rel!r}: the stage that wrote the "
                             f"folder did not write that file (copied in from elsewhere?); {remedy} ({skip})")
    return expected, record_path


def check_recorded(path: str | os.PathLike, folder: str | os.PathLike, verify: bool | None = None,
                   remedy: str = "") -> bool:
    """Check the file `path` of the stage output `folder` against the sha256 its provenance
    record lists for it (`recorded_sha256`), hashed once per process and file version. Returns
    False, counting the file as unchecked in `record()`, when checks are off (`verify` False or
    `$SPECMATCH_VERIFY=0`); SpecmatchError naming the file, both hashes and the record when they
    differ."""
    if not resolve(verify):
        return _skipped(path)
    rel = Path(os.path.relpath(path, folder)).as_posix()
    expected, record_path = recorded_sha256(folder, rel, remedy or "run the stage that writes it again")
    return check_file(path, expected, record_path, True, remedy)


def load_npz(path: str | os.PathLike, keys: tuple[str, ...] | None = None, remedy: str = "") -> dict[str, Any]:
    """The arrays `keys` (all when None) of an npz file, each read whole, so the zip's CRC of
    every member is checked. A missing, truncated, corrupt or incomplete file is a SpecmatchError
    naming it, the key where there is one, and `remedy` (which stage makes it again)."""
    import numpy as np

    path = Path(path)
    tail = f"; {remedy}" if remedy else ""
    if not path.is_file():
        raise SpecmatchError(f"{path}: missing{tail}")
    key = None
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            missing = [k for k in (keys or ()) if k not in names]
            if missing:
                raise SpecmatchError(f"{path}: no key {missing[0]!r} (keys: {sorted(names)}){tail}")
            out = {}
            for key in (keys or names):
                out[key] = z[key]
            return out
    except SpecmatchError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, KeyError) as e:
        # BadZipFile: a CRC mismatch or a broken directory; ValueError: not an npz (numpy then
        # tries pickle, which allow_pickle=False refuses) or a damaged .npy header.
        where = f"{path}: key {key!r}" if key else str(path)
        raise SpecmatchError(f"{where}: corrupt or truncated npz file ({type(e).__name__}: {e}){tail}") from None


def record() -> dict:
    """What provenance records about the checks in this process: `sha256` "on" when every input
    file read was checked (and the default is on), "off" otherwise, with the files counts."""
    with _lock:
        checked, unchecked = len(_checked), len(_unchecked)
    return {"sha256": "on" if enabled() and not unchecked else "off", "env": os.environ.get(ENV),
            "checked_files": checked, "unchecked_files": unchecked}
