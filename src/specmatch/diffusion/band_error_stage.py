"""`specmatch band-error`: the frequency bias of a trained diffusion model over its training
(claim C0; the quantities are defined in docs/band-error.md and `diffusion.band_error`).

Held-out data: `n_images` images of the dataset's held-out split, encoded by the run's
autoencoder and drawn from its posterior (z = mu + sigma * eps, seeded per image), times the
run's latent scale factor: the latents the diffusion model is trained on, of images it never saw.
Every EMA snapshot of the run (`train.snapshot_steps`) and its final weights are measured on the
same latents, noise and training-time draws, so the differences between points are the weights'.
A class-conditional network is measured with the null label (its unconditional prediction,
which label dropout trained).

The points are the network at initialisation (built afresh from the run's architecture, seeded
by `seed`), every EMA snapshot and the final weights. The C0 summaries need the per-image sums
of the measurements, which are not written: they are computed here and written beside the
measurements (`c0` in band_error.json), with rho_G the loss-weighted error relative to the
Gaussian optimum pooled over a group G of bands:
- `high_minus_low_mid`: rho_high - rho_low+mid at the final weights;
- `early_fraction`: for low+mid and high, the share of the log-improvement of rho_G from
  initialisation to the final weights made by the first snapshot (`early_step`),
  (log rho_G(0) - log rho_G(s1)) / (log rho_G(0) - log rho_G(final)), and `early_fraction_diff`
  low+mid minus high (read at a snapshot, not interpolated; log: the scale of an untrained
  network's error differs by band, the fraction of the way in log does not);
- `learned`: rho over all bands at the first snapshot (initialisation without one) minus at the
  final weights;
- `t_half`: per band, the step at which rho_k made half of its change (linear between points;
  for the figures).
Each difference has its bootstrap standard error (`*_se`), the same image halves redrawn for
every point of the run.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..autoencoder import artifact as ae_artifact
from ..autoencoder.model import to_float
from ..data.shards import iter_image_batches
from ..errors import SpecmatchError
from ..metrics import bootstrap
from ..runtime import atomic, seeding
from ..runtime.distributed import resolve_device
from ..runtime.jsonfile import read_json
from ..runtime.provenance import Provenance
from . import artifact, band_error, transport
from .sample import check_autoencoder

log = logging.getLogger(__name__)

FILE = "band_error.json"
SOURCES = {"initialisation": "initialisation", None: "final weights"}  # any other point: a snapshot
DEFAULTS = {"n_images": 256, "t": [0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.98], "n_bins": 16,
            "seed": 0, "batch_size": 64, "n_boot": 50, "loss_draws": 4, "split": "test", "device": "auto"}


def params(p: dict[str, Any], name: str) -> dict[str, Any]:
    """`--params`: any of DEFAULTS' keys (the rest take their defaults); an unknown key or a value
    of the wrong kind is refused, naming it."""
    unknown = sorted(set(p) - set(DEFAULTS))
    if unknown:
        raise SpecmatchError(f"parameters of {name}: unknown key(s) {unknown}; known: {sorted(DEFAULTS)}")
    q = {**DEFAULTS, **p}
    for key in ("n_images", "n_bins", "batch_size", "loss_draws"):
        v = q[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SpecmatchError(f"parameters of {name}: {key} must be a positive integer, got {v!r}")
    if q["n_images"] < 6:
        raise SpecmatchError(f"parameters of {name}: n_images must be >= 6 (a bootstrap over images), got "
                             f"{q['n_images']}")
    if not isinstance(q["t"], list) or len(q["t"]) < 2:
        raise SpecmatchError(f"parameters of {name}: t must be a list of at least 2 noise levels in (0, 1), got "
                             f"{q['t']!r}")
    return q


@dataclass(frozen=True)
class Point:
    step: int
    source: str  # "snapshot" or "final weights"
    result: band_error.BandError


def read(folder: str | Path) -> tuple[dict[str, Any], list[Point]]:
    """(the record without its points, the points in step order) of a `band-error` output."""
    path = Path(folder) / FILE
    d = read_json(path, f"{path}: missing (expected a `specmatch band-error` output)")
    for key in ("diffusion", "autoencoder", "points", "c0"):
        if key not in d:
            raise SpecmatchError(f"{path}: no key {key!r} (an output of an older or another stage?)")
    points = [Point(int(p["step"]), str(p["source"]), band_error.BandError.from_json(p["result"])) for p in d["points"]]
    return {k: v for k, v in d.items() if k != "points"}, points


def _held_out(ae, dataset: Path, p: dict[str, Any], scale: float, dev) -> torch.Tensor:
    """The scaled posterior samples of the first `n_images` held-out images (seeded subset)."""
    out = []
    with torch.no_grad():
        for images in iter_image_batches(dataset, p["split"], p["batch_size"], p["n_images"], p["seed"]):
            post = ae.encode(to_float(images, dev))
            gen = torch.Generator(device=dev).manual_seed(seeding.step_seed(p["seed"], len(out), "band-error-posterior"))
            out.append((post.sample(gen).float() * scale).cpu())
    x0 = torch.cat(out)
    if len(x0) < p["n_images"]:
        raise SpecmatchError(f"{dataset}: split {p['split']!r} has {len(x0)} images, fewer than n_images "
                             f"{p['n_images']}")
    return x0


def _c0(steps: list[int], results: list[band_error.BandError]) -> dict[str, Any]:
    """The C0 summaries of a run measured at initialisation (results[0]), its snapshots and its
    final weights (module docstring; docs/band-error.md)."""
    groups = band_error.band_groups(results[-1].n_bins)
    final = results[-1]
    valid = [k for k in range(final.n_bins) if final.loss_wiener[k] > 0]
    low_mid = [k for k in groups["low"] + groups["mid"] if k in valid]
    high = [k for k in groups["high"] if k in valid]
    diff, diff_se = band_error.pooled_ratio(final, low_mid, versus=high)
    out: dict[str, Any] = {"groups": groups, "rho_final": {g: band_error.pooled_ratio(final, ks)[0]
                                                           for g, ks in groups.items()},
                           "high_minus_low_mid": diff, "high_minus_low_mid_se": diff_se,
                           "t_half": None, "early_step": None, "early_fraction": None,
                           "early_fraction_diff": None, "early_fraction_diff_se": None,
                           "learned": None, "learned_se": None}
    losses = np.stack([r.per_image.loss for r in results])  # (S, N, K): per image, its draws' mean
    lw = np.stack([r.loss_wiener for r in results])  # (S, K)
    n, n_boot = losses.shape[1], final.n_boot

    def rho(i: np.ndarray, s: int, ks: list[int]) -> float:
        return float(losses[s][i][:, ks].sum(1).mean() / lw[s][ks].sum())

    def se(stat, stream: int) -> float:
        return bootstrap.of_statistic(n, stat, n_boot, seeding.step_seed(final.seed, stream, "c0")).std

    # Learned at this length: rho over all bands, first snapshot after initialisation (or the
    # initialisation itself when there is none) minus the final weights.
    first = 1 if len(results) > 2 else 0

    def drop(i: np.ndarray) -> float:
        return rho(i, first, valid) - rho(i, -1, valid)

    everyone = np.arange(n)
    out.update(learned=drop(everyone), learned_se=se(drop, 0),
               t_half=[None if not np.isfinite(v) else float(v) for v in band_error.improvement_step(
                   steps, np.stack([r.excess_ratio() for r in results]))])
    if len(results) < 3:
        return out

    def fraction(i: np.ndarray, ks: list[int]) -> float:
        """The share of the log-improvement of rho (initialisation -> final) made by the first snapshot."""
        r0, r1, rS = (math.log(rho(i, s, ks)) for s in (0, 1, -1))
        return (r0 - r1) / (r0 - rS) if r0 != rS else math.nan

    def lead(i: np.ndarray) -> float:
        return fraction(i, low_mid) - fraction(i, high)

    out.update(early_step=int(steps[1]), early_fraction={"low_mid": fraction(everyone, low_mid),
                                                         "high": fraction(everyone, high)},
               early_fraction_diff=lead(everyone), early_fraction_diff_se=se(lead, 1))
    return out


def run(model_dir: str | Path, ae_dir: str | Path, dataset: str | Path, p: dict[str, Any], name: str,
        out: str | Path) -> dict[str, Any]:
    p = params(p, name)
    model_dir, ae_dir, dataset, out = Path(model_dir), Path(ae_dir), Path(dataset), Path(out)
    summary = artifact.read_summary(model_dir)
    dev = resolve_device(p["device"])
    ae, ae_summary = ae_artifact.load(ae_dir, True, dev)
    check_autoencoder(model_dir, summary, ae_dir, ae_summary)
    want = summary["latents"]["autoencoder"]
    path = transport.from_params(summary["process"])
    x0 = _held_out(ae, dataset, p, float(summary["latents"]["scale_factor"]), dev)
    # Initialisation (the network built afresh, seeded), every snapshot, the final weights.
    points: list[tuple[int, int | None | str]] = [(0, "initialisation")]
    points += [(int(s), int(s)) for s in sorted((summary.get("snapshots") or {}).get("steps") or []) if int(s) > 0]
    if points[-1][0] != int(summary["steps"]):
        points.append((int(summary["steps"]), None))
    results = []
    for step, snap in points:
        if snap == "initialisation":
            torch.manual_seed(p["seed"])
            net = artifact.build_network(summary).to(dev).eval()
        else:
            net, _ = artifact.load(model_dir, True, dev, snapshot=snap)
        results.append(band_error.measure(lambda x, t, net=net: net(x, t, None), path, x0, p["t"], p["n_bins"],
                                          p["seed"], batch_size=p["batch_size"], n_boot=p["n_boot"],
                                          loss_draws=p["loss_draws"], device=dev, label=f"step {step}"))
        log.info("band-error %s: step %d: rho per band %s", name, step, np.round(results[-1].excess_ratio(), 3).tolist())
    c0 = _c0([s for s, _ in points], results)
    record = {"name": name, "diffusion": summary["name"], "autoencoder": want, "trained_steps": int(summary["steps"]),
              "data": {"dataset": str(dataset), "split": p["split"], "n_images": len(x0),
                       "latents": "posterior samples z = mu + sigma * eps (one per image) times the scale factor "
                                  f"{summary['latents']['scale_factor']:.6g}"},
              "c0": c0,
              "points": [{"step": s, "source": SOURCES.get(snap, "snapshot"),
                          "result": r.to_json()} for (s, snap), r in zip(points, results)]}
    prov = Provenance("band-error", name, p, seeds={"band_error": p["seed"]})
    prov.add_input(model_dir, "diffusion model")
    prov.add_input(ae_dir, "autoencoder")
    prov.add_input(dataset, "dataset")
    with atomic.atomic_dir(out) as tmp:
        atomic.write_text(tmp / FILE, json.dumps(record, indent=1) + "\n")
        prov.write(out, tmp)
    log.info("band-error %s: rho_high - rho_low+mid = %.4g +- %.2g at the final weights", name,
             c0["high_minus_low_mid"], c0["high_minus_low_mid_se"])
    return record
