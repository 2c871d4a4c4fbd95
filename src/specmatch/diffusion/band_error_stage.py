"""`specmatch band-error`: the frequency bias of a trained diffusion model over its training
(claim C0; the quantities are defined in docs/band-error.md and `diffusion.band_error`).

Held-out data: `n_images` images of the dataset's held-out split, encoded by the run's
autoencoder and drawn from its posterior (z = mu + sigma * eps, seeded per image), times the
run's latent scale factor: the latents the diffusion model is trained on, of images it never saw.
Every EMA snapshot of the run (`train.snapshot_steps`) and its final weights are measured on the
same latents, noise and training-time draws, so the differences between points are the weights'.
A class-conditional network is measured with the null label (its unconditional prediction,
which label dropout trained).

The C0 summaries need the per-image sums of the measurements, which are not written: they are
computed here and written beside the measurements (`c0` in band_error.json): for every band the
step at which its loss-weighted error relative to the Gaussian optimum (rho_k) made half of its
change from the first point to the last (`t_half`), the medians of that step over the low+mid
and the high bands, and at the final weights rho_high - rho_low+mid with its bootstrap standard
error; `learned`: rho pooled over all bands at the first point minus at the last, with its
standard error (the same image halves on both sides).
"""

from __future__ import annotations

import json
import logging
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

log = logging.getLogger(__name__)

FILE = "band_error.json"
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
    groups = band_error.band_groups(results[-1].n_bins)
    low_mid, high = groups["low"] + groups["mid"], groups["high"]
    final = results[-1]
    diff, diff_se = band_error.pooled_ratio(final, low_mid, versus=high)
    rho_final = {g: band_error.pooled_ratio(final, ks)[0] for g, ks in groups.items()}
    out: dict[str, Any] = {"groups": groups, "rho_final": rho_final, "high_minus_low_mid": diff,
                           "high_minus_low_mid_se": diff_se, "t_half": None, "t_half_low_mid": None,
                           "t_half_high": None, "learned": None, "learned_se": None}
    if len(results) < 2:
        return out
    first = results[0]
    all_bands = list(range(final.n_bins))
    lw0, lw1 = first.loss_wiener[all_bands].sum(), final.loss_wiener[all_bands].sum()
    l0, l1 = first.per_image.loss, final.per_image.loss

    def drop(i: np.ndarray) -> float:  # rho over all bands, first point minus last, on the same images
        return float(l0[i].sum(1).mean() / lw0 - l1[i].sum(1).mean() / lw1)

    out["learned"] = drop(np.arange(len(l0)))
    out["learned_se"] = bootstrap.of_statistic(len(l0), drop, final.n_boot, seeding.step_seed(final.seed, 0, "c0")).std
    t_half = band_error.improvement_step(steps, np.stack([r.excess_ratio() for r in results]))
    valid = [k for k in range(final.n_bins) if final.loss_wiener[k] > 0]

    def median(ks: list[int]) -> float | None:
        v = t_half[[k for k in ks if k in valid]]
        v = v[np.isfinite(v)]
        return float(np.median(v)) if len(v) else None

    out.update(t_half=[None if not np.isfinite(v) else float(v) for v in t_half], t_half_low_mid=median(low_mid),
               t_half_high=median(high))
    return out


def run(model_dir: str | Path, ae_dir: str | Path, dataset: str | Path, p: dict[str, Any], name: str,
        out: str | Path) -> dict[str, Any]:
    p = params(p, name)
    model_dir, ae_dir, dataset, out = Path(model_dir), Path(ae_dir), Path(dataset), Path(out)
    summary = artifact.read_summary(model_dir)
    dev = resolve_device(p["device"])
    ae, ae_summary = ae_artifact.load(ae_dir, True, dev)
    want = summary["latents"]["autoencoder"]
    if ae_summary["name"] != want:
        raise SpecmatchError(f"{ae_dir}: autoencoder {ae_summary['name']!r}, but {model_dir} was trained on the "
                             f"latents of {want!r}")
    path = transport.from_params(summary["process"])
    x0 = _held_out(ae, dataset, p, float(summary["latents"]["scale_factor"]), dev)
    points = [(int(s), int(s)) for s in sorted((summary.get("snapshots") or {}).get("steps") or [])]
    if not points or points[-1][0] != int(summary["steps"]):
        points.append((int(summary["steps"]), None))
    results = []
    for step, snap in points:
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
              "points": [{"step": s, "source": "snapshot" if snap is not None else "final weights",
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
