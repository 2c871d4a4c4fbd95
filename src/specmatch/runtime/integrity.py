"""Reading is verifying: a file listed in a manifest with its sha256 is checked before use.

Every reader of manifest-listed files (dataset shards, latent and target caches) calls
`check_file` before it uses any data of a file. The hash is computed once per process and file
version: `file_sha256` keeps a module-level memo keyed by (real path, size, mtime), so several
readers of the same shards in one process hash each shard once. The readers call it lazily, when
a shard is first opened, so a 250 GB cache costs nothing at construction and each shard is read
once more (streamed) before it is mapped.

Opt-out: `SPECMATCH_VERIFY=0` in the environment (inherited by every stage command that
Snakemake, DVC or SLURM start), or `verify=False` passed to a reader. The provenance record of a
stage then says so (`environment.input_verification`, see `record`).
"""

from __future__ import annotations

import os
import threading

from ..errors import SpecmatchError
from .hashing import sha256_file

ENV = "SPECMATCH_VERIFY"
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


def check_file(path: str | os.PathLike, expected: str | None, source: str | os.PathLike,
               verify: bool | None = None) -> bool:
    """Check that `path` has the sha256 `expected` that `source` (a manifest) lists for it.

    Returns True when checked, False when skipped (`verify` False, `$SPECMATCH_VERIFY=0`, or no
    sha256 listed): a skipped file is counted in `record()`. Raises SpecmatchError naming the
    file, the expected and the found hash when they differ."""
    key = os.path.abspath(path)
    if not resolve(verify) or not expected:
        with _lock:
            _unchecked.add(key)
        return False
    found = file_sha256(path)
    if found != expected:
        raise SpecmatchError(
            f"{path}: sha256 {found} does not match sha256 {expected} listed in {source}: the file was modified "
            f"or is corrupt (a bad disk, a copy cut short); restore it or run the stage that writes it again "
            f"(${ENV}=0 skips this check)")
    with _lock:
        _checked.add(key)
    return True


def record() -> dict:
    """What provenance records about the checks in this process: `sha256` "on" when every input
    file read was checked (and the default is on), "off" otherwise, with the files counts."""
    with _lock:
        checked, unchecked = len(_checked), len(_unchecked)
    return {"sha256": "on" if enabled() and not unchecked else "off", "env": os.environ.get(ENV),
            "checked_files": checked, "unchecked_files": unchecked}
