"""Process-group setup for the trainers: torchrun on SLURM (NCCL on GPUs, gloo on CPUs) or one
process by hand, behind the same calls.

torchrun exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `setup` reads them
and initialises torch.distributed from the environment (`init_method="env://"`). Without them
(or with WORLD_SIZE=1) it creates no process group at all, and every collective below becomes a
no-op, so trainer code calls them unconditionally and runs unchanged on one CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..errors import SpecmatchError

log = logging.getLogger(__name__)

_DEVICES = ("auto", "cpu", "cuda")
# torchrun sets all of these; a WORLD_SIZE > 1 without them is a launch mistake worth naming.
_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistInfo:
    """Where this process sits in the job. `device` is the one this rank computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    is_main: bool


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SpecmatchError(f"environment variable {name}={raw!r} is not an integer") from None


def _device_type(device: str) -> str:
    if device not in _DEVICES:
        raise SpecmatchError(f"device must be one of {', '.join(_DEVICES)}; got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SpecmatchError("device 'cuda' was requested but torch sees no CUDA GPU "
                             f"(torch {torch.__version__}, CUDA build {torch.version.cuda}, "
                             f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                             "pass --device cpu or run on a GPU node")
    return device


def resolve_device(device: str) -> torch.device:
    """`auto`, `cpu` or `cuda` as the device a single-process stage runs on."""
    return torch.device(_device_type(device))


def _cuda_device(local_rank: int) -> torch.device:
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise SpecmatchError(f"LOCAL_RANK={local_rank} but only {n} CUDA device(s) are visible "
                             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                             "start at most one torchrun process per visible GPU")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def setup(device: str = "auto") -> DistInfo:
    """Join the torchrun job if there is one (WORLD_SIZE > 1), else describe a single process.

    `device`: "auto" (CUDA if available, else CPU), "cpu" or "cuda" (a SpecmatchError if no GPU
    is visible). On CUDA each rank uses GPU `LOCAL_RANK` and the backend is NCCL; on CPU it is
    gloo. Calling it again while a process group exists returns that group's description.
    """
    kind = _device_type(device)
    local_rank = _env_int("LOCAL_RANK", 0)

    if _initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        backend = str(dist.get_backend())
        dev = _cuda_device(local_rank) if kind == "cuda" else torch.device("cpu")
        return DistInfo(rank, world, local_rank, dev, backend, rank == 0)

    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        dev = _cuda_device(local_rank) if kind == "cuda" else torch.device("cpu")
        return DistInfo(0, 1, local_rank, dev, None, True)

    missing = [v for v in _TORCHRUN_VARS if not os.environ.get(v)]
    if missing:
        raise SpecmatchError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch "
                             "multi-process runs with torchrun (or set WORLD_SIZE=1)")
    if not dist.is_available():
        raise SpecmatchError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    rank = _env_int("RANK", 0)
    if kind == "cuda":
        dev = _cuda_device(local_rank)
        # device_id binds the NCCL communicator to this rank's GPU at once, so later
        # collectives and barriers never guess the device from the current context.
        dist.init_process_group(backend="nccl", init_method="env://", device_id=dev)
        backend = "nccl"
        # Small control messages (the per-step stop flag) go through gloo on the CPU: an NCCL
        # all-reduce of a flag would make the host wait for the GPU at every step.
        global _control
        _control = dist.new_group(backend="gloo")
    else:
        dev = torch.device("cpu")
        dist.init_process_group(backend="gloo", init_method="env://")
        backend = "gloo"
    log.info("process group: rank %d of %d (local rank %d), backend %s, device %s",
             rank, world, local_rank, backend, dev)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend,
                    dist.get_rank() == 0)


_control = None  # the gloo group of control messages under NCCL (None: the default group)


def teardown() -> None:
    """Destroy the process group, if any (call in a `finally:`, so NCCL does not warn at exit)."""
    global _control
    if _initialized():
        dist.destroy_process_group()
    _control = None


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes checkpoints, logs and outputs."""
    return not _initialized() or dist.get_rank() == 0


def barrier() -> None:
    if _initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average a floating-point tensor over ranks, in place, and return it.

    The tensor must live on this rank's device (a CUDA tensor under NCCL). SUM followed by a
    division, because ReduceOp.AVG exists for NCCL only and gloo must give the same numbers.
    """
    if not _initialized() or dist.get_world_size() == 1:
        return tensor
    if not tensor.is_floating_point():
        raise TypeError(f"all_reduce_mean needs a floating-point tensor, got {tensor.dtype}")
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.div_(dist.get_world_size())


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on at least one: an all-reduce MAX of one integer
    on the CPU (gloo: the default group, or the control group beside NCCL), so that calling it
    at every step never waits for the GPU."""
    if not _initialized() or dist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return bool(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s picklable `obj` on every rank (e.g. the resolved resume path)."""
    if not _initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (e.g. per-rank RNG states for a checkpoint)."""
    if not _initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def shared_atomic_dir(out: str | os.PathLike, info: DistInfo):
    """An atomic output folder that every rank writes into: the main rank creates the temporary
    folder (`atomic.atomic_dir`) and renames it into place when the block ends normally, or
    removes it on an error; the path is broadcast so that the other ranks write their shards
    beside the main rank's. Callers put a barrier between the ranks' writes and the main
    rank's final files."""
    from . import atomic

    ctx = atomic.atomic_dir(out) if info.is_main else None
    tmp = ctx.__enter__() if ctx is not None else None
    try:
        tmp = Path(broadcast_object(str(tmp) if tmp is not None else None))
        yield tmp
    except BaseException as e:
        if ctx is not None:
            ctx.__exit__(type(e), e, e.__traceback__)
        raise
    if ctx is not None:
        ctx.__exit__(None, None, None)

