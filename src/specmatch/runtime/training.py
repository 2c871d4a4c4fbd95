"""Pieces every trainer shares (autoencoders, diffusion): the seeded data order, warm-up, the
non-finite-loss stop, the signal-triggered interruption, the weight average and the output
folder. What a checkpoint holds, and resuming from one, is `train_state`'s.

Data order: the global batch of step s is a slice of a seeded permutation of the epoch that
step falls in, a function of (seed, s) only, so a resumed run and a run on any number of
processes see the same examples at the same step.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from ..errors import SpecmatchError
from . import atomic, checkpoint, curves, seeding
from .hashing import sha256_json
from .provenance import Provenance, utc_now
from .signals import EXIT_INTERRUPTED

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Raised after a signal-triggered checkpoint; the CLI exits with EXIT_INTERRUPTED."""

    exit_code = EXIT_INTERRUPTED


class NonFiniteLoss(SpecmatchError):
    pass


@functools.lru_cache(maxsize=2)
def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return seeding.step_rng(seed, epoch, "epoch-order").permutation(n)


def batch_indices(n: int, global_batch: int, seed: int, step: int) -> np.ndarray:
    """Global batch of step `step`: consecutive slices of a seeded permutation per epoch."""
    start = step * global_batch
    out: list[int] = []
    while len(out) < global_batch:
        epoch, pos = divmod(start + len(out), n)
        perm = _epoch_permutation(n, seed, epoch)
        out.extend(perm[pos:pos + global_batch - len(out)].tolist())
    return np.asarray(out, dtype=np.int64)


def lr_factor(t: TrainSettings):
    """LambdaLR factor of a run's `train` settings: linear warm-up over `warmup_steps` updates,
    then constant (`lr_decay: none`, the schedule of every reference recipe) or a half cosine
    from 1 down to 0 at update `steps` (`lr_decay: cosine`). Annealing is what lets a run of a
    few hundred updates at a high learning rate settle instead of stopping mid-oscillation.
    One LambdaLR rather than torch's SequentialLR of LinearLR and CosineAnnealingLR (the test's
    reference): the scheduler state in checkpoints keeps its format whatever the schedule."""
    warm, total, decay = max(1, t.warmup_steps), t.steps, t.lr_decay

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if decay == "none":
            return 1.0
        done = min(1.0, (step + 1 - warm) / max(1, total - warm))
        return 0.5 * (1.0 + math.cos(math.pi * done))

    return factor


def schedule_uses_length(train: Mapping[str, Any]) -> bool:
    """Whether the learning rate of an update depends on `train.steps` (`lr_decay: cosine`): then
    runs of two lengths differ from the warm-up on. With a constant schedule a run of N steps is
    the first N steps of any longer one."""
    return train["lr_decay"] != "none"


def identity_fingerprint(identity: Mapping[str, Any]) -> str:
    """The fingerprint of a run whose settings are `identity` (a trainer's `identity`: whatever
    shapes its result, `train.steps` included): their sha256, less `train.steps` where the
    schedule does not depend on it. So another length of a cosine run is another run (its own
    run folder under --runs-root), while a constant-schedule run keeps one folder whatever its
    length, which `train.extend` may continue (`train_state.TrainingState.resume`)."""
    train = identity["train"]
    if not schedule_uses_length(train):
        identity = {**identity, "train": {k: v for k, v in train.items() if k != "steps"}}
    return sha256_json(identity)


METRICS_FILE = "metrics.jsonl"


def trim_metrics(run_dir: Path, step: int) -> None:
    """Make a run folder's metrics log end at `step`, the step this attempt starts from (0: a
    fresh run, no log): an interrupted attempt logged steps after its last checkpoint, which the
    resumed one logs again, and the log must hold each step once. Rewritten atomically, so a kill
    leaves the old log or the trimmed one; a line cut short by a kill goes too."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            ok = line.endswith("\n") and int(json.loads(line)["step"]) <= step
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            ok = False
        if ok:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        atomic.write_text(path, "".join(keep))
        log.info("%s: dropped %d line(s) after step %d, where this attempt resumes", path, dropped, step)


class FiniteGuard:
    """Watches the loss terms for non-finite values without waiting for the GPU.

    `update(terms, step)` runs on the device only (no host synchronisation): it remembers the
    first step at which a term was not finite and the terms' values there. `check()` reads
    that back (one synchronisation, an all-reduce over ranks) and stops every rank with an
    error naming the first bad step, its terms and the newest checkpoint. Trainers call
    `check()` before anything is saved (checkpoints, snapshots, the final output) and where
    they read the loss anyway (log steps), so nothing computed after a non-finite loss is ever
    written and the newest checkpoint stays the last good one; the steps in between are wasted
    work, not corrupted output."""

    def __init__(self, info, run_dir: Path, what: str = "step"):
        self.info, self.run_dir, self.what = info, Path(run_dir), what
        self._first = torch.full((), -1, dtype=torch.long, device=info.device)
        self._values: dict[str, torch.Tensor] = {}
        self._pending = False

    def update(self, terms: dict[str, torch.Tensor], step: int) -> None:
        bad = torch.stack([~torch.isfinite(v.detach()).all() for v in terms.values()]).any()
        new = bad & (self._first < 0)
        self._first = torch.where(new, torch.full_like(self._first, step), self._first)
        for k, v in terms.items():
            v = v.detach().float().sum()  # terms are scalars; a vector is reported by its sum
            self._values[k] = torch.where(new, v, self._values.get(k, torch.zeros_like(v)))
        self._pending = True

    def check(self) -> None:
        if not self._pending and self.info.world_size <= 1:
            return
        self._pending = False
        first = self._first.clone()
        bad = (first >= 0).to(torch.int32)
        if self.info.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if int(bad.item()) == 0:
            return
        step = int(first.item())
        if step < 0:
            raise NonFiniteLoss(f"non-finite loss on another rank (this is rank {self.info.rank}); stopped "
                                f"without saving: the last good checkpoint is {self._last()}")
        values = ", ".join(f"{k}={float(v):.4g}" for k, v in self._values.items())
        raise NonFiniteLoss(f"non-finite loss at {self.what} {step} ({values} on rank {self.info.rank}); "
                            f"stopped without saving: the last good checkpoint is {self._last()}")

    def _last(self) -> str:
        last = checkpoint.list_checkpoints(self.run_dir)
        return str(last[-1][1]) if last else "none (no checkpoint yet)"


def check_finite(terms: dict[str, torch.Tensor], step: int, info, run_dir: Path, what: str = "step") -> None:
    """Stop every rank with an error naming the step and the terms when any rank's loss is not
    finite, at once (one synchronisation per call: `FiniteGuard` defers it). Called before the
    update, so nothing is saved after it and the newest checkpoint stays the last good one."""
    guard = FiniteGuard(info, run_dir, what)
    guard.update(terms, step)
    guard.check()


def run_folder(run_dir: str | Path | None, runs_root: str | Path | None, fingerprint: str) -> Path:
    """The trainer's working folder: `run_dir` as given, or `runs_root/<fingerprint[:12]>`. The
    DAG passes a root: the fingerprint covers the parameters and the identity of the inputs, so
    changed upstream data start a fresh run instead of resuming one trained on other data."""
    if (run_dir is None) == (runs_root is None):
        raise SpecmatchError("give exactly one of --run-dir and --runs-root")
    return Path(run_dir) if run_dir is not None else Path(runs_root) / fingerprint[:12]


def end_of_step(step: int, steps: int, every: int, stop, info, save, bar) -> None:
    """The trainers' bookkeeping after update `step`: a checkpoint every `every` steps (the final
    one is written by the caller) and, once a stop signal (`signals.STOP_SIGNALS`: SIGTERM,
    SIGUSR1, SIGINT, SIGHUP) arrived on any rank, a checkpoint and `Interrupted`, so the job exits
    cleanly with its work saved."""
    if step % every == 0 and step < steps:
        save()
    if stop.should_stop(info):
        path = save()
        bar.close()
        log.warning("%s received: checkpoint %s written at step %d; resume with --resume auto",
                    stop.signal_name, path, step)
        raise Interrupted(f"interrupted by {stop.signal_name} at step {step}; checkpoint saved")


@dataclass(frozen=True)
class TrainSettings:
    """The `train` parameters every trainer has, typed (schema `$defs/ae_train`, `$defs/diff_train`;
    a trainer's own keys live in a subclass). Built once from the validated section, by
    `from_params`; the loops read fields, never keys."""

    steps: int
    batch_size: int  # global: split over the processes
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    warmup_steps: int
    lr_decay: str  # none | cosine (after the warm-up, to 0 at `steps`)
    grad_clip: float | None
    ema_decay: float  # 0 = no EMA
    seed: int
    device: str
    precision: str  # auto | bf16 | fp32
    deterministic: bool
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int
    extend: bool  # continue a checkpoint of another `steps` (constant schedules; `train_state`)
    compile: bool  # torch.compile the networks' forwards (`compile_forward`)

    @classmethod
    def from_params(cls, t: Mapping[str, Any], where: str = "train"):
        """The settings of a validated `train` section (lists become tuples). A key the class does
        not know, or one it needs and the section lacks, is an error naming it."""
        names = [f.name for f in fields(cls)]
        unknown, missing = sorted(set(t) - set(names)), [n for n in names if n not in t]
        if unknown or missing:
            raise SpecmatchError(f"{where}: unknown keys {unknown}, missing keys {missing} (expected the validated "
                                 f"section of {cls.__name__})")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in t.items()})


def compile_forward(module: torch.nn.Module, enabled: bool, fullgraph: bool = True) -> torch.nn.Module:
    """Compile `module`'s forward in place (`nn.Module.compile`, inductor) when `enabled`. In place
    rather than `torch.compile(module)`: the wrapper that returns would prefix every state-dict
    key with `_orig_mod.`, and checkpoints of a compiled run must load into an eager one.
    `fullgraph` where the forward is one graph (the diffusion networks, the discriminator), so a
    change that breaks it fails loudly instead of silently running in pieces; the autoencoder's
    generator passes its posterior object between encoder and decoder, a graph break by design.
    Shapes are static: a run's batch is fixed (a sampler's last, smaller batch compiles once more)."""
    if enabled:
        module.compile(fullgraph=fullgraph, dynamic=False)
    return module


class RankSetup(NamedTuple):
    seed: int
    global_batch: int
    rows: slice  # this rank's rows of the global batch
    bf16: bool  # autocast to bf16: `bf16` on any device, `auto` on CUDA only


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether a run autocasts to bf16: `bf16` asks for it on any device (PyTorch's CPU autocast
    supports bfloat16, so a CPU run can rehearse a GPU run's numerics); `auto` means bf16 on CUDA
    and fp32 elsewhere, where bf16 matmuls are emulated and slower than fp32 ones."""
    if precision not in ("auto", "bf16", "fp32"):
        raise SpecmatchError(f"train.precision: expected auto, bf16 or fp32, got {precision!r}")
    return precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda")


def prepare_rank(t: TrainSettings, info) -> RankSetup:
    """Seed this process, set determinism and split the global batch."""
    seeding.seed_everything(t.seed, info.rank)
    seeding.deterministic(t.deterministic)
    if t.batch_size % info.world_size:
        raise SpecmatchError(f"train.batch_size {t.batch_size} is not divisible by the {info.world_size} processes")
    local = t.batch_size // info.world_size
    bf16 = use_bf16(t.precision, info.device)
    return RankSetup(t.seed, t.batch_size, slice(info.rank * local, (info.rank + 1) * local), bf16)


ATTEMPTS_FILE = "attempts.jsonl"


class AttemptLog:
    """Each process that trains on a run folder (the first one and every resumption after a
    signal, a failure or a kill) appends a line when it starts and one when it stops, so the
    final provenance can say how the run was really made: on which hosts and jobs, from which
    step to which, how long each attempt took and how it ended. A process killed outright
    (SIGKILL, a node failure) leaves a start line without an end.

    A run that starts from step 0 is a new run: the lines of earlier attempts that left no
    checkpoint behind are dropped. Only the main rank writes.

    The trainer keeps the attempt open until its output is written, so a failure of the final
    checkpoint or output ends it as "failed"; the output's provenance, written before the end
    line, takes the attempts from `as_finished`."""

    def __init__(self, run_dir: Path, info, start_step: int, current_step: Callable[[], int]):
        self.path, self.main, self.current_step = Path(run_dir) / ATTEMPTS_FILE, info.is_main, current_step
        self.start_step, self.world_size, self._t0 = int(start_step), info.world_size, time.monotonic()
        self.number = 0

    def __enter__(self) -> "AttemptLog":
        if self.main:
            if self.start_step == 0 and self.path.exists():
                self.path.unlink()
            self.number = len(read_attempts(self.path.parent)) + 1
            self._append({"event": "start", "attempt": self.number, "time": utc_now(), "step": self.start_step,
                          "host": socket.gethostname(), "pid": os.getpid(), "world_size": self.world_size,
                          "slurm_job_id": os.environ.get("SLURM_JOB_ID")})
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.main:
            self._append(self._end(exc_type, exc))

    def _end(self, exc_type=None, exc=None) -> dict:
        status = ("finished" if exc_type is None else "interrupted" if issubclass(exc_type, Interrupted)
                  else "failed")
        entry = {"event": "end", "attempt": self.number, "time": utc_now(), "step": int(self.current_step()),
                 "status": status, "wall_s": round(time.monotonic() - self._t0, 3)}
        if exc is not None and status == "failed":
            entry["error"] = f"{exc_type.__name__}: {exc}"[:500]
        return entry

    def as_finished(self) -> list[dict]:
        """The run's attempts (`read_attempts`) as they will read once this one has ended well."""
        return _merge_attempts([*_attempt_lines(self.path), self._end()])

    def _append(self, entry: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_attempts(run_dir: str | Path) -> list[dict]:
    """The attempts of a run folder, oldest first: each its start (time, step, host, pid, world
    size, SLURM job) merged with its end (time, step, status, wall seconds), or with
    `status: "killed or running"` where no end was written."""
    return _merge_attempts(_attempt_lines(Path(run_dir) / ATTEMPTS_FILE))


def _attempt_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return entries


def _merge_attempts(entries: list[dict]) -> list[dict]:
    attempts: dict[int, dict] = {}
    for e in entries:
        a = attempts.setdefault(int(e["attempt"]), {"attempt": int(e["attempt"]), "status": "killed or running"})
        if e["event"] == "start":
            a.update(start=e["time"], start_step=e["step"], host=e["host"], pid=e["pid"],
                     world_size=e["world_size"], slurm_job_id=e["slurm_job_id"])
        else:
            a.update(end=e["time"], end_step=e["step"], status=e["status"], wall_s=e["wall_s"],
                     **({"error": e["error"]} if "error" in e else {}))
    return [attempts[k] for k in sorted(attempts)]


class EMA(torch.optim.swa_utils.AveragedModel):
    """torch's `AveragedModel` with the EMA update of `get_ema_multi_avg_fn` (buffers averaged
    too): the same state dict (`module.<k>`, `n_averaged`) and the same arithmetic, but its
    update never reads the step counter back from a tensor. `AveragedModel.update_parameters`
    evaluates `n_averaged == 0` and `> 0` as Python booleans and copies the counter to the
    device at every call, each a host-device synchronisation on CUDA; here the count is
    mirrored in a Python int (restored with the state dict)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        super().__init__(module, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True)
        self._count = 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._count = int(self.n_averaged)

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        mine = [p.detach() for p in itertools.chain(self.module.parameters(), self.module.buffers())]
        theirs = [p.detach() for p in itertools.chain(model.parameters(), model.buffers())]
        if len(mine) != len(theirs):
            raise ValueError("EMA: the model's parameters and buffers differ from the averaged copy's")
        if self._count == 0:
            for a, b in zip(mine, theirs):
                a.copy_(b)
        else:
            groups: dict[tuple, tuple[list, list]] = {}
            for a, b in zip(mine, theirs):
                g = groups.setdefault((a.device, a.dtype), ([], []))
                g[0].append(a)
                g[1].append(b.to(a.device))
            for ema_list, model_list in groups.values():
                self.multi_avg_fn(ema_list, model_list, None)  # the decay is bound in the function
        self._count += 1
        self.n_averaged.fill_(self._count)


def make_ema(module: torch.nn.Module, decay: float) -> EMA | None:
    """An exponential moving average of `module` (buffers included), or None when decay is 0."""
    if decay <= 0:
        return None
    return EMA(module, decay)


class Prefetch:
    """Reads the host side of the next steps' batches on a background thread.

    `fetch(step)` (the trainer's reading: indices, rows from the caches, into pinned memory on
    CUDA) runs for the steps of `steps` in order, at most `depth` ahead of the consumer, which
    takes them with `get(step)`; the device side (copies, random draws, the model) stays on the
    main thread. An error raised by `fetch` is raised again by `get`. Use as a context manager:
    leaving it stops the thread. The thread does I/O and array copies, which release the GIL;
    torch ops in `fetch` would compete with the main thread's."""

    def __init__(self, fetch: Callable[[int], Any], steps: range, depth: int = 3):
        import queue

        self._fetch, self._steps = fetch, steps
        self._queue: "queue.Queue" = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)

    def _run(self) -> None:
        import queue

        for step in self._steps:
            try:
                item = (step, self._fetch(step), None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                item = (step, None, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or item[2] is not None:
                return

    def __enter__(self) -> "Prefetch":
        self._thread.start()
        return self

    def get(self, step: int) -> Any:
        got, value, error = self._queue.get()
        if error is not None:
            raise error
        if got != step:
            raise RuntimeError(f"prefetch: step {got} delivered where step {step} was expected")
        return value

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def write_output(out: Path, run_dir: Path, prov: Provenance, write_files: Callable[[Path], None],
                 attempts: list[dict] | None = None) -> None:
    """A trainer's output folder, atomically: the artifact's files (`write_files(tmp)`, the
    artifact module's writer), the run's training log, and the provenance with every attempt
    that made the run (each start and resumption): `attempts` (`AttemptLog.as_finished`), or
    those recorded in the run folder. The run's curves (`curves.CURVES_DIR`: TensorBoard events,
    DVC plots and summary) are copied with the log."""
    prov.extra["attempts"] = attempts if attempts is not None else read_attempts(run_dir)
    with atomic.atomic_dir(out) as tmp:
        write_files(tmp)
        if (run_dir / METRICS_FILE).exists():
            (tmp / METRICS_FILE).write_bytes((run_dir / METRICS_FILE).read_bytes())
        curves.copy_into(run_dir, tmp)
        prov.write(out, tmp)
