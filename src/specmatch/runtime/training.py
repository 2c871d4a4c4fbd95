"""Pieces every trainer shares (autoencoders, diffusion): the seeded data order, warm-up, the
non-finite-loss stop and the signal-triggered interruption.

Data order: the global batch of step s is a slice of a seeded permutation of the epoch that
step falls in, a function of (seed, s) only, so a resumed run and a run on any number of
processes see the same examples at the same step.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..errors import SpecmatchError
from . import checkpoint, seeding
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


def warmup(steps: int):
    """LambdaLR factor: linear warm-up over `steps` updates, then constant."""
    return lambda step: min(1.0, (step + 1) / max(1, steps))


def check_finite(terms: dict[str, torch.Tensor], step: int, info, run_dir: Path, what: str = "step") -> None:
    """Stop every rank with an error naming the step and the terms when any rank's loss is not
    finite. Called before the update, so nothing is saved after it and the newest checkpoint
    stays the last good one."""
    bad = torch.tensor(0.0 if all(torch.isfinite(v).all() for v in terms.values()) else 1.0, device=info.device)
    if info.world_size > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item() > 0:
        values = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
        last = checkpoint.list_checkpoints(run_dir)
        raise NonFiniteLoss(f"non-finite loss at {what} {step} ({values} on rank {info.rank}); "
                            f"stopped without saving: the last good checkpoint is "
                            f"{last[-1][1] if last else 'none (no checkpoint yet)'}")


def run_folder(run_dir: str | Path | None, runs_root: str | Path | None, fingerprint: str) -> Path:
    """The trainer's working folder: `run_dir` as given, or `runs_root/<fingerprint[:12]>`. The
    DAG passes a root: the fingerprint covers the parameters and the identity of the inputs, so
    changed upstream data start a fresh run instead of resuming one trained on other data."""
    if (run_dir is None) == (runs_root is None):
        raise SpecmatchError("give exactly one of --run-dir and --runs-root")
    return Path(run_dir) if run_dir is not None else Path(runs_root) / fingerprint[:12]


def end_of_step(step: int, steps: int, every: int, stop, info, save, bar) -> None:
    """The trainers' bookkeeping after update `step`: a checkpoint every `every` steps (the final
    one is written by the caller) and, once SIGTERM/SIGUSR1 arrived on any rank, a checkpoint
    and `Interrupted`, so the job exits cleanly with its work saved."""
    if step % every == 0 and step < steps:
        save()
    if stop.should_stop(info):
        path = save()
        bar.close()
        log.warning("%s received: checkpoint %s written at step %d; resume with --resume auto",
                    stop.signal_name, path, step)
        raise Interrupted(f"interrupted by {stop.signal_name} at step {step}; checkpoint saved")


def prepare_rank(t: dict, info) -> tuple[int, int, slice, bool]:
    """Seed this process, set determinism and split the global batch: returns (seed, global
    batch, this rank's rows of it, whether to autocast to bf16: on CUDA unless fp32 is asked)."""
    seed = int(t["seed"])
    seeding.seed_everything(seed, info.rank)
    seeding.deterministic(bool(t["deterministic"]))
    global_batch = int(t["batch_size"])
    if global_batch % info.world_size:
        raise SpecmatchError(f"train.batch_size {global_batch} is not divisible by the {info.world_size} processes")
    local = global_batch // info.world_size
    bf16 = info.device.type == "cuda" and t["precision"] in ("auto", "bf16")
    return seed, global_batch, slice(info.rank * local, (info.rank + 1) * local), bf16
