"""`specmatch data add`: put a user's dataset folder (or a pretrained file) under DVC.

Raw data never goes into git: `dvc add` hashes the folder into DVC's cache and writes a small
`<folder>.dvc` pointer that git tracks; `dvc push` then copies the content to the configured
remote, and `dvc pull` restores it byte for byte on another machine (README: "Versioning").
This wraps `dvc add` with what the pipeline needs to be true first: the path is inside the
repository, holds images (or is a single file, e.g. weights), and the repository is a DVC
repository; it reports the pointer file and the next commands.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ..errors import SpecmatchError
from ..data.images import is_image_file


def _dvc() -> str:
    # The dvc of this environment (next to the running interpreter), else the one on PATH.
    import sys

    local = Path(sys.executable).parent / "dvc"
    return str(local) if local.is_file() else "dvc"


def add(path: str | os.PathLike, root: str | os.PathLike = ".") -> Path:
    """`dvc add` `path` in the DVC repository at `root`; returns the `.dvc` pointer file."""
    root, p = Path(root).resolve(), Path(path)
    target = (p if p.is_absolute() else Path.cwd() / p).resolve()
    if not target.exists():
        raise SpecmatchError(f"{path}: no such file or folder")
    if not (root / ".dvc").is_dir():
        raise SpecmatchError(f"{root}: not a DVC repository (no .dvc/); run `dvc init` there first")
    try:
        rel = target.relative_to(root)
    except ValueError:
        raise SpecmatchError(f"{path}: outside the repository {root}; DVC tracks paths inside it "
                             "(move or link the data under data/raw/)") from None
    if target.is_dir():
        n = sum(1 for f in target.rglob("*") if is_image_file(f))
        if n == 0:
            raise SpecmatchError(f"{path}: no image files in the folder ({', '.join(('.jpg', '.png', '...'))}); "
                                 "is it the dataset folder?")
    proc = subprocess.run([_dvc(), "add", rel.as_posix()], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SpecmatchError(f"dvc add {rel} failed: {(proc.stderr or proc.stdout).strip()[-1500:]}")
    pointer = root / (rel.as_posix() + ".dvc")
    if not pointer.is_file():
        raise SpecmatchError(f"dvc add {rel} wrote no {pointer.name}")
    return pointer
