"""Spectral statistics of image sets (docs/method.md §2, 3 and 8) and the `data-spectra` stage.

For every latent grid size of the grid, the images are brought to that grid exactly as ESM
does, and their spectrum distributions are summarised with both named settings: `training`
(centre = mean, remove DC; with the delta tilts that make the ESM targets) and `analysis`
(no centring, DC kept; the paper's spectrum-distribution plot). The PSD exponent is the
least-squares slope of log band energy against log(k + 1).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import config, spectral
from ..data.shards import iter_image_batches, read_manifest
from ..errors import SpecmatchError
from ..runtime import atomic
from ..runtime.atomic import atomic_dir
from ..runtime.jsonfile import read_json
from ..runtime.provenance import Provenance

log = logging.getLogger(__name__)

JSON_NAME = "spectra.json"
FIGURE_NAME = "spectrum_distribution.png"


@dataclass(frozen=True)
class MapSpectra:
    """Spectra of a dataset's images on one map size (full size, or resized to a latent grid)."""

    size: tuple[int, int]
    valid_bins: list[bool]
    training: dict[float, list[float]]  # delta -> mean spectrum distribution (centred, DC removed, tilted)
    analysis: list[float]  # mean spectrum distribution of the analysis setting (no centring, DC kept)
    band_energy: list[float]  # mean band energies E_k (training setting), the PSD exponent's input
    psd_exponent: float  # of the mean band energies
    psd_exponent_per_image_mean: float
    psd_exponent_per_image_std: float

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "MapSpectra":
        pe = d["psd_exponent"]
        return cls(size=(int(d["size"][0]), int(d["size"][1])), valid_bins=list(d["valid_bins"]),
                   training={float(k): list(v["mean"]) for k, v in d["training"]["distribution"].items()},
                   analysis=list(d["analysis"]["distribution"]["mean"]),
                   band_energy=list(d["training"]["band_energy"]["mean"]), psd_exponent=float(pe["of_mean_energy"]),
                   psd_exponent_per_image_mean=float(pe["per_image_mean"]),
                   psd_exponent_per_image_std=float(pe["per_image_std"]))


@dataclass(frozen=True)
class DataSpectra:
    """A `data-spectra` output, read back: the spectra at full size and on each latent grid."""

    dataset: str
    split: str
    n_images: int
    n_bins: int
    images_sha256: str
    full: MapSpectra
    grids: dict[int, MapSpectra]
    folder: Path | None = None

    @property
    def figure(self) -> Path | None:
        return None if self.folder is None else self.folder / FIGURE_NAME

    @classmethod
    def from_json(cls, d: dict[str, Any], folder: Path | None = None) -> "DataSpectra":
        return cls(dataset=d["dataset"], split=d["split"], n_images=int(d["n_images"]), n_bins=int(d["n_bins"]),
                   images_sha256=str(d.get("images_sha256", "")), full=MapSpectra.from_json(d["full_resolution"]),
                   grids={int(g): MapSpectra.from_json(v) for g, v in d["grids"].items()}, folder=folder)


def read(folder: str | Path) -> DataSpectra:
    """The record of a `data-spectra` output folder; an error names the file and the missing key."""
    folder = Path(folder)
    path = folder / JSON_NAME
    d = read_json(path, f"{path}: missing (expected a `specmatch data-spectra` output)")
    try:
        return DataSpectra.from_json(d, folder)
    except (KeyError, TypeError, ValueError) as e:
        raise SpecmatchError(f"{path}: not a `data-spectra` record ({type(e).__name__}: {e}; an output of an older "
                             "or another stage?)") from None


def delta_key(delta: float) -> str:
    return repr(float(delta))


class _Moments:
    """Running mean and std (float64) of per-image vectors."""

    def __init__(self):
        self.n, self.s1, self.s2 = 0, None, None

    def add(self, rows: torch.Tensor) -> None:
        r = rows.detach().double().cpu()
        s1, s2 = r.sum(0), (r * r).sum(0)
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += r.shape[0]

    def mean(self) -> torch.Tensor:
        return self.s1 / self.n

    def summary(self) -> dict[str, list[float]]:
        m = self.mean()
        var = (self.s2 / self.n - m * m).clamp_min(0)
        return {"mean": m.tolist(), "std": var.sqrt().tolist()}


class GridSpectra:
    """Accumulates the spectra of image batches at one grid size (None = full resolution)."""

    def __init__(self, grid: int | None, n_bins: int, deltas: list[float], blur: str, blur_kernel: int,
                 blur_sigma: float):
        self.grid, self.n_bins, self.deltas = grid, n_bins, [0.0] + [d for d in deltas if d != 0]
        self.blur, self.blur_kernel, self.blur_sigma = blur, blur_kernel, blur_sigma
        self.training = {d: _Moments() for d in self.deltas}
        self.analysis = _Moments()
        self.energy = _Moments()  # training-setting band energies, for the PSD exponent
        self.slopes: list[torch.Tensor] = []
        self.shape: tuple[int, int] | None = None

    def add(self, x: torch.Tensor) -> None:
        """x: images in [-1, 1], (B, 3, H, W)."""
        if self.grid is None:
            on_grid = x
            e = spectral.band_energies(x, self.n_bins, **spectral.TRAINING)
        else:
            size = (self.grid, self.grid)
            on_grid = spectral.image_to_latent_grid(x, size, self.blur, self.blur_kernel, self.blur_sigma)
            e = spectral.image_band_energies(x, size, self.n_bins, self.blur, self.blur_kernel, self.blur_sigma)
        self.shape = tuple(on_grid.shape[-2:])
        for d in self.deltas:
            self.training[d].add(spectral.distribution_from_energies(spectral.delta_tilt(e, d)))
        self.analysis.add(spectral.spectrum_distribution(on_grid, self.n_bins, **spectral.ANALYSIS))
        self.energy.add(e)
        self.slopes.append(spectral.psd_slope(e, self._valid()))

    def _valid(self) -> torch.Tensor:
        h, w = self.shape
        return spectral.bin_counts(h, w, self.n_bins) > 0

    def summary(self) -> dict[str, Any]:
        h, w = self.shape
        counts = spectral.bin_counts(h, w, self.n_bins)
        slopes = torch.cat(self.slopes)
        return {
            "size": [h, w],
            "bin_counts": counts.tolist(),
            "valid_bins": (counts > 0).tolist(),
            "training": {
                "setting": spectral.TRAINING,
                "distribution": {delta_key(d): m.summary() for d, m in self.training.items()},
                "band_energy": self.energy.summary(),
            },
            "analysis": {"setting": spectral.ANALYSIS, "distribution": self.analysis.summary()},
            "psd_exponent": {
                "of_mean_energy": float(spectral.psd_slope(self.energy.mean(), counts > 0)[0]),
                "per_image_mean": float(slopes.mean()),
                "per_image_std": float(slopes.std(unbiased=False)),
            },
        }


def image_batches(folder: Path, split: str, max_images: int, batch_size: int, seed: int):
    """Yield float images in [-1, 1] (B, 3, H, W) of a seeded subset of a prepared split."""
    for imgs in iter_image_batches(folder, split, batch_size, max_images, seed):
        batch = torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2)
        yield batch.float() / 127.5 - 1.0


def dataset_spectra(folder: Path, grids: list[int], p: dict[str, Any]) -> dict[str, Any]:
    man = read_manifest(folder)
    res = man["resolution"]
    bad = [g for g in grids if g > res]
    if bad:
        raise SpecmatchError(f"{folder}: latent grid sizes {bad} exceed the image resolution {res}")
    acc = {g: GridSpectra(g, p["n_bins"], p["deltas"], p["blur"], p["blur_kernel"], p["blur_sigma"]) for g in grids}
    acc[None] = GridSpectra(None, p["n_bins"], p["deltas"], p["blur"], p["blur_kernel"], p["blur_sigma"])
    n = 0
    with torch.no_grad():
        for x in image_batches(folder, p["split"], p["max_images"], p["batch_size"], p["seed"]):
            for a in acc.values():
                a.add(x)
            n += x.shape[0]
    return {
        "dataset": man["name"],
        "split": p["split"],
        "n_images": n,
        "resolution": res,
        "n_bins": p["n_bins"],
        "deltas": p["deltas"],
        "images_sha256": man["splits"][p["split"]]["images_sha256"],
        "full_resolution": acc[None].summary(),
        "grids": {str(g): acc[g].summary() for g in grids},
    }


def run(dataset_dir: str | Path, params: dict[str, Any], grids: list[int], name: str, out: str | Path) -> dict[str, Any]:
    """The `data-spectra` stage: spectra JSON + figure + provenance in the folder `out`."""
    from ..render.figures import spectrum_distribution_figure

    p = config.validate(params, ref="spectra", where="spectra", source="spectra parameters")
    if not grids:
        raise SpecmatchError("data-spectra: at least one latent grid size is needed (--grids)")
    folder = Path(dataset_dir)
    prov = Provenance("data-spectra", name, {**p, "latent_grids": list(grids)}, seeds={"seed": p["seed"]})
    prov.add_input(folder, "dataset")
    result = dataset_spectra(folder, list(grids), p)
    with atomic_dir(out) as tmp:
        atomic.write_text(tmp / JSON_NAME, json.dumps(result, indent=1) + "\n")
        spectrum_distribution_figure(result, tmp / FIGURE_NAME)
        prov.write(out, tmp)
    log.info("data-spectra %s: %d images, PSD exponent %.3f", name, result["n_images"],
             result["full_resolution"]["psd_exponent"]["of_mean_energy"])
    return result


def compare_to_real(x: torch.Tensor, real: DataSpectra, grid: int | None = None, delta: float = 1.0,
                    setting: str = "analysis") -> dict[str, Any]:
    """Spectral metrics of generated images (in [-1, 1]) or latents against a dataset's spectra
    (`real`, a `data-spectra` record), docs/method.md §2-3 and 8:
    - `kl_to_real`: KL(mean distribution of x || the real mean distribution), same setting
      (`analysis`: the paper's spectrum plot; `training`: centred, DC removed);
    - `kl_to_target`: KL(x || the delta-tilted image target of ESM), `training` setting; this
      is what ESM drives towards 0 for latents of grid size `grid`;
    - `psd_exponent`: slope of the mean band energy (training setting) against log(k + 1).
    `grid` selects the real spectra at that latent grid size (None = full resolution)."""
    summary = real.full if grid is None else real.grids.get(int(grid))
    if summary is None:
        raise SpecmatchError(f"spectra of {real.dataset} have no grid {grid} (have {sorted(real.grids)})")
    if tuple(x.shape[-2:]) != tuple(summary.size):
        raise SpecmatchError(f"maps of size {tuple(x.shape[-2:])} do not match the real spectra's {summary.size}")
    if setting not in ("analysis", "training"):
        raise SpecmatchError(f"setting must be 'analysis' or 'training', got {setting!r}")
    if float(delta) not in summary.training:
        raise SpecmatchError(f"spectra of {real.dataset} have no delta {delta} target (have "
                             f"{sorted(summary.training)})")
    n_bins = real.n_bins
    h, w = summary.size
    valid = spectral.bin_counts(h, w, n_bins) > 0
    with torch.no_grad():
        ours = spectral.spectrum_distribution(x, n_bins, **getattr(spectral, setting.upper())).double().mean(0)
        e = spectral.band_energies(x, n_bins, **spectral.TRAINING).double()
        ours_train = spectral.distribution_from_energies(e).mean(0)
    real_dist = torch.tensor(summary.analysis if setting == "analysis" else summary.training[0.0], dtype=torch.float64)
    target = torch.tensor(summary.training[float(delta)], dtype=torch.float64)
    return {
        "setting": setting,
        "size": [h, w],
        "distribution": ours.tolist(),
        "kl_to_real": float(spectral.kl_divergence(ours, real_dist, valid)),
        "delta": delta,
        "kl_to_target": float(spectral.kl_divergence(ours_train, target, valid)),
        "psd_exponent": float(spectral.psd_slope(e.mean(0), valid)[0]),
        "real_psd_exponent": summary.psd_exponent,
    }
