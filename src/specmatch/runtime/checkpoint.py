"""Training checkpoints: atomic, verified, resumable.

Layout, one folder per saved step::

    <run_dir>/checkpoints/step-00001000/
        model.safetensors   weights of every module, keys prefixed by module ("ae.", "ema.", ...)
        state.pt            optimisers, schedulers, RNG states, counters (torch.save)
        meta.json           written last: schema, kind, step, fingerprint, sha256 of each file and
                            the run's settings (what it was asked to train, its length included)

The folder is assembled under a hidden temporary name beside its final name and renamed into
place (`atomic.atomic_dir`), so a kill at any moment leaves the previous checkpoints plus either
nothing or a complete new folder; hidden temporaries never count as checkpoints.

`fingerprint` is chosen by the trainer (e.g. the sha256 of the model config and objective). A
checkpoint with another kind or fingerprint is *foreign*: resuming it would silently train a
different model, so it is always an error, never skipped. `settings`, recorded beside it, let
the resume name what differs (`train_state.TrainingState.resume` compares them). A checkpoint
whose bytes do not match its meta.json is *corrupted* (a bad disk, a copy cut short):
`latest_valid` skips it with a warning and falls back to the previous one.

`state.pt` is read with `torch.load(weights_only=True)`: it may hold tensors, numbers, strings,
None, lists, tuples and dicts (what `optimizer.state_dict()` gives), and no pickled code, so loading a checkpoint cannot execute anything.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ..errors import SpecmatchError
from . import atomic
from .hashing import sha256_file
from .weights import load_safetensors, save_safetensors
from .provenance import utc_now

log = logging.getLogger(__name__)

SCHEMA = "specmatch.checkpoint/1"
CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
META = "meta.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
# atomic_dir's leftovers: ".step-00000100.<random>.tmp" (being built) and ".<random>.old".
_LEFTOVER = re.compile(r"^\.step-\d{8,}\..*\.(tmp|old)$")


class CheckpointError(SpecmatchError):
    """A checkpoint that cannot be used: missing, incomplete or corrupted."""


class ForeignCheckpointError(CheckpointError):
    """A checkpoint that is intact but belongs to another kind of model or another config: the
    folder `path` and its meta.json `meta`, when known."""

    def __init__(self, message: str, path: Path | None = None, meta: dict[str, Any] | None = None):
        super().__init__(message)
        self.path, self.meta = path, meta


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every step folder under `run_dir/checkpoints`, oldest first. Whether
    they verify is not checked; hidden temporaries are not listed."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"checkpoint tensor {name!r} is a {type(t).__name__}, not a tensor")
        c = t.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share storage (tied weights, a module saved under
        # two prefixes); a private copy of the repeats keeps the file self-contained.
        key = (c.untyped_storage().data_ptr(), c.untyped_storage().nbytes())
        if c.numel() and key in seen:
            c = c.clone()
        elif c.numel():
            seen.add(key)
        out[name] = c
    return out


# What torch.load(weights_only=True) rebuilds. Checked by exact type because e.g. numpy.float64
# subclasses float yet pickles as a numpy object, which weights_only refuses.
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.device, torch.dtype, torch.Size)
_CONTAINERS = (list, tuple, set, frozenset)


def _check_state(obj: Any, where: str) -> None:
    """Fail at save time, naming the key, on anything the weights_only loader would refuse:
    otherwise the mistake would only surface when a resume is attempted, hours later."""
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN:
        return
    if type(obj) in _CONTAINERS:
        for i, item in enumerate(obj):
            _check_state(item, f"{where}[{i}]")
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            _check_state(key, f"{where} key {key!r}")
            _check_state(value, f"{where}[{key!r}]")
        return
    raise TypeError(f"checkpoint {where} is a {type(obj).__module__}.{type(obj).__qualname__}, "
                    "which torch.load(weights_only=True) cannot read back; store tensors, "
                    "numbers, strings, None, lists, tuples and dicts only (e.g. float(x), "
                    "torch.from_numpy(a))")


def save(run_dir: str | os.PathLike, step: int, tensors: dict[str, torch.Tensor],
         state: dict[str, Any], kind: str, fingerprint: str, keep: int = 2,
         settings: dict[str, Any] | None = None) -> Path:
    """Write `run_dir/checkpoints/step-<step>/` atomically, then prune older ones to `keep`.

    Call it on the main rank only (`distributed.is_main()`); the other ranks wait at a barrier.
    Tensors are detached, copied to the CPU and made contiguous. After the new folder is in
    place, step folders beyond the newest `keep` (the new one always among them) are removed,
    and so are folders with a *larger* step than the one just written: they belong to a
    trajectory this run abandoned (it resumed from an earlier step), and leaving them would
    make the next `--resume auto` jump back onto it. Only folders whose meta.json names this
    kind and fingerprint are ever removed. A `state` holding anything that
    `torch.load(weights_only=True)` would refuse (a numpy scalar, an arbitrary object) is a
    TypeError here, before anything is written. `settings` (JSON: the run's parameters that
    shape its result) go into meta.json.
    """
    if int(step) != step or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    if not kind or not fingerprint:
        raise ValueError("a checkpoint needs a kind and a fingerprint")
    weights = _cpu_tensors(tensors)
    _check_state(state, "state")
    settings_json = json.loads(json.dumps(settings, allow_nan=False)) if settings is not None else None
    final = checkpoints_dir(run_dir) / step_dir_name(int(step))
    with atomic.atomic_dir(final) as tmp:
        save_safetensors(weights, tmp / WEIGHTS, metadata={"kind": kind, "step": str(int(step)),
                                                    "fingerprint": fingerprint})
        torch.save(state, tmp / STATE)
        meta = {
            "schema": SCHEMA,
            "kind": kind,
            "step": int(step),
            "fingerprint": fingerprint,
            "files": {name: sha256_file(tmp / name) for name in (WEIGHTS, STATE)},
            "time": utc_now(),
            **({"settings": settings_json} if settings_json is not None else {}),
        }
        # Last, so that a folder with a meta.json has every file it lists.
        atomic.write_text(tmp / META, json.dumps(meta, indent=2) + "\n")
    _prune(run_dir, int(step), keep, kind, fingerprint)
    log.info("checkpoint saved: %s", final)
    return final


def _prune(run_dir: str | os.PathLike, current: int, keep: int, kind: str,
           fingerprint: str) -> None:
    def ours(path: Path) -> bool:
        # Only this run's own checkpoints are ever deleted: a folder whose meta.json is
        # unreadable or names another kind or fingerprint is left for a human to look at.
        try:
            meta = _read_meta(path)
        except CheckpointError as e:
            log.warning("not pruning %s: %s", path, e)
            return False
        if (meta["kind"], meta["fingerprint"]) != (kind, fingerprint):
            log.warning("not pruning %s: it is a %r checkpoint with fingerprint %s, not this "
                        "run's", path, meta["kind"], meta["fingerprint"])
            return False
        return True

    found = list_checkpoints(run_dir)
    for s, p in found:
        if s > current and ours(p):
            log.warning("removing checkpoint %s: this run continued from an earlier step "
                        "(now at %d), so it belongs to an abandoned trajectory", p, current)
            shutil.rmtree(p, ignore_errors=True)
    older = [p for s, p in found if s < current]
    for p in older[: max(0, len(older) - (keep - 1))]:
        if ours(p):
            shutil.rmtree(p, ignore_errors=True)
    # Temporaries of saves that were killed before their rename: never valid, only space.
    for p in checkpoints_dir(run_dir).iterdir():
        if _LEFTOVER.match(p.name):
            log.info("removing leftover temporary %s", p)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def read_meta(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint folder's meta.json, checked for form (its files are `verify`'s)."""
    return _read_meta(Path(ckpt_dir))


def _read_meta(ckpt: Path) -> dict[str, Any]:
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {ckpt}: no such folder")
    path = ckpt / META
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt}: {META} is missing (an incomplete or "
                              "foreign folder; a checkpoint is a step-<N> folder with "
                              f"{WEIGHTS}, {STATE} and {META})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt}: {META} is unreadable ({e}); corrupted") from None
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        found = meta.get("schema") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"checkpoint {ckpt}: {META} has schema {found!r}, "
                              f"expected {SCHEMA!r}")
    for key, typ in (("kind", str), ("step", int), ("fingerprint", str), ("files", dict)):
        if not isinstance(meta.get(key), typ):
            raise CheckpointError(f"checkpoint {ckpt}: {META} lacks a valid {key!r}; corrupted")
    if not isinstance(meta.get("settings", {}), dict):  # absent in checkpoints of older versions
        raise CheckpointError(f"checkpoint {ckpt}: {META} has a 'settings' that is not a mapping; corrupted")
    return meta


def verify(ckpt_dir: str | os.PathLike, kind: str | None = None,
           fingerprint: str | None = None) -> dict[str, Any]:
    """Check one checkpoint folder and return its meta.json.

    Raises ForeignCheckpointError if `kind` or `fingerprint` (when given) differ from the
    recorded ones, and CheckpointError if meta.json is missing or invalid, a file is missing,
    or a file's sha256 differs from the recorded one (corrupted).
    """
    ckpt = Path(ckpt_dir)
    meta = _read_meta(ckpt)
    # Identity before content: a foreign checkpoint is the more useful diagnosis, and cheap.
    if kind is not None and meta["kind"] != kind:
        raise ForeignCheckpointError(f"checkpoint {ckpt} is a {meta['kind']!r} checkpoint, "
                                     f"expected {kind!r}: foreign checkpoint", ckpt, meta)
    if fingerprint is not None and meta["fingerprint"] != fingerprint:
        raise ForeignCheckpointError(
            f"checkpoint {ckpt} belongs to another configuration: fingerprint expected "
            f"{fingerprint}, found {meta['fingerprint']} (foreign checkpoint; use a fresh run "
            "folder for a new configuration)", ckpt, meta)
    m = _STEP_DIR.match(ckpt.name)
    if m and int(m.group(1)) != meta["step"]:
        raise CheckpointError(f"checkpoint {ckpt}: {META} says step {meta['step']}, the folder "
                              f"name says {int(m.group(1))}; corrupted or renamed")
    for name in (WEIGHTS, STATE):
        if name not in meta["files"]:
            raise CheckpointError(f"checkpoint {ckpt}: {META} does not list {name}; corrupted")
    for name, expected in meta["files"].items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt}: file {name} is missing")
        found = sha256_file(path)
        if found != expected:
            raise CheckpointError(f"checkpoint {ckpt}: {name} is corrupted (sha256 {found}, "
                                  f"{META} records {expected})")
    return meta


def load(ckpt_dir: str | os.PathLike, kind: str, fingerprint: str,
         map_location: str | torch.device = "cpu"
         ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Verify, then read (tensors, state, meta). Nothing is applied to any model here: the
    trainer loads everything first and only then applies it, so a failure leaves it untouched."""
    ckpt = Path(ckpt_dir)
    meta = verify(ckpt, kind=kind, fingerprint=fingerprint)
    tensors = load_safetensors(ckpt / WEIGHTS, device=str(map_location))
    try:
        state = torch.load(ckpt / STATE, map_location=map_location, weights_only=True)
    except Exception as e:  # weights_only refuses pickled code: name the file, not a traceback
        raise CheckpointError(f"checkpoint {ckpt}: {STATE} cannot be loaded with "
                              f"weights_only=True ({type(e).__name__}: {e})") from e
    return tensors, state, meta


def latest_valid(run_dir: str | os.PathLike, kind: str, fingerprint: str) -> Path | None:
    """The newest step folder that verifies, or None if there is none.

    Corrupted or incomplete folders are skipped with a warning naming them and the reason; a
    foreign one (kind or fingerprint mismatch) raises ForeignCheckpointError.
    """
    for _step, path in reversed(list_checkpoints(run_dir)):
        try:
            verify(path, kind=kind, fingerprint=fingerprint)
        except ForeignCheckpointError:
            raise
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
            continue
        return path
    return None


def resolve_resume(run_dir: str | os.PathLike, resume: str, kind: str,
                   fingerprint: str) -> Path | None:
    """Turn the `--resume` option into the checkpoint folder to start from (None: fresh start).

    - "auto": the newest valid checkpoint of this run, or None if the run has none. If step
      folders exist but none verifies, raise rather than start over on top of them.
    - "none": a fresh start; raise if the run already has checkpoints, so an existing run is
      never overwritten by accident.
    - anything else: a checkpoint folder, which must verify against `kind` and `fingerprint`.
    """
    existing = list_checkpoints(run_dir)
    if resume == "auto":
        found = latest_valid(run_dir, kind, fingerprint)
        if found is None and existing:
            raise CheckpointError(
                f"{checkpoints_dir(run_dir)} holds {len(existing)} checkpoint folder(s) but none "
                "verifies (see the warnings above); repair or remove them, or resume from an "
                "explicit checkpoint folder")
        return found
    if resume == "none":
        if existing:
            raise CheckpointError(
                f"{checkpoints_dir(run_dir)} already holds checkpoints (newest "
                f"{existing[-1][1].name}); pass --resume auto to continue that run, or use a "
                "fresh run folder")
        return None
    if not resume:
        raise CheckpointError("--resume must be 'auto', 'none' or a checkpoint folder; got ''")
    path = Path(resume)
    if (path / CHECKPOINTS).is_dir() and not (path / META).exists():
        raise CheckpointError(f"--resume {resume}: that is a run folder, not a checkpoint; pass "
                              f"one of its {CHECKPOINTS}/step-<N> folders, or --resume auto")
    verify(path, kind=kind, fingerprint=fingerprint)
    return path
