"""Provenance records: one `provenance.json` in every stage output folder (README, "Auditing a result").

A record names the stage and run, the resolved parameters and their hash, every input (with
its content hash and, for outputs of earlier stages, the hash of their own record, which is
what lets `specmatch audit` walk the lineage), every output file with its sha256, the code
version, the environment, the scheduler job, the seeds and the wall time. It is written last,
into the stage's temporary output folder, so a folder with a record is a finished folder.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .. import __version__
from . import atomic, integrity
from .hashing import hash_tree, sha256_file, sha256_json, tree_digest

RECORD_NAME = "provenance.json"
SCHEMA = "specmatch.provenance/1"

_SLURM_VARS = (
    "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NAME",
    "SLURM_JOB_PARTITION", "SLURM_JOB_ACCOUNT", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES",
    "SLURM_NTASKS", "SLURM_CPUS_PER_TASK", "SLURM_GPUS_ON_NODE", "SLURM_RESTART_COUNT",
)


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# When the running stage command began (monotonic clock, wall-clock string): a record's time
# then covers the whole stage (reading inputs, training, writing), not only the moment the
# record object was made, which for the trainers is at their final write.
_stage_start: tuple[float, str] | None = None


def mark_stage_start() -> None:
    """Called by the CLI as a stage command begins; records made in this process from then on
    date their start from it."""
    global _stage_start
    _stage_start = (time.monotonic(), utc_now())


def display_path(path: str | os.PathLike) -> str:
    """Paths are recorded relative to the working directory (the repository root when run by
    Snakemake or DVC) so that records stay valid when the repository moves."""
    p = Path(path).absolute()
    try:
        return p.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return p.as_posix()


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    info: dict[str, Any] = {"package": "specmatch", "version": __version__,
                            "git_commit": None, "git_dirty": None}
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(src), "status", "--porcelain",
                                 "--untracked-files=no"], capture_output=True, text=True,
                                timeout=10, check=True).stdout
        info["git_commit"], info["git_dirty"] = commit, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        # Installed copy without a work tree (a container): the build bakes the commit in.
        info["git_commit"] = os.environ.get("SPECMATCH_GIT_COMMIT")
        if os.environ.get("SPECMATCH_GIT_DIRTY") is not None:
            info["git_dirty"] = os.environ["SPECMATCH_GIT_DIRTY"] == "1"
    return info


def _container() -> dict[str, Any] | None:
    image = os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER")
    if not image:
        return None
    out: dict[str, Any] = {"image": image, "sha256": os.environ.get("SPECMATCH_CONTAINER_SHA256")}
    sidecar = Path(image + ".sha256")
    if out["sha256"] is None and sidecar.is_file():
        out["sha256"] = sidecar.read_text().split()[0]
    return out


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "container": _container(),
        # Whether the sha256 of every manifest-listed input file read was checked
        # ($SPECMATCH_VERIFY=0 or a reader's verify=False skip it): runtime.integrity.
        "input_verification": integrity.record(),
    }
    try:
        import numpy
        import torch

        env["numpy"] = numpy.__version__
        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(n)]
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return env


def scheduler() -> dict[str, Any]:
    rec = {k.lower(): os.environ[k] for k in _SLURM_VARS if k in os.environ}
    for k in ("WORLD_SIZE", "CUDA_VISIBLE_DEVICES"):
        if k in os.environ:
            rec[k.lower()] = os.environ[k]
    return rec


def describe_input(path: str | os.PathLike, role: str) -> dict[str, Any]:
    """Hash one input. An input folder written by a stage is identified by its provenance
    record; any other folder by the digest of its files."""
    p = Path(path)
    entry: dict[str, Any] = {"role": role, "path": display_path(p)}
    if p.is_dir():
        record = p / RECORD_NAME
        if record.is_file():
            entry["kind"] = "stage-output"
            entry["provenance_sha256"] = sha256_file(record)
        else:
            entry["kind"] = "folder"
            entry["sha256"] = tree_digest(hash_tree(p))
    elif p.is_file():
        entry["kind"] = "file"
        entry["sha256"] = sha256_file(p)
    else:
        raise FileNotFoundError(p)
    return entry


class Provenance:
    """Collects a stage's record while it runs; `write` seals it into the output folder."""

    def __init__(self, stage: str, run: str, params: dict[str, Any], seeds: dict[str, int] | None = None):
        self.stage, self.run, self.params = stage, run, params
        self.seeds = dict(seeds or {})
        self.inputs: list[dict[str, Any]] = []
        self.protocol: dict[str, Any] | None = None
        self.extra: dict[str, Any] = {}
        self._t0, self._start = _stage_start or (time.monotonic(), utc_now())

    def add_input(self, path: str | os.PathLike, role: str, sha256: str | None = None) -> None:
        """Record an input; pass `sha256` when the stage already hashed the bytes it read."""
        if sha256 is None:
            self.inputs.append(describe_input(path, role))
        else:
            kind = "folder" if Path(path).is_dir() else "file"
            self.inputs.append({"role": role, "path": display_path(path), "kind": kind, "sha256": sha256})

    def record(self, out_dir: Path, tmp_dir: Path) -> dict[str, Any]:
        files = hash_tree(tmp_dir, exclude=(RECORD_NAME,))
        return {
            "schema": SCHEMA,
            "stage": self.stage,
            "run": self.run,
            "params": self.params,
            "params_sha256": sha256_json(self.params),
            "inputs": self.inputs,
            "outputs": {"path": display_path(out_dir), "files": files, "sha256": tree_digest(files)},
            "code": code_version(),
            "environment": environment(),
            "scheduler": scheduler(),
            "seeds": self.seeds,
            "protocol": self.protocol,
            **self.extra,
            "time": {"start": self._start, "end": utc_now(), "wall_s": round(time.monotonic() - self._t0, 3)},
        }

    def write(self, out_dir: str | os.PathLike, tmp_dir: str | os.PathLike) -> dict[str, Any]:
        """Hash every file already in `tmp_dir` (the atomic folder that becomes `out_dir`) and
        write the record beside them."""
        rec = self.record(Path(out_dir), Path(tmp_dir))
        atomic.write_text(Path(tmp_dir) / RECORD_NAME, json.dumps(rec, indent=2, sort_keys=False) + "\n")
        return rec
