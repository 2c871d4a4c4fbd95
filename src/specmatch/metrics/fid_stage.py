"""The `fid ref` and `fid calc` stages (in the spirit of edm2's `calc_metrics ref|calc`).

`fid ref` embeds a prepared split once and stores its reference statistics (`stats.npz`:
mu, sigma, and the features for precision/recall) with the sha256 of the images they came
from. `fid calc` embeds a set of samples (npz shards with a manifest: the output of
`prepare-data` or of the sampling stage) and writes `metrics.json`: the Fréchet distance under
its metric name ("FID" only for the standard Inception), the Inception Score, precision and
recall, and the full protocol, which the provenance record repeats.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import config
from ..data.shards import iter_image_batches, read_manifest
from ..diffusion import sampling_record
from ..errors import SpecmatchError
from ..runtime import atomic
from ..runtime.atomic import atomic_dir
from ..runtime.hashing import ImageStreamHash, sha256_file
from ..runtime.provenance import Provenance
from . import features as feature_nets
from . import fid, record

log = logging.getLogger(__name__)

STATS_NAME = "stats.npz"
STATS_JSON = "stats.json"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SpecmatchError("metrics.device is 'cuda' but no CUDA device is available")
    return torch.device(device)


def _embed_batches(images, where: str, p: dict[str, Any], net) -> tuple[fid.Features, str]:
    """Features of uint8 image batches (an iterable of (B, H, W, 3) arrays) and the sha256 of
    exactly those images."""
    hasher: list[ImageStreamHash] = []

    def batches():
        for batch in images:
            fid.check_images(batch, where)
            if not hasher:
                hasher.append(ImageStreamHash(batch.shape[1:]))
            hasher[0].update(batch)
            yield batch

    feats = fid.extract(batches(), net, p["batch_size"], resolve_device(p["device"]))
    if not hasher:
        raise SpecmatchError(f"{where}: no images to embed")
    return feats, hasher[0].hexdigest()


def _embed(folder: Path, split: str, p: dict[str, Any], net) -> tuple[fid.Features, str]:
    """Features of a split (or its seeded subset) and the sha256 of exactly the images used."""
    return _embed_batches(iter_image_batches(folder, split, p["batch_size"], p["max_images"], p["seed"]),
                          f"{folder} ({split})", p, net)


def _protocol(net, p: dict[str, Any], n: int) -> dict[str, Any]:
    return {"metric": net.spec.metric, "feature_net": net.spec.name, "feature_dim": net.spec.dim,
            "weights_file": net.weights_path.name, "weights_sha256": net.weights_sha256,
            "resize": "bilinear to the net's input size inside the net (pytorch-fid)", "n_samples": n,
            "batch_size": p["batch_size"], "precision_recall_k": p["pr_k"], "is_splits": p["is_splits"]}


def _params(params: dict[str, Any]) -> dict[str, Any]:
    return config.validate(params, ref="metrics", where="metrics", source="metrics parameters")


def ref(dataset: str | Path, params: dict[str, Any], name: str, out: str | Path) -> dict[str, Any]:
    """Reference statistics of a prepared dataset split."""
    p = _params(params)
    folder = Path(dataset)
    man = read_manifest(folder)
    net = feature_nets.load(p["net"], resolve_device(p["device"]), p["resources_dir"])
    prov = Provenance("fid-ref", name, p, seeds={"seed": p["seed"]})
    prov.add_input(folder, "dataset")
    prov.add_input(net.weights_path, f"weights:{net.spec.name}", sha256=net.weights_sha256)
    feats, images_sha = _embed(folder, p["split"], p, net)
    stats = fid.statistics(feats.pool)
    info = {"dataset": man["name"], "split": p["split"], "resolution": man["resolution"],
            "images_sha256": images_sha, "protocol": _protocol(net, p, stats.n), "warnings": stats.warnings}
    prov.protocol = info["protocol"]
    with atomic_dir(out) as tmp:
        with atomic.atomic_file(tmp / STATS_NAME) as f:
            np.savez(f, mu=stats.mu, sigma=stats.sigma, features=feats.pool)
        atomic.write_text(tmp / STATS_JSON, json.dumps(info, indent=1) + "\n")
        prov.write(out, tmp)
    log.info("fid ref %s: %d images of %s/%s with %s", name, stats.n, man["name"], p["split"], net.spec.name)
    return info


def load_ref(folder: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    folder = Path(folder)
    for f in (STATS_NAME, STATS_JSON):
        if not (folder / f).is_file():
            raise SpecmatchError(f"{folder}: not reference statistics (no {f}); make them with `specmatch fid ref`")
    info = json.loads((folder / STATS_JSON).read_text())
    with np.load(folder / STATS_NAME, allow_pickle=False) as z:
        arrays = {k: z[k] for k in ("mu", "sigma", "features")}
    return info, arrays


class Reference:
    """Reference statistics (`fid ref`) with the feature net that made them, loaded once and
    checked against the `metrics` parameters; `measure` scores image sets against them."""

    def __init__(self, ref_dir: str | Path, p: dict[str, Any]):
        self.dir, self.p = Path(ref_dir), p
        self.info, self.arrays = load_ref(ref_dir)
        if self.info["protocol"]["feature_net"] != p["net"]:
            raise SpecmatchError(f"{ref_dir}: reference statistics were made with "
                                 f"{self.info['protocol']['feature_net']!r}, but metrics.net is {p['net']!r}; "
                                 "distances across feature nets are meaningless")
        self.net = feature_nets.load(p["net"], resolve_device(p["device"]), p["resources_dir"])
        if self.net.weights_sha256 != self.info["protocol"]["weights_sha256"]:
            raise SpecmatchError(f"{ref_dir}: reference statistics were made with weights "
                                 f"{self.info['protocol']['weights_sha256']}, not {self.net.weights_sha256}")

    def add_inputs(self, prov: Provenance) -> None:
        prov.add_input(self.dir, "reference")
        prov.add_input(self.net.weights_path, f"weights:{self.net.spec.name}", sha256=self.net.weights_sha256)

    def measure(self, images, where: str) -> record.GenerationMetrics:
        """The metrics of `fid calc` for uint8 images ((N, H, W, 3) or an iterable of such
        batches; every image counts): the distance under its metric name, precision, recall,
        IS (when the net has logits and N >= is_splits), the samples' and reference's
        identities, the protocol and warnings."""
        net, p = self.net, self.p
        feats, images_sha = _embed_batches([images] if hasattr(images, "shape") else images, where, p, net)
        stats = fid.statistics(feats.pool)
        distance = fid.frechet_distance(stats.mu, stats.sigma, self.arrays["mu"], self.arrays["sigma"])
        precision, recall = fid.precision_recall(self.arrays["features"], feats.pool, k=p["pr_k"])
        score = None
        if feats.logits is not None and stats.n >= p["is_splits"]:
            is_mean, is_std = fid.inception_score(feats.logits, p["is_splits"])
            score = record.InceptionScore(record.inception_score_name(net.spec.name, net.spec.metric), is_mean,
                                          is_std)
        return record.GenerationMetrics(
            metric=net.spec.metric, value=distance, precision=precision, recall=recall,
            samples={"n": stats.n, "images_sha256": images_sha},
            reference={"path": str(self.dir), "stats_sha256": sha256_file(self.dir / STATS_NAME),
                       "dataset": self.info["dataset"], "split": self.info["split"],
                       "n": self.info["protocol"]["n_samples"], "images_sha256": self.info["images_sha256"]},
            protocol=_protocol(net, p, stats.n), inception_score=score,
            warnings=stats.warnings + self.info.get("warnings", []))


def calc(samples: str | Path, split: str, ref_dir: str | Path, params: dict[str, Any], name: str,
         out: str | Path) -> record.GenerationMetrics:
    """Fréchet distance (and IS, precision/recall) of a sample set against reference statistics."""
    p = _params(params)
    reference = Reference(ref_dir, p)
    folder = Path(samples)
    prov = Provenance("fid-calc", name, {**p, "samples_split": split}, seeds={"seed": p["seed"]})
    prov.add_input(folder, "samples")
    reference.add_inputs(prov)
    batches = iter_image_batches(folder, split, p["batch_size"], None, p["seed"])
    m = reference.measure(batches, f"{folder} ({split})")
    # Samples from `specmatch sample`: their protocol goes with the metric.
    m = dataclasses.replace(m, name=name, samples={"path": str(folder), "split": split, **m.samples},
                            sampling=sampling_record.read(folder))
    prov.protocol = {**m.protocol, "reference_stats_sha256": m.reference["stats_sha256"]}
    with atomic_dir(out) as tmp:
        record.write(tmp, m)
        prov.write(out, tmp)
    log.info("fid calc %s: %s = %.4f over %d samples", name, m.metric, m.value, m.samples["n"])
    return m
