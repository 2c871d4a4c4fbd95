"""Seeds and determinism switches.

Two kinds of randomness, kept apart on purpose:
- *Per-rank streams* (`seed_everything`): whatever a library draws from the global generators
  (weight initialisation, dropout). Each rank gets `seed + rank`. The trainers draw nothing
  from them after building their networks, so checkpoints carry no RNG state: a resumed run
  rebuilds the same networks from the same seed and then loads the saved weights.
- *Per-step draws* (`step_rng`, `step_seed`): anything every rank must agree on, or that must be
  the same whether or not the run was interrupted (which DSM block size to use this step, the
  evaluation noise). These are a pure function of (seed, step, stream name), so no
  communication and no saved state are needed, and they do not depend on the number of GPUs.
"""

from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import torch

# numpy's legacy global seed must fit in 32 bits; seeds are reduced modulo this for it only.
_NP_SEED_MOD = 2**32


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python `random`, numpy's global RNG and torch (CPU and every CUDA device) with
    `seed + rank`, and return that per-rank seed (for the provenance record)."""
    if seed < 0 or rank < 0:
        raise ValueError(f"seed and rank must be non-negative, got seed={seed}, rank={rank}")
    s = int(seed) + int(rank)
    random.seed(s)
    np.random.seed(s % _NP_SEED_MOD)
    torch.manual_seed(s)  # also seeds all CUDA devices (lazily, if CUDA is not yet initialised)
    return s


def deterministic(enabled: bool) -> None:
    """Ask torch for deterministic kernels (warn, rather than fail, where none exists) and turn
    cuDNN autotuning off, whose kernel choice varies from run to run."""
    if enabled:
        # cuBLAS is only deterministic with a fixed workspace; the variable must be set before
        # the first cuBLAS call, and an explicit user setting wins.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def _stream_key(stream: str) -> int:
    # A stable hash: python's hash() of a str is salted per process (PYTHONHASHSEED), which
    # would give every rank, and every restart, a different stream.
    return int.from_bytes(hashlib.sha256(stream.encode("utf-8")).digest()[:8], "little")


def _seed_sequence(seed: int, step: int, stream: str) -> np.random.SeedSequence:
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be non-negative, got seed={seed}, step={step}")
    return np.random.SeedSequence(entropy=int(seed), spawn_key=(int(step), _stream_key(stream)))


def step_rng(seed: int, step: int, stream: str) -> np.random.Generator:
    """A numpy Generator that depends only on (seed, step, stream): every rank, and a resumed
    run, draws the same values at the same step without communicating."""
    return np.random.Generator(np.random.PCG64(_seed_sequence(seed, step, stream)))


def step_seed(seed: int, step: int, stream: str) -> int:
    """The same idea as an integer, for a `torch.Generator(device).manual_seed(...)` when the
    draw is a tensor on the GPU (63 bits: torch accepts any non-negative int64)."""
    word = _seed_sequence(seed, step, stream).generate_state(1, dtype=np.uint64)[0]
    return int(word) >> 1
