"""A stage started by Snakemake stops when that Snakemake dies.

Snakemake runs a rule's command in a shell (`bash -c "...; specmatch <stage> ... > log"`), so
a stage is Snakemake's grandchild (a torchrun worker its great-grandchild). When Snakemake is
killed outright (SIGKILL, the OOM killer), nothing reaches the shell or the stage: they would
run on as orphans, holding GPUs and writing outputs no run will record. `watch()`, called by the
CLI as every command starts, finds the Snakemake process above it and sends this process
SIGTERM when that one is gone: a trainer then saves a checkpoint and exits (runtime/signals.py),
and the next Snakemake run resumes it; other stages stop, leaving no output.

Why not `prctl(PR_SET_PDEATHSIG)`: it fires when the *parent* dies, and the parent here is the
rule's shell, which outlives Snakemake; it also fires when the thread that started the child
exits, and Snakemake starts jobs from worker threads. The watch is a pidfd (Linux 5.3+) on the
Snakemake process, waited on by a daemon thread: it becomes readable when that process exits.

Not under SLURM (`SLURM_JOB_ID` set): there the Snakemake above a stage is the job step's task,
started by slurmstepd, and SLURM ends every process of a step whose task is gone; SLURM's own
signals (SIGUSR1 before the time limit, SIGTERM from scancel) are the ones the stages follow.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading

MAX_DEPTH = 4  # shell, torchrun (or srun, timeout, an apptainer starter) between Snakemake and a stage


def parent_of(pid: int) -> int | None:
    """The parent pid of `pid` from /proc (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name, in parentheses, may itself hold spaces and parentheses: the fields after it
    # start behind the last ')': state, then ppid.
    fields = stat[stat.rfind(b")") + 2:].split()
    return int(fields[1]) if len(fields) > 1 else None


def command_line(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def is_snakemake(argv: list[str]) -> bool:
    """`snakemake ...` (its console script, run by a Python: [python, .../snakemake, ...]) or
    `python -m snakemake ...` (how Snakemake starts its own job processes)."""
    if any(os.path.basename(a) == "snakemake" for a in argv[:2]):
        return True
    return any(a == "-m" and b == "snakemake" for a, b in zip(argv, argv[1:]))


def snakemake_above(pid: int | None = None, depth: int = MAX_DEPTH) -> int | None:
    """The nearest Snakemake process among the `depth` ancestors of `pid` (default: this one)."""
    pid = os.getppid() if pid is None else parent_of(pid)
    for _ in range(depth):
        if pid is None or pid <= 1:
            return None
        if is_snakemake(command_line(pid)):
            return pid
        pid = parent_of(pid)
    return None


_watched: int | None = None


def watch(signum: int = signal.SIGTERM) -> int | None:
    """Send this process `signum` when the Snakemake that started it exits (see the module's
    docstring). Returns that Snakemake's pid, or None where nothing is watched: not Linux, under
    SLURM, no Snakemake above, or already watching."""
    global _watched
    if _watched is not None or not sys.platform.startswith("linux") or "SLURM_JOB_ID" in os.environ:
        return None
    pid = snakemake_above()
    if pid is None or not hasattr(os, "pidfd_open"):
        return None
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # gone between the two looks: this job is already an orphan
        _stop(pid, signum)
        return pid
    except OSError:  # a kernel without pidfds
        return None
    if not is_snakemake(command_line(pid)):  # the pid was reused before the pidfd was opened
        os.close(fd)
        return None
    _watched = pid
    threading.Thread(target=_wait, args=(fd, pid, signum), name="snakemake-lifeline", daemon=True).start()
    return pid


def _wait(fd: int, pid: int, signum: int) -> None:
    select.select([fd], [], [])
    os.close(fd)
    _stop(pid, signum)


def _stop(pid: int, signum: int) -> None:
    print(f"specmatch: Snakemake (pid {pid}), which started this job, is gone: stopping "
          f"({signal.Signals(signum).name})", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signum)
