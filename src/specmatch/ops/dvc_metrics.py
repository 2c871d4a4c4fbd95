"""`specmatch dvc metrics`: a stage's metrics files reduced to their numbers, for DVC.

The stage outputs' metrics files (`eval-ae`, `fid calc`, `data-spectra`) are nested JSON with
protocols, lists and hashes, one per run in run-named folders. Each DVC stage ends by collecting
them into one JSON file per stage, `<results>/<preset>/metrics/<stage>.json` (its `metrics:`
output in dvc.yaml, outside every `outs` folder), keyed by the run's folder; `dvc metrics show`,
`dvc metrics diff` and `dvc exp show` read those.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import SpecmatchError

# Sections of a metrics file that describe how it was measured, not what: left out.
SKIP_KEYS = {"protocol", "reference", "samples", "sampling", "config", "warnings"}


def numbers(obj: Any) -> Any:
    """The numeric leaves of a JSON object (nested dicts kept; lists, strings and booleans
    dropped, and the sections of SKIP_KEYS), or None when there are none."""
    if isinstance(obj, bool):
        return None
    if isinstance(obj, (int, float)):
        return obj
    if isinstance(obj, dict):
        out = {k: numbers(v) for k, v in obj.items() if k not in SKIP_KEYS}
        out = {k: v for k, v in out.items() if v is not None}
        return out or None
    return None


def collect(folders: list[str | Path], filename: str) -> dict[str, Any]:
    """{<folder>/<relative dir>: numbers of <that dir>/<filename>} for every such file below
    each folder (a missing folder contributes nothing: an empty grid)."""
    out: dict[str, Any] = {}
    for folder in map(Path, folders):
        for f in sorted(folder.rglob(filename)) if folder.is_dir() else []:
            try:
                data = json.loads(f.read_text("utf-8"))
            except json.JSONDecodeError as e:
                raise SpecmatchError(f"{f}: not JSON ({e})") from None
            rel = f.parent.relative_to(folder).as_posix()
            key = folder.name if rel == "." else f"{folder.name}/{rel}"
            out[key] = numbers(data) or {}
    return out


def write_metrics(folders: list[str | Path], filename: str, out: str | Path) -> dict[str, Any]:
    from ..runtime import atomic

    result = collect(folders, filename)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out, json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result


def write_curves(folders: list[str | Path], out: str | Path) -> dict[str, Any]:
    """`specmatch dvc curves`: every run's training curves below `folders` (the trainers' and
    `fid-progress`'s `<run>/curves/plots/<name>.tsv`, runtime/curves.py) copied into one folder,
    `<out>/<run dir>/<name>.tsv`, atomically (a run dir found in two folders is an error): the stage's curves output, which
    dvc.yaml's top-level `plots:` names once (`x: step`), so `dvc plots show` renders every run's
    curves and `dvc plots diff` overlays two revisions' without listing runs. A stage folder holds
    weights and JSON besides, and DVC plots take no globs, hence the copy. Returns {run: [curve
    names]}."""
    from ..runtime import atomic
    from ..runtime.curves import CURVES_DIR, PLOTS_DIR

    found: dict[str, list[str]] = {}
    with atomic.atomic_dir(out) as tmp:
        for folder in map(Path, folders):
            for plots in sorted(folder.rglob(f"{CURVES_DIR}/{PLOTS_DIR}")) if folder.is_dir() else []:
                run = plots.parent.parent.relative_to(folder).as_posix()
                if run in found:
                    raise SpecmatchError(f"{plots}: a run {run!r} of another folder given has curves too; "
                                         "collect each stage's folder into a folder of its own")
                dest = tmp / run
                dest.mkdir(parents=True, exist_ok=True)
                names = []
                for tsv in sorted(plots.glob("*.tsv")):
                    shutil.copyfile(tsv, dest / tsv.name)
                    names.append(tsv.stem)
                found[run] = names
    return found
