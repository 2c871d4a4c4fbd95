"""`specmatch extract-targets`: the alignment targets of every training image, computed once.

REPA runs its frozen encoder on every batch; here the encoder's raw token grids (N, D, g, g) of
the train split are computed once and stored as npz shards next to the latent caches, in the
same entry order as `extract-latents`: the train images, then (with `hflip`) their mirror
images, so entry i of a target cache is the target of entry i of a latent cache of the same
dataset. The transforms of REPA, iREPA and DoG-REPA are derived from these raw grids at
training time (`objectives.transform`), so one cache serves every kind. No augmentation.

Storage is float16 by default: a cosine target needs far less precision than that, and it
halves the size (DINOv2-B/14 on 2 x 1.28M ImageNet entries: 2 x 1.28M x 256 x 768 x 2 bytes,
about 1 TB; the on-the-fly mode of train-diffusion avoids it at the cost of an encoder forward
per step).

Shards are distributed round-robin over torchrun ranks (`data.round_robin`), as for the latent
cache.
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
from ..data.round_robin import write_round_robin
from ..errors import SpecmatchError
from ..runtime import distributed
from ..runtime.provenance import Provenance
from . import encoders

log = logging.getLogger(__name__)

SCHEMA = "specmatch.targets/1"
MANIFEST = "manifest.json"
STAGE = "extract-targets"


def entry_images(reader: SplitReader, ids: np.ndarray, hflip: bool) -> torch.Tensor:
    """uint8 images (N, H, W, 3) of cache entries `ids`: image i % n, mirrored when i >= n (the
    latent cache's layout)."""
    n = len(reader)
    if not hflip and len(ids) and int(ids.max()) >= n:
        raise SpecmatchError(f"entry {int(ids.max())} is beyond the {n} train images (no hflip)")
    images, _ = reader.get(ids % n)
    x = torch.from_numpy(np.ascontiguousarray(images))
    flip = torch.from_numpy(ids >= n)[:, None, None, None]
    return torch.where(flip, x.flip(2), x)


def extract(p: dict[str, Any], dataset: str | Path, name: str, out: str | Path) -> dict[str, Any]:
    """Encode the train split of `dataset` with the encoder of `p` (schema `$defs/targets`)."""
    p = config_mod.validate(p, "targets", where="targets", source=f"parameters of {name}")
    info = distributed.setup(p["device"])
    try:
        return _extract(p, info, Path(dataset), name, Path(out))
    finally:
        distributed.teardown()


def _extract(p, info, dataset, name, out):
    reader = SplitReader(dataset, "train")
    n = len(reader)
    if n == 0:
        raise SpecmatchError(f"{dataset}: the train split is empty")
    enc = encoders.load(p["encoder"], p["image_size"], info.device, p.get("resources_dir"))
    entries = n * (2 if p["hflip"] else 1)
    dtype = {"float16": np.float16, "float32": np.float32}[p["dtype"]]

    def encode(ids: np.ndarray) -> dict[str, np.ndarray]:
        parts = []
        for b in range(0, len(ids), p["batch_size"]):
            x = entry_images(reader, ids[b:b + p["batch_size"]], p["hflip"]).to(info.device)
            parts.append(enc(x).cpu().numpy().astype(dtype))
        return {"targets": np.concatenate(parts), "index": (ids % n).astype(np.int64), "flip": ids >= n}

    with distributed.shared_atomic_dir(out, info) as tmp:
        written = write_round_robin(tmp, "targets", entries, int(p["shard_size"]), encode, info,
                                    f"extract-targets {name}")
        result = None
        if info.is_main:
            result = {"schema": SCHEMA, "name": name, **enc.describe(), "dtype": p["dtype"],
                      "shape": [enc.dim, enc.grid, enc.grid], "count": entries, "images": n, "hflip": bool(p["hflip"]),
                      "dataset_images_sha256": reader.images_sha256, "world_size": info.world_size,
                      "shards": written.shards}
            (tmp / MANIFEST).write_text(json.dumps(result, indent=1) + "\n")
            prov = Provenance(STAGE, name, p)
            prov.add_input(dataset, "dataset")
            prov.add_input(enc.weights_path, f"weights:{p['encoder']}")
            prov.write(out, tmp)
            log.info("targets %s: %d entries of %s, grid %dx%d x %d", name, entries, p["encoder"], enc.grid,
                     enc.grid, enc.dim)
    distributed.barrier()
    return result if result is not None else {}


class TargetReader(ShardedCache):
    """Raw target grids of a cache's entries by index (N, D, g, g): `raw` in the stored dtype
    (a trainer's loader reads these and converts on its device), `targets` as float32."""

    SCHEMA, MEMBERS, WHAT, STAGE = SCHEMA, ("targets",), "target cache", STAGE

    def raw(self, indices, pin: bool = False) -> torch.Tensor:
        (y,) = self.get_tensors(indices, pin)
        return y

    def targets(self, indices) -> torch.Tensor:
        return self.raw(indices).float()

    def check_matches(self, latent_manifest: dict[str, Any], latents_folder: str | Path) -> None:
        """Refuse a target cache whose entries are not those of the latent cache."""
        man = self.manifest
        for key in ("dataset_images_sha256", "images", "hflip", "count"):
            if man.get(key) != latent_manifest.get(key):
                raise SpecmatchError(
                    f"target cache {self.folder} and latent cache {latents_folder} differ in {key} "
                    f"({man.get(key)!r} vs {latent_manifest.get(key)!r}): their entries would not correspond; "
                    "extract the targets from the dataset the latents came from, with the same hflip")


read_manifest = TargetReader.read_manifest
