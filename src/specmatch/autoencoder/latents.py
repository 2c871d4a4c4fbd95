"""`specmatch extract-latents`: the latent cache that diffusion trains on (docs/method.md §5).

Entries are the train images, then (with `hflip`) their mirror images as separate entries, so a
diffusion trainer samples flips as data, not as an augmentation of its own. Each entry stores
the posterior's `mu` and `logvar` (float32): a trainer draws z = mu + exp(logvar / 2) * eps
itself, so every epoch sees fresh posterior samples, as training on images would.

The scale factor is s = 1 / std(z) over all elements of one posterior sample per entry (or of
the first `scale_samples` entries), accumulated in float64 and summed over ranks; no shift. A
fixed `scale_factor` (the public SD-VAE's 0.18215, which REPA and U-ViT use) replaces it; the
measured std is recorded either way.
Diffusion runs on s * z. The noise of entry i comes from a generator seeded by (seed, i), so
the cache, the scale included, does not depend on the number of processes.

Shards are distributed round-robin over torchrun ranks (`data.round_robin`); every rank writes
into the same temporary folder, which the main rank renames into place after a barrier.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import config as config_mod
from ..data.reader import ShardedCache, SplitReader
from ..data.shards import read_manifest as dataset_manifest
from ..data.round_robin import write_round_robin
from ..errors import SpecmatchError
from ..runtime import distributed, seeding
from ..runtime.provenance import Provenance
from . import artifact
from .model import to_float

log = logging.getLogger(__name__)

SCHEMA = "specmatch.latents/1"
MANIFEST = "manifest.json"


def extract(run: dict[str, Any], ae_dir: str | Path, dataset: str | Path, name: str, out: str | Path) -> dict[str, Any]:
    run = config_mod.validate(run, "ae_run", where="autoencoder run", source=f"parameters of {name}")
    p = run["latents"]
    info = distributed.setup(p["device"])
    try:
        return _extract(run, p, info, Path(ae_dir), Path(dataset), name, Path(out))
    finally:
        distributed.teardown()


def _extract(run, p, info, ae_dir, dataset, name, out):
    dev = info.device
    reader = SplitReader(dataset, "train")
    ae, summary = artifact.load(ae_dir, p["use_ema"], dev)
    n = len(reader)
    if n == 0:
        raise SpecmatchError(f"{dataset}: the train split is empty")
    entries = n * (2 if p["hflip"] else 1)
    scale_n = entries if p["scale_samples"] is None else min(entries, int(p["scale_samples"]))
    stats = torch.zeros(3, dtype=torch.float64)  # count, sum, sum of squares of the sampled z

    def encode(ids: np.ndarray) -> dict[str, np.ndarray]:
        mus, logvars = [], []
        for b in range(0, len(ids), p["batch_size"]):
            part = ids[b:b + p["batch_size"]]
            src, flip = part % n, part >= n
            images, _ = reader.get(src)
            x = to_float(images, dev)
            sel = torch.from_numpy(flip).to(dev)[:, None, None, None]
            x = torch.where(sel, x.flip(-1), x)
            with torch.no_grad():
                post = ae.encode(x)
            mu, logvar = post.mean.float().cpu(), post.logvar.float().cpu()
            mus.append(mu)
            logvars.append(logvar)
            for r, gid in enumerate(part):
                if gid < scale_n:
                    g = torch.Generator().manual_seed(seeding.step_seed(p["seed"], int(gid), "latent-scale"))
                    z = (mu[r] + torch.exp(0.5 * logvar[r]) * torch.randn(mu[r].shape, generator=g)).double()
                    stats.add_(torch.stack([torch.tensor(float(z.numel()), dtype=torch.float64), z.sum(),
                                            (z * z).sum()]))
        _, labels = reader.get(ids % n)
        return {"mu": torch.cat(mus).numpy(), "logvar": torch.cat(logvars).numpy(), "labels": labels,
                "index": (ids % n).astype(np.int64), "flip": (ids >= n)}

    with distributed.shared_atomic_dir(out, info) as tmp:
        written = write_round_robin(tmp, "latents", entries, int(p["shard_size"]), encode, info,
                                    f"extract-latents {name}")
        if info.world_size > 1:
            torch.distributed.all_reduce(stats)
        result = None
        if info.is_main:
            count, s1, s2 = stats.tolist()
            mean = s1 / count
            std = float(np.sqrt(max(s2 / count - mean * mean, 0.0)))
            if not std > 0:
                raise SpecmatchError(f"latents of {ae_dir} have zero spread: no scale factor")
            h = reader.resolution // (2 ** (len(summary["config"]["channels"]) - 1))
            result = {
                "schema": SCHEMA, "name": name, "autoencoder": summary["name"], "variant": summary["variant"],
                "config": summary["config"]["name"], "shape": [summary["config"]["z_channels"], h, h],
                "storage": "mu and logvar, float32 (z = mu + exp(logvar/2) * eps)",
                "count": entries, "images": n, "hflip": bool(p["hflip"]),
                "num_classes": int(dataset_manifest(dataset).get("num_classes") or 0),
                # A fixed scale (latents.scale_factor: the SD-VAE's 0.18215) replaces the measured one.
                "scale_factor": float(p["scale_factor"] or 1.0 / std),
                "scale_source": "fixed (latents.scale_factor)" if p["scale_factor"] else "measured 1/std",
                "latent_mean": mean, "latent_std": std, "scale_elements": int(count),
                "scale_entries": scale_n, "weights": "ema" if (p["use_ema"] and summary.get("ema")) else "raw",
                "dataset_images_sha256": reader.images_sha256, "world_size": info.world_size,
                "shards": written.shards,
            }
            (tmp / MANIFEST).write_text(json.dumps(result, indent=1) + "\n")
            prov = Provenance("extract-latents", name, run, seeds={"latents": p["seed"]})
            prov.add_input(ae_dir, "autoencoder")
            prov.add_input(dataset, "dataset")
            prov.write(out, tmp)
            log.info("latents %s: %d entries, scale factor %.5f (%s)", name, entries, result["scale_factor"],
                     result["scale_source"])
    distributed.barrier()
    return result if result is not None else {}


class LatentReader(ShardedCache):
    """The cache's entries by index: (mu, logvar, labels), read from the shards (through a
    bounded number of open files, `data.reader`), with the manifest (`scale_factor`, `shape`,
    ...) at hand."""

    SCHEMA, MEMBERS, WHAT, STAGE = SCHEMA, ("mu", "logvar", "labels"), "latent cache", "extract-latents"

    def __init__(self, folder: str | Path, cache_shards: int = 4, verify: bool | None = None,
                 max_open: int | None = None):
        super().__init__(folder, cache_shards, verify, max_open)
        self.scale_factor = float(self.manifest["scale_factor"])

    def scaled_sample(self, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """s * (mu + exp(logvar / 2) * eps): the posterior sample diffusion trains on, computed
        where the tensors are (the trainer draws eps on its device)."""
        return (mu + torch.exp(0.5 * logvar) * eps) * self.scale_factor

    def sample(self, indices, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled posterior samples (float32, NCHW) and labels of the entries at `indices`, with
        eps from `generator` (CPU)."""
        mu, logvar, labels = self.get(indices)
        mu, logvar = torch.from_numpy(np.asarray(mu, np.float32)), torch.from_numpy(np.asarray(logvar, np.float32))
        z = self.scaled_sample(mu, logvar, torch.randn(mu.shape, generator=generator))
        return z, torch.from_numpy(np.asarray(labels, np.int64))


read_manifest = LatentReader.read_manifest
