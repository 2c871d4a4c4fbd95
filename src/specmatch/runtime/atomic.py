"""Atomic outputs: write under a temporary name in the same folder, then rename.

A stage that fails (or is killed) leaves at most a hidden temporary behind, never a
half-written file or folder under the real name, so Snakemake, DVC and `specmatch audit`
only ever see complete outputs.

A temporary's name carries its owner, `.NAME.<host>@<pid>@<random>.tmp`: a stage killed hard
(SIGKILL, a node lost) leaves its temporary behind, and the next `atomic_dir` / `atomic_file`
of the same output removes the temporaries of processes that are gone (same host, pid no longer
running). Those of live processes and of other hosts are kept, unless older than
`STALE_AFTER_S` (a week), as are unowned ones (the earlier naming, `.NAME.<random>.tmp`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

# Temporaries older than this are removed whoever owns them (a live pid may be a reused one).
STALE_AFTER_S = 7 * 24 * 3600
_OWNED = re.compile(r"(?P<host>[A-Za-z0-9-]+)@(?P<pid>\d+)@[A-Za-z0-9_]+\.(?:tmp|old)")
_UNOWNED = re.compile(r"[A-Za-z0-9_]+\.(?:tmp|old)")


def _host() -> str:
    """This host's name as temporaries carry it (no dots or '@', so names parse unambiguously)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


def _prefix(path: Path) -> str:
    """mkstemp/mkdtemp prefix of `path`'s temporaries: `.NAME.<host>@<pid>@`."""
    return f".{path.name}.{_host()}@{os.getpid()}@"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def _stale(entry: os.DirEntry, rest: str, now: float) -> bool:
    m = _OWNED.fullmatch(rest)
    if m:
        if m["host"] == _host() and not _pid_alive(int(m["pid"])):
            return True
    elif not _UNOWNED.fullmatch(rest):
        return False  # not a temporary of this output (e.g. one of an output "NAME.x")
    try:
        return now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return False


def remove_stale_temporaries(path: str | os.PathLike, folders: bool = True) -> list[Path]:
    """Remove the temporaries of `path` (folders of `atomic_dir`, or files of `atomic_file` with
    `folders=False`) left by processes that are gone; return what was removed."""
    path = Path(path)
    prefix, now, removed = f".{path.name}.", time.time(), []
    try:
        entries = list(os.scandir(path.parent))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for e in entries:
        if not e.name.startswith(prefix):
            continue
        try:
            if e.is_dir(follow_symlinks=False) != folders or not _stale(e, e.name[len(prefix):], now):
                continue
        except OSError:
            continue
        p = Path(e.path)
        if folders:
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        if not p.exists():
            log.info("removed %s, a temporary left by a process that is gone", p)
            removed.append(p)
    return removed


def _umask() -> int:
    """The process umask. Linux reports it in /proc/self/status; setting it to read it back (the
    portable way) opens a window in which files that another thread creates get mode 0666."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a normally created file gets here (0666 less the umask): every output file's.
    Temporaries from mkstemp start at 0600, and a library may create its files that way too;
    outputs are shared artefacts (a group on a cluster reads the models), so they get this."""
    return 0o666 & ~_umask()


def _shareable(folder: Path) -> None:
    """Give every file under `folder` the normal mode (`file_mode`; the umask's, plus x where a
    file had it), so no writer's private mode reaches an output."""
    mask = _umask()
    for root, _dirs, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                continue
            want = (0o777 if st.st_mode & 0o111 else 0o666) & ~mask
            if stat.S_IMODE(st.st_mode) != want:
                try:
                    os.chmod(p, want)
                except PermissionError:  # a file linked in from someone else's folder: theirs to set
                    log.warning("%s keeps mode %o (not %o): this user does not own it", p,
                                stat.S_IMODE(st.st_mode), want)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary sibling of `path` for writing; on success fsync and rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path, folders=False)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)
    os.chmod(tmp, file_mode())  # mkstemp creates 0600
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path` whole.

    On any exception (including KeyboardInterrupt) the temporary folder is removed and an
    existing `path` is left untouched. Its files get the normal mode (`file_mode`) whatever
    created them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path, folders=True)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        _shareable(tmp)
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        if path.exists():
            # Move the old output aside first so that the swap itself is a single rename.
            old = Path(tempfile.mkdtemp(prefix=_prefix(path), suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
