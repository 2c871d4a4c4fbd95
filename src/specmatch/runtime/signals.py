"""Stopping a trainer cleanly when SLURM says time is up.

How the signal arrives
----------------------
- Time limit: submit with `--signal=USR1@<seconds>` and SLURM sends SIGUSR1 that many seconds
  before the limit to every process of the job's steps (with `--signal=B:USR1@<seconds>` it goes
  to the batch shell only, which must then forward it, e.g. `trap 'kill -USR1 $pid' USR1`). At
  the limit itself, and at preemption, SLURM sends SIGTERM and, KillWait (or the partition's
  GraceTime) seconds later, SIGKILL. Choose <seconds> larger than one training step plus one
  checkpoint save: the early SIGUSR1 is the signal that reliably leaves time to save.
- Under torchrun, the launcher gets the signal too. It handles SIGTERM by forwarding it to its
  workers and killing them `--shutdown-timeout` seconds later (30 by default); SIGUSR1 it
  forwards only when started with
  `torchrun --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1` (otherwise SIGUSR1's
  default action kills the launcher). Make the shutdown timeout longer than a checkpoint save.

What the trainer does
---------------------
Inside `with StopRequest() as stop:` the handlers only record the signal (a signal handler
runs between two bytecodes of whatever the main thread was doing, e.g. in the middle of an
optimiser step, so it must not touch training state). The training loop checks
`stop.should_stop(dist_info)` once per step; under torch.distributed that is an all-reduce MAX
of the flag, so when any rank was signalled all ranks leave the loop after the same step
(ranks stopping at different steps would deadlock in the next collective). The main rank then
writes a checkpoint and the process exits with `EXIT_INTERRUPTED`.

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
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

from . import distributed
from .distributed import DistInfo

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 3
"""Exit status of a trainer that stopped on a signal after saving a checkpoint."""

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Context manager that turns SIGTERM / SIGUSR1 into a flag the training loop polls.

    Handlers are installed on enter and the previous ones restored on exit. Python lets only
    the main thread install handlers; elsewhere none are installed (with a warning) and only
    `request()` can set the flag.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self._signals = tuple(signals)
        self._previous: dict[signal.Signals, Any] = {}
        self._signum: int | None = None
        self._requested = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only bookkeeping here; the first signal is the one reported.
        if not self._requested:
            self._signum = signum
        self._requested = True

    @property
    def signal_name(self) -> str | None:
        """'SIGUSR1', 'SIGTERM' (the first stop signal received), or None."""
        return signal.Signals(self._signum).name if self._signum is not None else None

    def should_stop(self, dist_info: DistInfo | None = None) -> bool:
        """Whether every rank should stop after this step: true on all ranks as soon as one
        rank was signalled. A collective under torch.distributed, so every rank must call it at
        the same steps; without a process group, whether this process was signalled."""
        if dist_info is None or dist_info.world_size <= 1:
            return self._requested
        return distributed.any_rank(self._requested, dist_info.device)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            log.warning("StopRequest entered outside the main thread: no signal handlers "
                        "installed, SIGTERM/SIGUSR1 will not stop this run cleanly")
            return self
        for sig in self._signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, previous in self._previous.items():
            # None means the previous handler was not installed from Python; SIG_DFL is the
            # closest thing signal.signal accepts.
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
