"""A clone's own `.venv`, layered over the shared environment of its lock file.

    <shared env>/bin/python -I src/specmatch/ops/layered_env.py <shared env> .venv

The Makefile builds the locked third-party packages once per lock file, in a shared
environment (`~/.cache/specmatch/envs/py311-<lock hash>`), and never installs this package
there: were every clone to `pip install -e` itself into the shared environment, the last one
would win, and another clone's `specmatch` (its rules, its provenance commit) would run that
one's code. Each clone gets instead a small venv of its own that

- runs the shared environment's interpreter (the same base Python, so the same ABI);
- sees the shared packages through a `.pth` file (`site.addsitedir`, so their own `.pth` files
  work too), which sorts after pip's `__editable__*.pth`: the clone's `src/`, installed into
  this venv by `pip install -e .`, comes first on `sys.path`;
- carries a copy of every console script of the shared environment (snakemake, dvc, pytest,
  torchrun...) whose interpreter line names this venv's Python: a rule's `specmatch`, found on
  PATH from `.venv/bin`, and every tool that starts one, run this clone's code.

Standard library only: it runs before the package is installed. `.venv/shared-env` names the
shared environment, for the Makefile to notice when that one is gone. The Snakefile calls
`put_first_on_path`, so that a rule's `specmatch` is that of the venv Snakemake runs in.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import venv
from pathlib import Path

PTH = "specmatch-shared-env.pth"  # lowercase: sorts after pip's `__editable__.*.pth`
MARKER = "shared-env"
OWN_SCRIPTS = {"specmatch"}  # pip writes the clone's own, pointing at this venv
SHEBANG_MAX = 127  # the kernel's limit on an interpreter line (pip's own rule for its launchers)


def site_packages(env: Path) -> Path:
    return Path(sysconfig.get_path("purelib", "venv", vars={"base": str(env), "platbase": str(env)}))


def script_header(python: Path) -> bytes:
    """The interpreter line of a console script, as pip writes one: a plain `#!` line, or where
    the path is too long or holds a space, a `/bin/sh` line that re-executes the script with it."""
    p = str(python)
    if len(p) + 2 <= SHEBANG_MAX and " " not in p:
        return f"#!{p}\n".encode()
    return f"#!/bin/sh\n'''exec' \"{p}\" \"$0\" \"$@\"\n' '''\n".encode()


def script_body(text: bytes) -> bytes | None:
    """A Python console script without its interpreter lines (either form of `script_header`);
    None for a file that is not one (a shell script, a binary)."""
    lines = text.split(b"\n")
    if not lines[0].startswith(b"#!"):
        return None
    if lines[0].strip() == b"#!/bin/sh" and len(lines) > 2 and lines[1].startswith(b"'''exec'"):
        return b"\n".join(lines[3:])
    return b"\n".join(lines[1:]) if b"python" in lines[0] else None


def create(shared: Path, target: Path) -> None:
    shared, target = shared.absolute(), target.absolute()
    sp = site_packages(shared)
    if not sp.is_dir():
        raise SystemExit(f"{shared}: no {sp.relative_to(shared)} (not a complete environment)")
    # Built by the shared environment's own interpreter, whose base Python the new venv runs.
    venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(target)
    (target / MARKER).write_text(f"{shared}\n")
    gone = (f"specmatch: .venv layers over {shared}, which is gone or incomplete; "
            "run `make install` in this clone\n")
    (site_packages(target) / PTH).write_text(
        f"import os, site, sys; p = {str(sp)!r}; site.addsitedir(p) if os.path.isdir(p) "
        f"else sys.stderr.write({gone!r})\n")
    bin_dir = target / "bin"
    header = script_header(bin_dir / "python")
    for src in sorted((shared / "bin").iterdir()):
        dst = bin_dir / src.name
        if dst.exists() or src.name in OWN_SCRIPTS or src.is_symlink() or not src.is_file():
            continue  # the venv's own python and activate scripts, the clone's specmatch
        body = script_body(src.read_bytes())
        if body is None:
            shutil.copy2(src, dst)
        else:
            dst.write_bytes(header + body)
            os.chmod(dst, 0o755)


def put_first_on_path(python: str | os.PathLike = sys.executable) -> Path | None:
    """Put the folder of `python` (the running Snakemake's interpreter) first on PATH when it
    holds a `specmatch`: every rule calls `specmatch` by name, and must get this clone's, not
    whichever comes first on PATH (another clone's activated venv). Returns that folder."""
    folder = Path(python).parent
    if not (folder / "specmatch").is_file():
        return None
    os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
    return folder


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit(f"usage: {Path(__file__).name} SHARED_ENV VENV")
    create(Path(argv[0]), Path(argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
