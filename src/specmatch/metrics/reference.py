"""Reference statistics: the `fid ref` stage (in the spirit of edm2's `calc_metrics ref`), their
folder's reader, and `Reference`, which every stage that scores images against them uses
(`fid calc` in `scoring.py`, `fid-progress`), under a named protocol (`protocol.py`: `adm` or
`pytorch-fid`).

`fid ref` embeds a prepared split in one streaming pass, or reads an ADM reference batch, and
stores its reference statistics: `stats.npz` with the float64 mean and covariance of the pool
features (`mu`, `sigma`; `mu_s`, `sigma_s` of the spatial features under `adm`) and the pool
features of the precision/recall reference (`pr_features`: a seeded subset of `pr_ref_size`
images, or the batch's `arr_0`), never the features of every image; `stats.json` with the
sha256 of the images, the source and the protocol. `Reference.measure` gives FID (or the net's
distance), sFID, IS, precision and recall, the bootstrap of the distance when asked, and the
protocol, as a `record.GenerationMetrics`.

Reading `stats.npz` is verifying: it is checked against the sha256 that `fid ref` recorded in the
folder's provenance.json (`$SPECMATCH_VERIFY=0` skips, and is recorded) and read whole, so a
damaged file fails with its name and the stage that makes it again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import resources
from ..data.reader import SplitReader
from ..data.shards import iter_image_batches, read_manifest, subset_indices
from ..errors import SpecmatchError
from ..runtime import atomic, integrity
from ..runtime.distributed import resolve_device
from ..runtime.atomic import atomic_dir
from ..runtime.jsonfile import read_json
from ..runtime.provenance import Provenance
from . import adm, bootstrap, fid, protocol, record
from . import features as feature_nets

log = logging.getLogger(__name__)

STATS_NAME = "stats.npz"
STATS_JSON = "stats.json"
SCHEMA = "specmatch.fid-ref/2"
REMAKE = "make the reference statistics again with `specmatch fid ref` (DAG rule fid_ref)"


def _protocol(net: feature_nets.LoadedNet, s: protocol.Settings, n: int) -> dict[str, Any]:
    return {"name": s.protocol, "metric": net.spec.metric, "feature_net": net.spec.name, "feature_dim": net.spec.dim,
            "spatial_dim": net.spec.spatial_dim or None, "weights_file": net.weights_path.name,
            "weights_sha256": net.weights_sha256, "resize": net.spec.resize, "n_samples": n,
            "batch_size": s.batch_size, "statistics": "float64 mean and covariance (N - 1), streamed",
            "precision_recall_k": s.pr_k, "precision_recall_distance": "squared Euclidean, float32",
            "is_split_size": s.is_split_size, "is_logits": "classifier without its bias"}


def too_few(where: str, n: int, s: protocol.Settings) -> SpecmatchError:
    return SpecmatchError(f"{where}: {n} images, fewer than the {s.min_samples} that protocol {s.protocol} scores "
                          f"(metrics.pr_k = {s.pr_k}: the k-th nearest neighbour of precision/recall needs k + 1 "
                          "images, a covariance 2)")


@dataclass(frozen=True)
class ReferenceStats:
    """The output of `fid ref`, read back and checked."""

    folder: Path
    info: dict[str, Any]
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None
    sigma_s: np.ndarray | None
    pr_features: np.ndarray
    stats_sha256: str

    @property
    def dataset(self) -> str:
        return self.info["dataset"]

    @property
    def protocol(self) -> dict[str, Any]:
        return self.info["protocol"]


def load_ref(folder: str | Path) -> ReferenceStats:
    folder = Path(folder)
    for f in (STATS_NAME, STATS_JSON):
        if not (folder / f).is_file():
            raise SpecmatchError(f"{folder}: not reference statistics (no {f}); make them with `specmatch fid ref`")
    path = folder / STATS_JSON
    info = read_json(path, f"{path}: missing")
    if not isinstance(info, dict) or info.get("schema") != SCHEMA:
        got = info.get("schema") if isinstance(info, dict) else None
        raise SpecmatchError(f"{path}: key schema is {got!r}, expected {SCHEMA!r} (statistics of an older version; "
                             "make them again with `specmatch fid ref`)")
    for key in ("dataset", "split", "images_sha256", "protocol"):
        if key not in info:
            raise SpecmatchError(f"{path}: no key {key!r} (expected a `specmatch fid ref` output)")
    dim, sdim = info["protocol"]["feature_dim"], info["protocol"].get("spatial_dim")
    want = {"mu": (dim,), "sigma": (dim, dim), "pr_features": (None, dim)}
    if sdim:
        want.update(mu_s=(sdim,), sigma_s=(sdim, sdim))
    npz = folder / STATS_NAME
    integrity.check_recorded(npz, folder, remedy=REMAKE)
    arrays = integrity.load_npz(npz, tuple(want), f"protocol {info['protocol']['name']}: {REMAKE}")
    for k, shape in want.items():
        got = arrays[k].shape
        if len(got) != len(shape) or any(w is not None and g != w for g, w in zip(got, shape)):
            raise SpecmatchError(f"{npz}: key {k!r} has shape {got}, expected {shape}; {REMAKE}")
    return ReferenceStats(folder, info, arrays["mu"], arrays["sigma"], arrays.get("mu_s"), arrays.get("sigma_s"),
                          arrays["pr_features"], integrity.file_sha256(npz))


def _write_ref(out: str | Path, arrays: dict[str, np.ndarray], info: dict[str, Any], prov: Provenance) -> None:
    prov.protocol = info["protocol"]
    with atomic_dir(out) as tmp:
        with atomic.atomic_file(tmp / STATS_NAME) as f:
            np.savez(f, **arrays)
        atomic.write_text(tmp / STATS_JSON, json.dumps(info, indent=1) + "\n")
        prov.write(out, tmp)


def ref(dataset: str | Path | None, params: dict[str, Any], name: str, out: str | Path,
        reference_batch: str | Path | None = None) -> dict[str, Any]:
    """Reference statistics of a prepared dataset split, or of an ADM reference batch."""
    if (dataset is None) == (reference_batch is None):
        raise SpecmatchError("fid ref: give either a prepared dataset or an ADM reference batch")
    if reference_batch is not None:
        s = protocol.settings(params, name)
        return _ref_from_batch(Path(reference_batch), None, s, name, name, out)
    folder = Path(dataset)
    man = read_manifest(folder)
    s = protocol.settings(params, man["name"])
    if s.reference_batch is not None:
        # The dataset's reference is that ADM batch (a resource: found and checked as the weights are).
        path, digest = resources.require(s.reference_batch, s.resources_dir)
        return _ref_from_batch(path, digest, s, man["name"], name, out)
    n_split = len(SplitReader(folder, s.split))
    n_used = min(n_split, s.max_images or n_split)
    where = f"{folder} ({s.split})"
    if n_used < s.min_samples:
        raise too_few(where, n_used, s)
    pr_rows = subset_indices(n_used, s.pr_ref_size, s.seed)
    pr_rows = np.arange(n_used) if pr_rows is None else pr_rows
    dev = resolve_device(s.device)
    net = feature_nets.load(s.feature_net, dev, s.resources_dir)
    prov = Provenance("fid-ref", name, s.params, seeds={"seed": s.seed})
    prov.add_input(folder, "dataset")
    prov.add_input(net.weights_path, f"weights:{net.spec.name}", sha256=net.weights_sha256)
    emb = fid.embed(iter_image_batches(folder, s.split, s.batch_size, s.max_images, s.seed), net, s.batch_size,
                    dev, where, subset=pr_rows)
    arrays = {"mu": emb.pool.mu, "sigma": emb.pool.sigma, "pr_features": emb.subset}
    if emb.spatial is not None:
        arrays.update(mu_s=emb.spatial.mu, sigma_s=emb.spatial.sigma)
    info = {"schema": SCHEMA, "dataset": man["name"], "split": s.split, "resolution": man["resolution"], "n": emb.n,
            "images_sha256": emb.images_sha256, "source": {"kind": "dataset", "path": str(folder)},
            "precision_recall_reference": {"n": len(pr_rows), "rows": "seeded subset of the n images"
                                           if len(pr_rows) < emb.n else "all", "seed": s.seed},
            "protocol": _protocol(net, s, emb.n), "warnings": emb.pool.warnings}
    _write_ref(out, arrays, info, prov)
    log.info("fid ref %s: %d images of %s/%s (%s, protocol %s)", name, emb.n, man["name"], s.split, net.spec.name,
             s.protocol)
    return info


def _ref_from_batch(path: Path, digest: str | None, s: protocol.Settings, dataset: str, name: str,
                    out: str | Path) -> dict[str, Any]:
    """ADM's reference: its stored statistics (or those of arr_0 when it stores none, as the
    evaluator's `read_statistics`) and arr_0 as the precision/recall reference. `digest`: the
    file's sha256 when `resources.require` has checked it already."""
    if s.protocol != "adm":
        raise SpecmatchError(f"{path}: an ADM reference batch is measured under protocol adm, but metrics.protocol "
                             f"(dataset {dataset!r}) resolves to {s.protocol!r}")
    batch = adm.read_reference_batch(path, digest)
    if s.reference_batch is not None:
        res = resources.get(s.reference_batch)
        if not res.matches(batch.sha256):
            raise SpecmatchError(f"{path}: sha256 {batch.sha256}, but metrics.reference_batch names "
                                 f"{s.reference_batch!r} ({res.file}, expected {res.expected})")
    if batch.n_images < s.min_samples:
        raise too_few(f"{path}: key 'arr_0'", batch.n_images, s)
    dev = resolve_device(s.device)
    net = feature_nets.load(s.feature_net, dev, s.resources_dir)
    prov = Provenance("fid-ref", name, s.params, seeds={"seed": s.seed})
    prov.add_input(path, "reference-batch", sha256=batch.sha256)
    prov.add_input(net.weights_path, f"weights:{net.spec.name}", sha256=net.weights_sha256)
    emb = fid.embed(batch.images(s.batch_size), net, s.batch_size, dev, f"{path}: arr_0",
                    subset=np.arange(batch.n_images))
    if batch.stats is not None:
        arrays = {**batch.stats, "pr_features": emb.subset}
        stats_from, n_stats, notes = "stored in the batch (mu, sigma, mu_s, sigma_s)", None, []
    else:
        arrays = {"mu": emb.pool.mu, "sigma": emb.pool.sigma, "mu_s": emb.spatial.mu, "sigma_s": emb.spatial.sigma,
                  "pr_features": emb.subset}
        stats_from, n_stats, notes = "computed from arr_0", emb.n, emb.pool.warnings
    info = {"schema": SCHEMA, "dataset": dataset, "split": path.name, "resolution": batch.image_shape[0], "n": n_stats,
            "images_sha256": emb.images_sha256,
            "source": {"kind": "adm-reference-batch", "path": str(path), "sha256": batch.sha256,
                       "resource": s.reference_batch, "statistics": stats_from, "n_images": batch.n_images},
            "precision_recall_reference": {"n": batch.n_images, "rows": "arr_0 (all)", "seed": None},
            "protocol": _protocol(net, s, batch.n_images), "warnings": notes}
    _write_ref(out, arrays, info, prov)
    log.info("fid ref %s: ADM reference batch %s of %s (%d images; statistics %s)", name, path, dataset,
             batch.n_images, stats_from)
    return info


class Reference:
    """Reference statistics (`fid ref`) with the feature net that made them, loaded once and
    checked against the `metrics` parameters (resolved for the reference's dataset); `measure`
    scores image sets against them."""

    def __init__(self, ref_dir: str | Path, params: dict[str, Any]):
        self.dir = Path(ref_dir)
        self.stats = load_ref(ref_dir)
        self.settings = s = protocol.settings(params, self.stats.dataset)
        made = self.stats.protocol
        where = self.dir / STATS_JSON
        if (made["name"], made["feature_net"]) != (s.protocol, s.feature_net):
            raise SpecmatchError(f"{where}: the reference was made under protocol {made['name']} with "
                                 f"{made['feature_net']!r} (keys protocol.name, protocol.feature_net), but the "
                                 f"metrics parameters of dataset {self.stats.dataset!r} measure under protocol "
                                 f"{s.protocol} with {s.feature_net!r} (net {s.net!r}); distances across protocols "
                                 "or feature nets are meaningless: make the reference again with `fid ref`")
        self.device = resolve_device(s.device)
        self.net = feature_nets.load(s.feature_net, self.device, s.resources_dir)
        if self.net.weights_sha256 != made["weights_sha256"]:
            raise SpecmatchError(f"{where}: key protocol.weights_sha256 is {made['weights_sha256']}, but the "
                                 f"feature net's weights have {self.net.weights_sha256}")

    def add_inputs(self, prov: Provenance) -> None:
        prov.add_input(self.dir, "reference")
        prov.add_input(self.net.weights_path, f"weights:{self.net.spec.name}", sha256=self.net.weights_sha256)

    def measure(self, images, where: str) -> record.GenerationMetrics:
        """The metrics of `fid calc` for uint8 images ((N, H, W, 3) or an iterable of such
        batches; every image counts): the distance under its metric name, sFID (protocol adm),
        precision, recall, IS, the bootstrap of the distance (metrics.bootstrap > 0), the
        samples' and reference's identities, the protocol and warnings."""
        net, s, r = self.net, self.settings, self.stats
        emb = fid.embed(images, net, s.batch_size, self.device, where, keep=True)
        if emb.n < s.min_samples:
            raise too_few(where, emb.n, s)
        distance = fid.frechet_distance(emb.pool.mu, emb.pool.sigma, r.mu, r.sigma)
        sfid = None
        if emb.spatial is not None:
            sfid = fid.frechet_distance(emb.spatial.mu, emb.spatial.sigma, r.mu_s, r.sigma_s)
        precision, recall = fid.precision_recall(r.pr_features, emb.features, k=s.pr_k, device=self.device)
        is_mean, is_std = fid.inception_score(emb.logits, s.is_split_size)
        score = record.InceptionScore(record.inception_score_name(net.spec.name, net.spec.metric), is_mean, is_std)
        uncertainty = None
        if s.bootstrap:
            uncertainty = bootstrap.against_reference(emb.features, r.mu, r.sigma, s.bootstrap, s.seed)
        info = r.info
        return record.GenerationMetrics(
            metric=net.spec.metric, value=distance, precision=precision, recall=recall,
            samples={"n": emb.n, "images_sha256": emb.images_sha256},
            reference={"path": str(self.dir), "stats_sha256": r.stats_sha256, "dataset": info["dataset"],
                       "split": info["split"], "n": info["n"], "images_sha256": info["images_sha256"],
                       "source": info["source"]["kind"],
                       "precision_recall_n": info["precision_recall_reference"]["n"]},
            protocol=_protocol(net, s, emb.n), inception_score=score, sfid=sfid, uncertainty=uncertainty,
            warnings=emb.pool.warnings + info.get("warnings", []))
