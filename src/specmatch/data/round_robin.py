"""Per-entry outputs written as npz shards, spread round-robin over the ranks of a job: the
latent cache, the target cache and the sample work folder.

Entry i of `count` belongs to shard i // shard_size, and shard j is written by rank
j % world_size under the name `<prefix>-<j:05d>.npz`. Each shard's content is a function of its
entries' indices alone (the caller's `make`), so the files, their names and their order do not
depend on how many processes wrote them. Every rank learns every shard's record (file, entry
count, sha256), in shard order, which the main rank lists in the output's manifest.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
from tqdm import tqdm

from ..runtime import distributed
from ..runtime.integrity import file_sha256
from .shards import write_npz


class WrittenShards(NamedTuple):
    shards: list[dict[str, Any]]  # every shard of the job, in order: {"file", "count", "sha256"}
    made: int  # entries this rank wrote now, not counting the shards `done` accepted
    seconds: float  # this rank's time on its shards, before waiting for the others


def write_round_robin(folder: Path, prefix: str, count: int, shard_size: int,
                      make: Callable[[np.ndarray], dict[str, np.ndarray]], info: distributed.DistInfo, desc: str,
                      done: Callable[[Path, int], bool] | None = None) -> WrittenShards:
    """Write this rank's shards of `count` entries into `folder`: for shard j, the arrays of
    `make(ids)` (ids: its entries' global indices, int64 in order) as `<prefix>-<j:05d>.npz`
    (`write_npz`: deterministic bytes, atomic). A shard for which `done(path, entries)` holds,
    left by an earlier attempt, is kept as it is. Collective: every rank calls it, and it returns
    once every rank has written its shards."""
    n_shards = -(-count // shard_size)
    mine: dict[int, dict[str, Any]] = {}
    made, t0 = 0, time.perf_counter()
    for j in tqdm(range(info.rank, n_shards, info.world_size), desc=desc, unit="shard", disable=not info.is_main):
        ids = np.arange(j * shard_size, min(count, (j + 1) * shard_size), dtype=np.int64)
        path = Path(folder) / f"{prefix}-{j:05d}.npz"
        if done is None or not done(path, len(ids)):
            write_npz(path, make(ids))
            made += len(ids)
        # Memoised per (path, size, mtime): a kept shard that `done` has just verified is not read again.
        mine[j] = {"file": path.name, "count": int(len(ids)), "sha256": file_sha256(path)}
    seconds = time.perf_counter() - t0
    every = {j: rec for part in distributed.all_gather_object(mine) for j, rec in part.items()}
    distributed.barrier()
    return WrittenShards([every[j] for j in range(n_shards)], made, seconds)
