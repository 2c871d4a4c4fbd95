"""What a trainer's checkpoint holds, and how a run is saved into one and resumed from one.

A trainer's tensors travel as one flat dict keyed "<module>.<parameter>" (e.g. "net.", "ema.",
"disc.", "proj."): that is the layout of its checkpoints' model.safetensors and of its final
model file. The rest of a checkpoint (state.pt) holds each optimiser's and scheduler's state
under its name, then the run's counters ("step", and e.g. the autoencoder's per-network update
counts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from . import checkpoint, distributed
from .checkpoint import CheckpointError


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
    (`kind`, `fingerprint`, folder `run_dir`, the newest `keep` kept).

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
        counters), or (None, every counter 0) for a fresh start."""
        chosen = None
        if self.info.is_main:
            chosen = str(checkpoint.resolve_resume(self.run_dir, resume, self.kind, self.fingerprint) or "")
        start = distributed.broadcast_object(chosen)
        if not start:
            return None, dict.fromkeys(self.counters, 0)
        tensors, state, _ = checkpoint.load(start, self.kind, self.fingerprint, map_location=self.info.device)
        return Path(start), self.load(tensors, state, start)

    def save(self, **counts: int) -> Path | None:
        """Write a checkpoint of the counters' values `counts` from the main rank (the others
        only wait for it), keeping the newest `keep`; its folder on the main rank, None elsewhere."""
        path = None
        if self.info.is_main:
            state = self.state(counts)
            path = checkpoint.save(self.run_dir, counts["step"], self.tensors(), state, self.kind, self.fingerprint,
                                   keep=self.keep)
        distributed.barrier()
        return path
