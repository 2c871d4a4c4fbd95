"""What a trainer's checkpoint holds, and how a run is saved into one and resumed from one.

A trainer's tensors travel as one flat dict keyed "<module>.<parameter>" (e.g. "net.", "ema.",
"disc.", "proj."): that is the layout of its checkpoints' model.safetensors and of its final
model file. The rest of a checkpoint (state.pt) holds each optimiser's and scheduler's state
under its name, then the run's counters ("step", and e.g. the autoencoder's per-network update
counts). Its meta.json records the run's settings: everything that shapes the result, the
length (`train.steps`) included.

Resuming is continuing the same run, so a checkpoint is resumed only under the settings it was
trained with: a fingerprint that differs is a foreign checkpoint, and the settings recorded
beside it name what differs. The length is the one setting that the fingerprint of a
constant-schedule run leaves out (`training.identity_fingerprint`): such a run's checkpoint at
step s is the same whatever length was asked, so `train.extend: true` continues it to another
length, and the result is the fresh run of that length, bit for bit. Without `train.extend`,
another length is refused. A cosine run's length is in its fingerprint (the learning rate of
every update depends on it), so another length is another run: --runs-root gives it its own
folder. A run never continues from beyond its length: that would hand out a longer run's model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from . import checkpoint, distributed
from .checkpoint import CheckpointError, ForeignCheckpointError
from .training import schedule_uses_length

log = logging.getLogger(__name__)


class RunSettingsError(CheckpointError):
    """A checkpoint of this run's identity that cannot be continued under the asked settings:
    trained for another length without `train.extend`, or already beyond the asked length."""


_ABSENT = "(absent)"


def settings_diff(recorded: Mapping[str, Any], asked: Mapping[str, Any], prefix: str = ""
                  ) -> list[tuple[str, Any, Any]]:
    """(dotted key, recorded value, asked value) of every setting that differs, sorted by key."""
    out = []
    for key in sorted(set(recorded) | set(asked)):
        a, b = recorded.get(key, _ABSENT), asked.get(key, _ABSENT)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += settings_diff(a, b, f"{prefix}{key}.")
        elif json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            out.append((f"{prefix}{key}", a, b))
    return out


def _describe(diff: list[tuple[str, Any, Any]]) -> str:
    def show(v: Any) -> str:
        text = v if v == _ABSENT else json.dumps(v, sort_keys=True)
        return text if len(text) <= 120 else text[:117] + "..."

    return "; ".join(f"{k}: checkpoint {show(a)}, asked {show(b)}" for k, a, b in diff)


def pack_state(**modules: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    """The state dicts of the given modules (None ones skipped), prefixed by their names."""
    return {f"{name}.{k}": v for name, m in modules.items() if m is not None for k, v in m.state_dict().items()}


def unpack_state(tensors: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The state dict of module `name` out of a packed dict."""
    prefix = name + "."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def final_weights(net_prefix: str, net: torch.nn.Module, ema) -> dict[str, torch.Tensor]:
    """A trained model's file content: the raw weights under `<net_prefix>.` and, when an EMA is
    kept, the averaged ones under `ema.`, detached on the CPU."""
    packed = pack_state(**{net_prefix: net, "ema": ema.module if ema is not None else None})
    return {k: v.detach().cpu().contiguous() for k, v in packed.items()}


@dataclass
class TrainingState:
    """The named modules (the EMA among them, None where a run has none), optimisers and
    schedulers of one run, and the names of its counters, tied to the run's checkpoints
    (`kind`, `fingerprint`, folder `run_dir`, the newest `keep` kept). `settings` (the trainer's
    `identity`: JSON, with a `train` section holding `steps` and `lr_decay`) go into every
    checkpoint and are compared on resume; `extend` is `train.extend` (see the module's text).

    The names are the checkpoint's keys: a module's tensors go under "<name>.", an optimiser's
    or scheduler's state under "<name>" in state.pt, so renaming one orphans every checkpoint
    written before. The counters are the trainer's: it advances them in its loop and hands their
    values to `save`; `resume` gives back those of the checkpoint it continues from."""

    kind: str
    fingerprint: str
    run_dir: Path
    info: distributed.DistInfo
    keep: int
    modules: Mapping[str, torch.nn.Module | None]
    optimizers: Mapping[str, torch.optim.Optimizer]
    schedulers: Mapping[str, torch.optim.lr_scheduler.LRScheduler]
    counters: tuple[str, ...] = ("step",)
    settings: Mapping[str, Any] | None = None
    extend: bool = False

    def __post_init__(self) -> None:
        if "step" not in self.counters:
            raise ValueError(f"TrainingState: counters {list(self.counters)} lack 'step', which names checkpoints")
        keys = [*self.optimizers, *self.schedulers, *self.counters]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(f"TrainingState: {twice} named twice; each optimiser, scheduler and counter is its "
                             "own key of state.pt")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The model.safetensors content: every module's state under its name."""
        return pack_state(**self.modules)

    def state(self, counts: Mapping[str, int]) -> dict[str, Any]:
        """The state.pt content: optimisers, schedulers, then the counters' values `counts`."""
        if set(counts) != set(self.counters):
            raise ValueError(f"TrainingState.state: counters {sorted(counts)} given, expected {list(self.counters)}")
        return {**{n: o.state_dict() for n, o in self.optimizers.items()},
                **{n: s.state_dict() for n, s in self.schedulers.items()},
                **{n: counts[n] for n in self.counters}}

    def load(self, tensors: Mapping[str, torch.Tensor], state: Mapping[str, Any], where: str) -> dict[str, int]:
        """Apply a checkpoint's (tensors, state) read from `where` to every module, optimiser and
        scheduler; its counters. A state key the run needs and the checkpoint lacks is an error
        naming it, raised before anything is applied."""
        missing = [n for n in (*self.optimizers, *self.schedulers, *self.counters) if n not in state]
        if missing:
            raise CheckpointError(f"checkpoint {where}: {checkpoint.STATE} lacks {missing} (a {self.kind} run "
                                  f"keeps {[*self.optimizers, *self.schedulers, *self.counters]})")
        for name, m in self.modules.items():
            if m is not None:
                m.load_state_dict(unpack_state(tensors, name))
        for name, o in self.optimizers.items():
            o.load_state_dict(state[name])
        for name, s in self.schedulers.items():
            s.load_state_dict(state[name])
        return {n: int(state[n]) for n in self.counters}

    def resume(self, resume: str) -> tuple[Path | None, dict[str, int]]:
        """Continue the run as `--resume` says (`checkpoint.resolve_resume`; the main rank chooses,
        every rank loads the same checkpoint onto its device): (the checkpoint folder, its
        counters), or (None, every counter 0) for a fresh start. A checkpoint trained under other
        settings is refused (`check_settings`), on every rank."""
        chosen, error = None, None
        if self.info.is_main:
            try:
                found = checkpoint.resolve_resume(self.run_dir, resume, self.kind, self.fingerprint)
                if found is not None:
                    self.check_settings(found, checkpoint.read_meta(found))
                chosen = str(found or "")
            except ForeignCheckpointError as e:
                error = self._named(e)
            except CheckpointError as e:
                error = e
        start, problem = distributed.broadcast_object((chosen, str(error) if error else None))
        if error is not None:
            raise error
        if problem is not None:
            raise CheckpointError(problem)
        if not start:
            return None, dict.fromkeys(self.counters, 0)
        tensors, state, _ = checkpoint.load(start, self.kind, self.fingerprint, map_location=self.info.device)
        return Path(start), self.load(tensors, state, start)

    def check_settings(self, path: Path, meta: Mapping[str, Any]) -> None:
        """Refuse to continue checkpoint `path` (its meta.json `meta`, of this run's fingerprint)
        beyond the asked `train.steps`, or under settings other than those it records, unless
        only the length differs and `extend` may continue it (constant schedule)."""
        if self.settings is None:
            return
        steps = int(self.settings["train"]["steps"])
        if meta["step"] > steps:
            raise RunSettingsError(
                f"checkpoint {path} is at step {meta['step']}, beyond the asked train.steps {steps} (it was trained "
                f"with train.steps {meta.get('settings', {}).get('train', {}).get('steps', 'unrecorded')}): a run "
                f"is never shortened, resuming it would hand out a {meta['step']}-step model. Train {steps} steps "
                f"in a fresh run folder (another --run-dir, or remove {self.run_dir})")
        recorded = meta.get("settings")
        if recorded is None:
            log.warning("checkpoint %s records no settings (an earlier version wrote it): only its step was "
                        "checked against train.steps", path)
            return
        diff = settings_diff(recorded, self.settings)
        if not diff:
            return
        length_only = [k for k, _, _ in diff] == ["train.steps"]
        if length_only and self.extend and not schedule_uses_length(self.settings["train"]):
            log.info("train.extend: checkpoint %s of a %s-step run continues to train.steps %d (constant "
                     "schedule: the result is a fresh %d-step run's)", path, diff[0][1], steps, steps)
            return
        if length_only:
            hint = (f"the schedule is constant (train.lr_decay none), so continuing it to {steps} steps gives "
                    f"exactly a fresh {steps}-step run: set train.extend: true to extend it on purpose, or train "
                    f"afresh in another run folder (another --run-dir, or remove {self.run_dir})")
        else:
            hint = (f"resume it with the settings it records, or train afresh in another run folder (another "
                    f"--run-dir, or remove {self.run_dir})")
        raise RunSettingsError(f"checkpoint {path} was trained with other settings than asked: {_describe(diff)}. "
                               f"{hint[0].upper()}{hint[1:]}")

    def _named(self, e: ForeignCheckpointError) -> ForeignCheckpointError:
        """`e` with the settings that differ named, where the checkpoint records its own."""
        recorded = (e.meta or {}).get("settings")
        if self.settings is None or not isinstance(recorded, dict) or e.meta.get("kind") != self.kind:
            return e
        diff = settings_diff(recorded, self.settings)
        if not diff:
            return e
        note = ""
        if "train.steps" in [k for k, _, _ in diff] and schedule_uses_length(self.settings["train"]):
            note = (" (with train.lr_decay cosine the learning rate of every update depends on train.steps, so "
                    "another length is another run, which --runs-root trains in its own folder; train.extend "
                    "applies to constant schedules only)")
        return ForeignCheckpointError(f"{e}. Settings that differ: {_describe(diff)}{note}", e.path, e.meta)

    def save(self, **counts: int) -> Path | None:
        """Write a checkpoint of the counters' values `counts` from the main rank (the others
        only wait for it), keeping the newest `keep`; its folder on the main rank, None elsewhere."""
        path = None
        if self.info.is_main:
            state = self.state(counts)
            path = checkpoint.save(self.run_dir, counts["step"], self.tensors(), state, self.kind, self.fingerprint,
                                   keep=self.keep, settings=dict(self.settings) if self.settings is not None else None)
        distributed.barrier()
        return path
