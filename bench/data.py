"""Data path of `train-diffusion`, side by side in one run: today's path (as of commit 004e497)
against the loader that replaced it, on synthetic caches with the paper's per-item sizes.

    python bench/data.py [--global-batch 256] [--world 8] [--shards 32] [--per-shard 1024]

What one rank needs per step at paper scale (SiT-B/1, global batch 256 on 8 GPUs, so 32 rows per
rank; f16d16 latents):
- latent cache rows: mu and logvar, float32 16x16x16 each (32 KiB per entry), and the label;
- for cached REPA targets: 16x16x768 float16 (384 KiB per entry).

Paths timed, all on one CPU thread (torch.set_num_threads(1)):
- old: every rank draws the *global* batch on the CPU (entries, posterior eps, t, diffusion
  noise, label dropout: `draw_batch` of commit 004e497) from memory-mapped shards, then keeps
  its rows; targets of its rows read memory-mapped and converted to float32 on the CPU.
- new (loader): `diffusion.train.read_rows`, the work of the loader thread: the entries of the
  global batch and this rank's rows only, read by positional reads into (pinned on CUDA)
  buffers; targets kept float16 for the device to convert. The random draws are made on the
  training device (`draw_batch`); their cost on the CPU is printed for reference (on a GPU they
  take microseconds).
- new (thread): the same through `Prefetch`, the background thread the trainer uses, with a
  consumer that only takes the batches.

Latents/s per rank = rows of this rank delivered per second. Goal: >= 12k/s per rank (four times a
rank's share of the ~23k/s that 8 H100s consume on SiT-B/1 at 40% MFU) and >= 5x the old path.
The caches are read warm (from the page cache, as on a node whose RAM holds them); the shards
are hashed once before timing (the readers verify each shard on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from specmatch.alignment.targets import SCHEMA as TARGET_SCHEMA  # noqa: E402
from specmatch.alignment.targets import TargetReader  # noqa: E402
from specmatch.autoencoder.latents import SCHEMA as LATENT_SCHEMA  # noqa: E402
from specmatch.autoencoder.latents import LatentReader  # noqa: E402
from specmatch.data import reader as reader_mod  # noqa: E402
from specmatch.data.shards import write_npz  # noqa: E402
from specmatch.diffusion import transport  # noqa: E402
from specmatch.diffusion.train import read_rows  # noqa: E402
from specmatch.runtime import seeding  # noqa: E402
from specmatch.runtime.hashing import sha256_file  # noqa: E402
from specmatch.runtime.training import Prefetch, batch_indices  # noqa: E402

LATENT_SHAPE = (16, 16, 16)  # f16d16 at 256 px
TARGET_SHAPE = (768, 16, 16)  # DINOv2-B/14 tokens on the 16x16 grid


def _synthetic_cache(folder: Path, prefix: str, shards: int, per_shard: int, members, manifest: dict) -> Path:
    """A cache folder as its stage writes it: `shards` npz files of `per_shard` rows, the
    members of shard j from `members(j)`, and manifest.json (`manifest` plus count and shards)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for j in range(shards):
        name = f"{prefix}-{j:05d}.npz"
        write_npz(folder / name, {**members(j), "index": np.arange(per_shard), "flip": np.zeros(per_shard, bool)})
        files.append({"file": name, "count": per_shard, "sha256": sha256_file(folder / name)})
    (folder / "manifest.json").write_text(json.dumps({**manifest, "count": shards * per_shard, "shards": files}))
    return folder


def latent_cache(root: Path, shards: int, per_shard: int) -> Path:
    rng = np.random.default_rng(0)
    return _synthetic_cache(root / "latents", "latents", shards, per_shard, lambda j: {
        "mu": rng.standard_normal((per_shard, *LATENT_SHAPE), np.float32),
        "logvar": rng.standard_normal((per_shard, *LATENT_SHAPE), np.float32) - 4,
        "labels": rng.integers(0, 1000, per_shard)},
        {"schema": LATENT_SCHEMA, "shape": list(LATENT_SHAPE), "scale_factor": 0.25, "num_classes": 1000})


def target_cache(root: Path, shards: int, per_shard: int) -> Path:
    rng = np.random.default_rng(1)
    # random bits stand in for targets (drawing normals would take longer than the whole bench)
    return _synthetic_cache(root / "targets", "targets", shards, per_shard, lambda j: {
        "targets": rng.integers(0, 2 ** 15, (per_shard, *TARGET_SHAPE), np.uint16).view(np.float16)},
        {"schema": TARGET_SCHEMA, "shape": list(TARGET_SHAPE), "dtype": "float16"})


# --------------------------------------------------------------------------- today's path (004e497)

class MemmapCache:
    """The reader of commit 004e497: every shard member memory-mapped (one descriptor each, kept
    open), rows gathered shard by shard."""

    def __init__(self, folder: Path, members: tuple[str, ...]):
        man = json.loads((folder / "manifest.json").read_text())
        self.files = [folder / s["file"] for s in man["shards"]]
        self.starts = list(np.cumsum([0] + [int(s["count"]) for s in man["shards"]][:-1]))
        self.count, self.members = int(man["count"]), members
        self.scale_factor = float(man.get("scale_factor", 1.0))
        self._mapped: dict[int, tuple[np.ndarray, ...]] = {}

    def __len__(self) -> int:
        return self.count

    def get(self, indices):
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        shard = np.searchsorted(np.asarray(self.starts), idx, side="right") - 1
        out = None
        for s in np.unique(shard):
            if s not in self._mapped:
                self._mapped[s] = tuple(reader_mod._member_memmap(self.files[s], f"{m}.npy") for m in self.members)
            arrays = self._mapped[s]
            if out is None:
                out = [np.empty((idx.size,) + a.shape[1:], a.dtype) for a in arrays]
            sel = np.nonzero(shard == s)[0]
            rows = idx[sel] - self.starts[s]
            for o, a in zip(out, arrays):
                o[sel] = a[rows]
        return tuple(out)

    def sample(self, indices, generator):
        mu, logvar, labels = self.get(indices)
        mu, logvar = torch.from_numpy(np.asarray(mu, np.float32)), torch.from_numpy(np.asarray(logvar, np.float32))
        eps = torch.randn(mu.shape, generator=generator)
        z = (mu + torch.exp(0.5 * logvar) * eps) * self.scale_factor
        return z, torch.from_numpy(np.asarray(labels, np.int64))


def old_draw_batch(cache: MemmapCache, path, global_batch: int, seed: int, step: int, label_dropout: float):
    """`draw_batch` of commit 004e497: the whole global batch, every draw on the CPU."""
    idx = batch_indices(len(cache), global_batch, seed, step)
    gen = torch.Generator().manual_seed(seeding.step_seed(seed, step, "posterior"))
    x0, y = cache.sample(idx, gen)
    gen = torch.Generator().manual_seed(seeding.step_seed(seed, step, "diffusion"))
    tt = path.sample_t(global_batch, gen, torch.device("cpu"))
    noise = torch.randn(x0.shape, generator=gen)
    drop = torch.rand(global_batch, generator=gen) < label_dropout
    return idx, x0, y, tt, noise, drop


# --------------------------------------------------------------------------- timing

def rate(fn, rows: int, seconds: float, first_step: int = 0) -> tuple[float, int]:
    """Rows per second of `fn(step)` over about `seconds`, after two warm-up steps."""
    step = first_step
    for _ in range(2):
        fn(step)
        step += 1
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(step)
        step += 1
        n += 1
    return n * rows / (time.perf_counter() - t0), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--global-batch", type=int, default=256)
    ap.add_argument("--world", type=int, default=8, help="ranks sharing the global batch")
    ap.add_argument("--shards", type=int, default=32, help="latent cache shards")
    ap.add_argument("--per-shard", type=int, default=1024, help="entries per latent shard (32 KiB each)")
    ap.add_argument("--target-shards", type=int, default=8)
    ap.add_argument("--target-per-shard", type=int, default=256, help="entries per target shard (384 KiB each)")
    ap.add_argument("--seconds", type=float, default=4.0, help="time per measurement")
    ap.add_argument("--dir", default=None, help="where the synthetic caches go (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    local = args.global_batch // args.world
    rows = slice(0, local)  # rank 0's rows
    seed, dropout = 0, 0.1
    path = transport.from_params({"kind": "linear"})

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        lat = latent_cache(root, args.shards, args.per_shard)
        tgt = target_cache(root, args.target_shards, args.target_per_shard)
        print(f"synthetic caches: {args.shards * args.per_shard} latent entries "
              f"({args.shards} shards, {args.shards * args.per_shard * 32 / 1024:.0f} MiB), "
              f"{args.target_shards * args.target_per_shard} target entries "
              f"({args.target_shards * args.target_per_shard * 384 / 1024:.0f} MiB), written in "
              f"{time.perf_counter() - t0:.1f} s")
        new_lat, new_tgt = LatentReader(lat), TargetReader(tgt)
        old_lat, old_tgt = MemmapCache(lat, ("mu", "logvar", "labels")), MemmapCache(tgt, ("targets",))
        # warm: hash every shard once (the readers verify on first use) and fill the page cache
        new_lat.get(np.arange(0, len(new_lat), args.per_shard))
        new_tgt.get(np.arange(0, len(new_tgt), args.target_per_shard))
        for f in list(lat.glob("*.npz")) + list(tgt.glob("*.npz")):
            f.read_bytes()

        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
              f"{torch.__version__}, 1 thread; global batch {args.global_batch} on {args.world} ranks "
              f"({local} rows per rank)")
        results = {}
        results["old"] = rate(lambda s: old_draw_batch(old_lat, path, args.global_batch, seed, s, dropout)[1][rows],
                              local, args.seconds)
        results["new"] = rate(lambda s: read_rows(new_lat, None, args.global_batch, seed, s, rows), local, args.seconds)

        def threaded(seconds: float) -> tuple[float, int]:
            steps = range(0, 10 ** 9)
            with Prefetch(lambda s: read_rows(new_lat, None, args.global_batch, seed, s, rows), steps) as pf:
                return rate(pf.get, local, seconds)

        results["thread"] = threaded(args.seconds)
        g = torch.Generator()

        def draws(s: int) -> None:  # what draw_batch draws for the global batch, here on the CPU
            shape = (args.global_batch, *LATENT_SHAPE)
            g.manual_seed(s)
            torch.randn(shape, generator=g)
            path.sample_t(args.global_batch, g, torch.device("cpu"))
            torch.randn(shape, generator=g)
            torch.rand(args.global_batch, generator=g)

        draw_rate, _ = rate(draws, args.global_batch, args.seconds / 2)

        print("\nlatent rows per second, one rank (rows of this rank delivered)")
        print(f"  old: global-batch draw on the CPU, memmap gather   {results['old'][0]:>10,.0f} /s")
        print(f"  new: loader, this rank's rows (read_rows)          {results['new'][0]:>10,.0f} /s   "
              f"{results['new'][0] / results['old'][0]:.1f}x old")
        print(f"  new: through the Prefetch thread                   {results['thread'][0]:>10,.0f} /s   "
              f"{results['thread'][0] / results['old'][0]:.1f}x old")
        print(f"  goal: >= 12,000 /s and >= 5x old: "
              f"{'met' if results['new'][0] >= 12000 and results['new'][0] >= 5 * results['old'][0] else 'NOT met'}")
        print(f"  (the random draws of a global batch on this CPU: {args.global_batch / draw_rate * 1e3:.1f} ms per "
              f"step; the trainer makes them on its device)")

        def old_targets(s: int):
            idx = batch_indices(len(old_tgt), args.global_batch, seed, s)[rows]
            (y,) = old_tgt.get(idx)
            return torch.from_numpy(np.asarray(y, np.float32))

        def new_targets(s: int):
            idx = batch_indices(len(new_tgt), args.global_batch, seed, s)[rows]
            return new_tgt.raw(idx)

        t_old, _ = rate(old_targets, local, args.seconds)
        t_new, _ = rate(new_targets, local, args.seconds)
        print("\ncached REPA target rows per second, one rank (16x16x768 float16)")
        print(f"  old: memmap gather, float32 on the CPU             {t_old:>10,.0f} /s")
        print(f"  new: positional reads, float16 (device converts)   {t_new:>10,.0f} /s   {t_new / t_old:.1f}x old")
        open_files = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else None
        print(f"\nopen descriptors now: {open_files} (old reader: one per mapped shard member; new: at most "
              f"{new_lat.max_open} per reader)")


if __name__ == "__main__":
    main()
