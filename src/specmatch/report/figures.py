"""The report's figures, by page section: spectrum distributions of images vs latents (E4), the
data and target spectra their stages drew, reconstructions, sample grids, and the metric over
training. Plotting itself is `render.figures`'s (deterministic PNGs); here is which figure shows
which inputs. Each section is a list of (file name under figures/, label)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..alignment import diagnostics as target_diagnostics
from ..autoencoder.evaluate import AEEvaluation
from ..errors import SpecmatchError
from ..render import figures as plots
from .experiments import Progress
from .inputs import Inputs

SECTIONS = ("spectra", "data", "targets", "recon", "samples", "progress")


def _spectra_figures(runs, inputs: Inputs, figs: Path) -> list[tuple[str, str]]:
    """Per (dataset, latent grid): the image's spectrum distribution and ESM target against the
    latents of every E4 autoencoder on that grid."""
    groups: dict[tuple[str, int], list[AEEvaluation]] = {}
    for a in runs["autoencoders"]:
        m = inputs.ae_eval[a]
        groups.setdefault((m.dataset, m.latent_spectrum.grid[0]), []).append(m)
    out = []
    for (ds, g), ms in sorted(groups.items()):
        ls0 = ms[0].latent_spectrum
        sp = inputs.spectra.get(ds)
        grid = sp.grids.get(g) if sp is not None else None
        if grid is not None and len(grid.valid_bins) == len(ls0.valid_bins):
            image = {"valid": grid.valid_bins, "untilted": grid.training[0.0], "delta": ls0.delta,
                     "target": grid.training.get(ls0.delta, ls0.target_distribution)}
            source = f"images: {ds}/{sp.split}, n={sp.n_images}"
        else:
            image = {"valid": ls0.valid_bins, "untilted": ls0.target_distribution, "target": None, "delta": ls0.delta}
            source = f"image target of the held-out split (delta {ls0.delta:g})"
        latents = [{"label": f"{m.name} ({m.variant}), KL {m.latent_spectrum.kl_target_to_latent:.3f}",
                    "distribution": m.latent_spectrum.latent_distribution} for m in ms]
        name = f"spectra_{ds}_{g}x{g}.png"
        plots.latents_vs_image_figure(image, latents, figs / name,
                                      f"{ds}, {g}x{g} latent grid: spectrum distributions (centred, DC removed)\n"
                                      f"{source}; latents of the held-out split")
        out.append((name, f"{ds}, {g}x{g} grid: images vs latents"))
    return out


def _reconstruction_figures(p, names: list[str], inputs: Inputs, figs: Path) -> list[tuple[str, str]]:
    """Per dataset: the first held-out images above each autoencoder's reconstructions."""
    by_ds: dict[str, list[AEEvaluation]] = {}
    for a in names:
        by_ds.setdefault(inputs.ae_eval[a].dataset, []).append(inputs.ae_eval[a])
    out = []
    for ds, ms in sorted(by_ds.items()):
        arrays = []
        for m in ms:
            f = m.reconstructions
            if not f.is_file():
                raise SpecmatchError(f"{f}: missing (eval-ae writes it when autoencoder.eval.n_reconstructions > 0)")
            with np.load(f, allow_pickle=False) as z:
                arrays.append((m, z["originals"], z["reconstructions"]))
        n = min([p["reconstructions"]] + [len(o) for _, o, _ in arrays])
        if all(np.array_equal(o[:n], arrays[0][1][:n]) for _, o, _ in arrays):
            rows = [("held-out originals", arrays[0][1][:n])] + [(f"{m.name}\n({m.variant})", r[:n])
                                                                 for m, _, r in arrays]
        else:  # evaluated on other images: each autoencoder's own originals above its reconstructions
            rows = [row for m, o, r in arrays for row in ((f"{m.name}\noriginals", o[:n]),
                                                         (f"{m.name}\n({m.variant})", r[:n]))]
        name = f"reconstructions_{ds}.png"
        plots.image_rows_figure(rows, figs / name, f"{ds}: held-out images and their reconstructions "
                                                   "(posterior mean)")
        out.append((name, f"{ds}: reconstructions"))
    return out


def _copy(src: Path, figs: Path, name: str) -> str:
    shutil.copyfile(src, figs / name)
    return name


def render(p: dict[str, Any], runs: dict[str, dict[str, list[str]]], inputs: Inputs, progress: Progress,
           figs_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """Every figure of the report in `figs_dir`, by section (`SECTIONS`)."""
    figs: dict[str, list[tuple[str, str]]] = {k: [] for k in SECTIONS}
    figs["spectra"] = _spectra_figures(runs["E4"], inputs, figs_dir)
    for ds in runs["E4"]["datasets"]:
        src = inputs.spectra[ds].figure
        if src is not None and src.is_file():
            figs["data"].append((_copy(src, figs_dir, f"data_spectra_{ds}.png"), f"{ds}: data spectra"))
    if inputs.target_spectra is not None and (runs["E3"]["diffusions"] or runs["E3b"]["diffusions"]):
        src = inputs.folders["target_spectra"]["target-spectra"] / target_diagnostics.FIGURE
        figs["targets"].append((_copy(src, figs_dir, "target_spectra.png"), "alignment target spectra"))
    ae_names = list(dict.fromkeys(runs["E1"]["autoencoders"] + runs["E2"]["autoencoders"]
                                  + runs["E4"]["autoencoders"]))
    figs["recon"] = _reconstruction_figures(p, ae_names, inputs, figs_dir)
    for sname, folder in inputs.samples.items():
        figs["samples"].append((_copy(folder / "grid.png", figs_dir, f"samples_{sname}.png"), sname))
    if len(progress.points):
        plots.progress_figure(progress.points, progress.finals if len(progress.finals) else pd.DataFrame(
            columns=["diffusion", "metric", "step", "value", "label"]), figs_dir / "fid_over_training.png")
        figs["progress"].append(("fid_over_training.png", "metric over training"))
    return figs
