"""The alignment term of a diffusion training run (REPA / iREPA / DoG-REPA, docs/method.md §7).

`Alignment.for_run` binds a run's `alignment` parameters to its target source, either a target
cache (`extract-targets`, entries in the latent cache's order, checked to correspond) or the
encoder itself run on the clean training images of each batch ("on-the-fly"), and owns the
projector. The trainer asks it for the targets of a batch's cache entries and for the loss of
the hidden tokens it exposes. The projector is trained with the network and saved in training
checkpoints only: the finished model (what sampling loads) holds the network alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.reader import SplitReader
from ..errors import SpecmatchError
from ..runtime.hashing import sha256_file, sha256_json
from . import encoders, objectives, registry
from .targets import TargetReader, entry_images

log = logging.getLogger(__name__)


class Alignment:
    def __init__(self, p: dict[str, Any], net: nn.Module, source_grid: int, dim: int, identity: str,
                 describe: dict[str, Any], reader: TargetReader | None = None, encoder=None,
                 images: SplitReader | None = None, hflip: bool = True):
        self.p, self.kind = p, p["kind"]
        self.depth, self.weight = int(p["depth"]), float(p["weight"])
        if not 1 <= self.depth <= net.n_blocks:
            raise SpecmatchError(f"alignment.depth {self.depth} is outside [1, {net.n_blocks}], the blocks of "
                                 f"{net.name}")
        self.token_grid = tuple(int(v) for v in net.token_grid)
        if self.token_grid[0] != self.token_grid[1]:
            raise SpecmatchError(f"alignment needs a square token grid, {net.name} has {self.token_grid}")
        self.source_grid, self.dim, self.identity = source_grid, dim, identity
        self.resized = source_grid != self.token_grid[0]
        if self.resized:
            log.warning("alignment: the %s target grid %dx%d is resized to the network's %dx%d token grid",
                        p["encoder"], source_grid, source_grid, *self.token_grid)
        self.projector_kind = registry.effective(p)["projector"]
        self.projector = objectives.build_projector(self.projector_kind, net.hidden_dim, dim, self.token_grid,
                                                    int(p["proj_hidden"]))
        self.reader, self.encoder, self.images, self.hflip = reader, encoder, images, hflip
        self.info = {"kind": self.kind, "encoder": p["encoder"], "depth": self.depth, "weight": self.weight,
                     "projector": self.projector_kind, "targets": p["targets"], "target_grid": [source_grid] * 2,
                     "token_grid": list(self.token_grid), "resized": self.resized, "target_dim": dim,
                     "targets_identity": identity, **self.filter_settings(p), **describe}

    @staticmethod
    def filter_settings(p: dict[str, Any]) -> dict[str, Any]:
        """The target transform's own settings (DoG sigmas, iREPA gamma), recorded with the model so
        that its readers (the report) need nothing else."""
        if p["kind"] == "dog":
            return {"dog": dict(p["dog"])}
        if p["kind"] == "irepa":
            return {"irepa_gamma": float(p["irepa_gamma"])}
        return {}

    @classmethod
    def for_run(cls, p: dict[str, Any], net: nn.Module, latent_manifest: dict[str, Any], latents: Path,
                device: torch.device, targets: str | Path | None = None, dataset: str | Path | None = None,
                resources_dir=None) -> "Alignment":
        if p["targets"] == "cached":
            if targets is None:
                raise SpecmatchError(f"alignment.kind={p['kind']} with targets: cached needs --targets (an "
                                     "extract-targets folder), or set alignment.targets: on-the-fly with --dataset")
            reader = TargetReader(targets)
            reader.check_matches(latent_manifest, latents)
            man = reader.manifest
            want_size = registry.input_size(p)
            if man["encoder"] != p["encoder"] or int(man["image_size"]) != want_size:
                raise SpecmatchError(f"target cache {targets} holds {man['encoder']} at {man['image_size']} px; the run "
                                     f"asks for {p['encoder']} at {want_size} px")
            dim, grid = int(man["shape"][0]), int(man["shape"][1])
            describe = {"weights_sha256": man["weights_sha256"], "image_size": want_size,
                        "target_cache": str(targets), "target_dtype": man["dtype"]}
            return cls(p, net, grid, dim, sha256_file(Path(targets) / "manifest.json"), describe, reader=reader)
        if dataset is None:
            raise SpecmatchError("alignment.targets: on-the-fly needs --dataset (the dataset the latents came from)")
        images = SplitReader(dataset, "train")
        if images.images_sha256 != latent_manifest.get("dataset_images_sha256"):
            raise SpecmatchError(f"--dataset {dataset}: its train images (sha256 {images.images_sha256}) are not the "
                                 f"ones the latent cache {latents} was made from")
        enc = encoders.load(p["encoder"], p["image_size"], device, resources_dir)
        describe = {"weights_sha256": enc.weights_sha256, "image_size": enc.image_size}
        identity = sha256_json({"encoder": p["encoder"], "weights": enc.weights_sha256, "image_size": enc.image_size,
                                "images": images.images_sha256, "hflip": latent_manifest["hflip"]})
        return cls(p, net, enc.grid, enc.dim, identity, describe, encoder=enc, images=images,
                   hflip=bool(latent_manifest["hflip"]))

    def fetch(self, entries: np.ndarray, pin: bool = False) -> torch.Tensor:
        """The host side of the targets of cache entries `entries` (a trainer's loader thread
        runs it, `targets_from` finishes on the device): the cached raw
        targets in their stored dtype, or the clean uint8 images the encoder runs on; in pinned
        memory when `pin`."""
        if self.reader is not None:
            return self.reader.raw(entries, pin)
        images = entry_images(self.images, np.asarray(entries), self.hflip)
        return images.pin_memory() if pin else images

    def targets_from(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Alignment targets (B, D, g, g) on the token grid, float32, on `device`, from what
        `fetch` read."""
        x = host.to(device, non_blocking=True)
        raw = x.float() if self.reader is not None else self.encoder(x)
        return objectives.transform(objectives.resize_grid(raw, self.token_grid[0]), self.kind, self.p)
