"""`specmatch target-spectra`: spectral diagnostics of alignment targets (docs/method.md §7; the paper's
DINOv2 curve).

For each target cache (one encoder each) and each target kind (repa = raw, irepa, dog), over
the first `max_images` entries (originals, no mirror images):
- the directional spectral energy RMSC^2 = mean_t ||u_t - mean(u)||^2 of the unit-length tokens
  (equal, by Parseval, to the non-DC DCT energy of the direction field per token);
- the spectrum distribution p_k of the target field (docs/method.md §2 analysis setting: no centring, DC
  kept, `n_bins` radial bins; empty bins on small grids are left out of the table and plot);
- the PSD exponent (slope of log E_k against log(k + 1)) of the mean band energies.
Writes target_spectra.csv / .md (one row per encoder and kind, with the protocol),
distributions.csv (one row per bin) and target_spectra.png, with a provenance record.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .. import config as config_mod
from .. import spectral
from ..errors import SpecmatchError
from ..runtime import atomic
from ..render.tables import write_table
from ..runtime.provenance import Provenance
from . import objectives
from .targets import TargetReader

log = logging.getLogger(__name__)

KINDS = ("repa", "irepa", "dog")
TABLE = "target_spectra"  # .csv and .md
FIGURE = "target_spectra.png"
COLUMNS = ("encoder", "kind", "RMSC2", "RMSC2_std", "psd_exponent", "grid", "dim", "image_size", "n_images", "n_bins",
           "dog_sigmas", "irepa_gamma", "weights_sha256", "targets")


def read(folder: str | Path) -> pd.DataFrame:
    """The table of a `target-spectra` output folder (one row per encoder and kind, the columns of
    COLUMNS); an error names the file and what is missing."""
    folder = Path(folder)
    csv = folder / f"{TABLE}.csv"
    for f in (csv, folder / FIGURE):
        if not f.is_file():
            raise SpecmatchError(f"{f}: missing (expected a `specmatch target-spectra` output)")
    df = pd.read_csv(csv)
    missing = [c for c in COLUMNS if c not in df]
    if missing:
        raise SpecmatchError(f"{csv}: no columns {missing} (an output of an older or another stage?)")
    return df


def cache_spectra(reader: TargetReader, p: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{kind: {rmsc2_mean, rmsc2_std, energies (n_bins,), distribution (n_bins,), valid, slope, n}}."""
    man = reader.manifest
    n = min(int(man["images"]), int(p["max_images"]))
    g = int(man["shape"][1])
    acc: dict[str, dict[str, Any]] = {k: {"rmsc2": [], "energy": torch.zeros(p["n_bins"], dtype=torch.float64)}
                                      for k in KINDS}
    for lo in range(0, n, p["batch_size"]):
        raw = reader.targets(np.arange(lo, min(n, lo + p["batch_size"])))
        for k in KINDS:
            y = objectives.transform(raw, k, p)
            s = objectives.target_spectrum(y, p["n_bins"])
            acc[k]["rmsc2"].append(s["rmsc2"].double())
            acc[k]["energy"] += s["energies"].double().sum(0)
    valid = spectral.bin_counts(g, g, p["n_bins"]) > 0
    out = {}
    for k in KINDS:
        r = torch.cat(acc[k]["rmsc2"])
        e = acc[k]["energy"] / n
        dist = spectral.distribution_from_energies(e)
        ok = valid & (e > 0)
        slope = float(spectral.psd_slope(e, valid)) if int(ok.sum()) >= 2 else float("nan")
        out[k] = {"rmsc2_mean": float(r.mean()), "rmsc2_std": float(r.std(unbiased=False)), "energies": e.tolist(),
                  "distribution": dist.tolist(), "valid": valid.tolist(), "psd_exponent": slope, "n": n}
    return out


def run(target_dirs: list[str | Path], params: dict[str, Any], name: str, out: str | Path) -> pd.DataFrame:
    p = config_mod.validate(params, "target_spectra", where="target_spectra", source=f"parameters of {name}")
    if not target_dirs:
        raise SpecmatchError("target-spectra: no target caches given (--targets)")
    rows, bins, curves = [], [], {}
    prov = Provenance("target-spectra", name, p)
    for d in target_dirs:
        reader = TargetReader(d)
        man = reader.manifest
        prov.add_input(Path(d), "targets")
        res = cache_spectra(reader, p)
        for k, r in res.items():
            rows.append({"encoder": man["encoder"], "kind": k, "RMSC2": r["rmsc2_mean"], "RMSC2_std": r["rmsc2_std"],
                         "psd_exponent": r["psd_exponent"], "grid": f"{man['shape'][1]}x{man['shape'][2]}",
                         "dim": man["shape"][0], "image_size": man["image_size"], "n_images": r["n"],
                         "n_bins": p["n_bins"], "dog_sigmas": f"{p['dog']['sigma1']:g}/{p['dog']['sigma2']:g}",
                         "irepa_gamma": p["irepa_gamma"], "weights_sha256": man["weights_sha256"][:16],
                         "targets": man["name"]})
            for b, (pk, ek, ok) in enumerate(zip(r["distribution"], r["energies"], r["valid"])):
                if ok:
                    bins.append({"encoder": man["encoder"], "kind": k, "bin": b, "p": pk, "energy": ek})
            curves[(man["encoder"], k)] = [(b, pk) for b, (pk, ok) in enumerate(zip(r["distribution"], r["valid"]))
                                           if ok]
    df = pd.DataFrame(rows)
    with atomic.atomic_dir(out) as tmp:
        write_table(df[list(COLUMNS)], tmp, TABLE, "Spectral diagnostics of the alignment targets",
                    "RMSC2: directional spectral energy of the unit-length target tokens (docs/method.md §7), mean over images "
                    "(0 = every token points the same way; at most 1). psd_exponent: slope of log band energy "
                    f"against log(k + 1) of the target field (docs/method.md §2, DC kept, {p['n_bins']} bins, empty bins "
                    "excluded).")
        pd.DataFrame(bins).to_csv(tmp / "distributions.csv", index=False, float_format="%.6g")
        _figure(curves, df, tmp / FIGURE)
        prov.write(out, tmp)
    log.info("target-spectra %s: %d encoders x %d kinds", name, len(target_dirs), len(KINDS))
    return df


def _figure(curves, df: pd.DataFrame, path: Path) -> None:
    from ..render.figures import plt, save_figure

    encs = list(dict.fromkeys(e for e, _ in curves))
    fig, axes = plt.subplots(1, len(encs), figsize=(4.4 * len(encs), 3.6), squeeze=False)
    styles = {"repa": dict(color="black", lw=2), "irepa": dict(color="tab:blue", ls="--"),
              "dog": dict(color="tab:red", ls="-.")}
    for ax, enc in zip(axes[0], encs):
        for k in KINDS:
            pts = curves[(enc, k)]
            r = df[(df.encoder == enc) & (df.kind == k)].iloc[0]
            ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", ms=3,
                    label=f"{k} (RMSC2 {r.RMSC2:.3f})", **styles[k])
        ax.set_title(f"{enc} targets, {df[df.encoder == enc].iloc[0].grid} grid", fontsize=10)
        ax.set_xlabel("frequency band k")
        ax.set_ylabel("spectrum distribution p_k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Spectrum distribution of the alignment targets (DC kept)")
    fig.tight_layout()
    save_figure(fig, path)
