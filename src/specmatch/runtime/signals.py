"""Stopping a trainer (or the sampler) cleanly when SLURM says time is up, or a person says stop.

How the signal arrives
----------------------
- Time limit: submit with `--signal=USR1@<seconds>` and SLURM sends SIGUSR1 that many seconds
  before the limit to every process of the job's steps (with `--signal=B:USR1@<seconds>` it goes
  to the batch shell only, which must then forward it, e.g. `trap 'kill -USR1 $pid' USR1`). At
  the limit itself, and at preemption, SLURM sends SIGTERM and, KillWait (or the partition's
  GraceTime) seconds later, SIGKILL. Choose <seconds> larger than one training step plus one
  checkpoint save: the early SIGUSR1 is the signal that reliably leaves time to save.
- At a terminal: Ctrl-C sends SIGINT to the processes of the foreground job, and closing the
  terminal (or a lost ssh connection) sends SIGHUP to its session. Both
  stop a run like SIGTERM: a checkpoint, then exit status 3. A process that was started with
  SIGINT or SIGHUP ignored (`nohup`, which ignores SIGHUP; a background job of a
  non-interactive shell, which ignores SIGINT) keeps ignoring it: whoever started it asked for
  the run to outlive the terminal, so no handler is installed for those two (`honoured`).
  SIGTERM and SIGUSR1 are always caught, even where ignored (the SLURM prefix below ignores
  SIGUSR1 for every process but means it for the trainer).
- Under torchrun, the launcher gets the signal too. It handles SIGTERM, SIGINT, SIGHUP and
  SIGQUIT (its default `--signals-to-handle`) by sending the same signal to its workers and
  killing them `--shutdown-timeout` seconds later (30 by default); SIGUSR1 it forwards only
  when started with `torchrun --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1`
  (otherwise SIGUSR1's default action kills the launcher). Its workers run in sessions of their
  own, so Ctrl-C and a closed terminal reach them through the launcher only. Make the shutdown
  timeout longer than a step plus a checkpoint save.

What the trainer does
---------------------
Inside `with StopRequest() as stop:` the handlers only record the signal (a signal handler
runs between two bytecodes of whatever the main thread was doing, e.g. in the middle of an
optimiser step, so it must not touch training state). The training loop checks
`stop.should_stop(dist_info)` once per step; under torch.distributed that is an all-reduce MAX
of the flag (on the CPU, through the gloo control group, so it never waits for the GPU), so
when any rank was signalled all ranks leave the loop after the same step (ranks stopping at
different steps would deadlock in the next collective). The main rank then
writes a checkpoint and the process exits with `EXIT_INTERRUPTED`. The first signal also prints
one line on stderr (from the main rank), so that a person who pressed Ctrl-C knows the run is
finishing its step and saving rather than hung. Later signals change nothing (SLURM, a launcher
and a person may all signal the same stop); SIGKILL stops a run at once, and its newest
checkpoint stays valid. Only while the stage starts (`catch_early`, below), with nothing trained
yet, does a second Ctrl-C abort it at once.

The sampler (`specmatch sample`) checks the flag before each shard: the shards already written
are its checkpoint, the shard being made is finished first, then it exits with status 3 and a
rerun makes only the missing shards.

Inside a container
------------------
Apptainer's starter catches every signal it receives and forwards it to the container's
process, which starts with the default dispositions whatever its parent ignored
(docs/cluster.md cites the source). So the command run inside the container must ignore
SIGUSR1 itself before it starts torchrun or the stage (the DAG's shell prefix does:
`trap '' USR1`), and the trainers install their handlers first thing (`catch_early`), so that
a warning that arrives while they start is kept, not lost or fatal.

Why exit code 3
---------------
The run is incomplete, so success (0) would be a lie: Snakemake and DVC would accept a stage
whose final outputs were never written. A distinct non-zero code makes the workflow mark the
job failed (Snakemake removes that job's incomplete declared outputs, so keep the run's
`checkpoints/` folder outside them) while the log says plainly "interrupted, checkpoint saved",
unlike 1 (a Python error), 2 (a usage error), 124 (`timeout`) or 128+N (killed by signal N).
Resubmitting the job (SLURM `--requeue`, Snakemake `--retries`, or by hand) with
`--resume auto` then continues from the checkpoint on the same trajectory.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a collective is needed, not when handlers go in
    from .distributed import DistInfo

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 3
"""Exit status of a trainer that stopped on a signal after saving a checkpoint."""

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)

# Signals whose inherited "ignore" is kept (see "How the signal arrives"): a person's intent
# (nohup, `cmd &`), unlike SLURM's SIGUSR1, which the job's own shell prefix ignores on purpose.
HONOUR_IGNORED: frozenset[signal.Signals] = frozenset({signal.SIGINT, signal.SIGHUP})

# Those of HONOUR_IGNORED that this process found ignored before installing anything: once
# `catch_early` replaced the disposition, `signal.getsignal` no longer tells.
_ignored_at_start: set[signal.Signals] = set()

# A stop signal received before the training loop's StopRequest exists (while the stage imports
# torch, reads its inputs, builds and resumes its model: minutes at paper scale).
_early: dict[str, int | None] = {"signum": None}


def _record_early(signum: int, frame: FrameType | None) -> None:
    if _early["signum"] is None:
        _early["signum"] = signum
        _say(f"{signal.Signals(signum).name} received while the stage starts: it stops after its first step, with "
             f"a checkpoint (exit status {EXIT_INTERRUPTED})"
             + ("; Ctrl-C again aborts it now" if signum == signal.SIGINT else ""))
    elif signum == signal.SIGINT:
        # Nothing is trained yet, so nothing is lost: a start that hangs (a slow file system, a
        # rendezvous that never completes) must not leave Ctrl-C without effect.
        raise KeyboardInterrupt


def _say(text: str) -> None:
    """One line on stderr from the main process, written with os.write: a signal handler must not
    take the logging lock that the interrupted code may hold. A terminal that is gone (SIGHUP)
    makes the write fail; the stop goes on regardless."""
    if os.environ.get("RANK", "0") != "0":
        return
    try:
        os.write(2, f"\nspecmatch: {text}\n".encode())
    except OSError:
        pass


def honoured(signals: tuple[signal.Signals, ...]) -> tuple[signal.Signals, ...]:
    """`signals` less those of HONOUR_IGNORED that this process inherited ignored."""
    for sig in signals:
        if sig in HONOUR_IGNORED and signal.getsignal(sig) == signal.SIG_IGN:
            _ignored_at_start.add(sig)
    return tuple(s for s in signals if s not in _ignored_at_start)


def catch_early(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
    """Install recording handlers for the stop signals, first thing in a trainer's process.

    Whatever started the process decides the signals' dispositions: under SLURM the command in
    the container ignores SIGUSR1 (it is meant for the trainer only, and every process of the
    job step receives it), while a container runtime such as Apptainer's starter leaves its
    payload with the default actions (docs/cluster.md). Either way the trainer must neither die
    of the warning nor lose it while it starts: the first stop signal received from here on is
    kept and handed to the `StopRequest` of the training loop, which then checkpoints and stops
    at its first step; a second SIGINT before then aborts the start (KeyboardInterrupt), as
    nothing is trained yet. SIGINT and SIGHUP inherited ignored stay ignored (`honoured`). Only
    the main thread can install handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in honoured(signals):
        signal.signal(sig, _record_early)


class StopRequest:
    """Context manager that turns the stop signals (SIGTERM, SIGUSR1, SIGINT, SIGHUP) into a flag
    the training loop polls.

    Handlers are installed on enter and the previous ones restored on exit; SIGINT and SIGHUP
    inherited ignored are left ignored (`honoured`). Python lets only the main thread install
    handlers; elsewhere none are installed (with a warning) and the flag stays down.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self._signals = tuple(signals)
        self._previous: dict[signal.Signals, Any] = {}
        self._signum: int | None = None
        self._requested = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._request(signum, announce=True)

    def _request(self, signum: int, announce: bool) -> None:
        # Only bookkeeping here; the first signal is the one reported.
        if not self._requested:
            self._signum = signum
            if announce:
                _say(f"{signal.Signals(signum).name} received: stopping after the current step (sampling: the "
                     f"current shard), with a checkpoint (exit status {EXIT_INTERRUPTED})")
        self._requested = True

    @property
    def signal_name(self) -> str | None:
        """'SIGUSR1', 'SIGTERM', 'SIGINT', 'SIGHUP' (the first stop signal received), or None."""
        return signal.Signals(self._signum).name if self._signum is not None else None

    def should_stop(self, dist_info: DistInfo | None = None) -> bool:
        """Whether every rank should stop after this step: true on all ranks as soon as one
        rank was signalled. A collective under torch.distributed, so every rank must call it at
        the same steps; without a process group, whether this process was signalled."""
        if dist_info is None or dist_info.world_size <= 1:
            return self._requested
        from . import distributed

        return distributed.any_rank(self._requested)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            log.warning("StopRequest entered outside the main thread: no signal handlers installed, %s will not "
                        "stop this run cleanly", "/".join(s.name for s in self._signals))
            return self
        for sig in honoured(self._signals):
            self._previous[sig] = signal.signal(sig, self._handle)
        if _early["signum"] in self._signals:  # received while the stage was starting (catch_early)
            self._request(_early["signum"], announce=False)  # catch_early announced it
            _early["signum"] = None
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, previous in self._previous.items():
            # None means the previous handler was not installed from Python; SIG_DFL is the
            # closest thing signal.signal accepts.
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
