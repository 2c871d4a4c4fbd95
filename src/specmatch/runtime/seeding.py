"""Seeds, determinism switches and RNG state for checkpoints.

Two kinds of randomness, kept apart on purpose:
- *Per-rank streams* (`seed_everything`): data order, augmentation, dropout. Each rank gets
  `seed + rank`, so ranks do not draw the same crops; their states travel in checkpoints via
  `capture_rng_state` / `restore_rng_state`.
- *Per-step draws* (`step_rng`, `step_seed`): anything every rank must agree on, or that must be
  the same whether or not the run was interrupted (which DSM block size to use this step, the
  evaluation noise). These are a pure function of (seed, step, stream name), so no
  communication and no saved state are needed, and they do not depend on the number of GPUs.
"""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any

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


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states of python, numpy, torch CPU and every visible CUDA device.

    Only tensors, ints, floats, strings, None, lists and dicts, so the result goes through
    `torch.save` and back through `torch.load(weights_only=True)`.
    """
    version, mt, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(np_state["bit_generator"]),
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"]).astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what `capture_rng_state` returned (possibly after a torch.save/load trip).

    CUDA states are restored for the devices present both then and now; a GPU run resumed on
    a CPU simply has no CUDA generators to restore.
    """
    py = state["python"]
    random.setstate((int(py["version"]),
                     tuple(int(x) for x in torch.as_tensor(py["state"]).tolist()),
                     py["gauss_next"]))
    npst = state["numpy"]
    np.random.set_state({
        "bit_generator": npst["bit_generator"],
        "state": {"key": torch.as_tensor(npst["key"]).numpy().astype(np.uint32),
                  "pos": int(npst["pos"])},
        "has_gauss": int(npst["has_gauss"]),
        "gauss": float(npst["gauss"]),
    })
    torch.set_rng_state(torch.as_tensor(state["torch"]).to("cpu", torch.uint8))
    cuda_states = list(state.get("cuda") or [])
    if cuda_states and torch.cuda.is_available():
        for i in range(min(len(cuda_states), torch.cuda.device_count())):
            torch.cuda.set_rng_state(torch.as_tensor(cuda_states[i]).to("cpu", torch.uint8), i)
