"""`specmatch report paper`: the paper's tables and figures (docs/method.md §9, experiments E1-E4) from the
DAG's stage outputs, and one report page linking them.

Inputs are stage output folders given explicitly (data spectra, autoencoder evaluations,
trained diffusion models, generation metrics, samples, target spectra, metric over training);
the `report` parameters say which runs form each experiment. Every table is written as CSV and
Markdown (`tables.write_table`) with the protocol beside every number: a distance sits in a
column named by its metric (FID, rFD-EffNetLite0-128, ...), and one table never mixes metrics.
Figures are deterministic PNGs (`figures.save_figure`). The output folder is replaced
atomically and carries a provenance record listing every input, so `specmatch audit` walks from
any table or figure back to the raw data.

    report/index.md          the page: what each experiment is, its protocol, links
    report/tables/           e1, e2, e3, e4_data, e4_latents, fid_over_training (.csv, .md)
    report/figures/          spectra, reconstructions, samples, metric over training
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import config as config_mod
from ..alignment import diagnostics as target_diagnostics
from ..autoencoder import evaluate as ae_evaluate
from ..autoencoder.evaluate import AEEvaluation
from ..diffusion import artifact as diffusion_artifact
from ..diffusion import progress as diffusion_progress
from ..diffusion import sampling_record
from ..errors import SpecmatchError
from ..metrics import record
from ..metrics import spectra as data_spectra
from ..metrics.spectra import DataSpectra
from ..render import figures
from ..render.tables import markdown, write_table
from ..runtime import atomic
from ..runtime.jsonfile import get_key
from ..runtime.provenance import Provenance
from . import claims as claims_mod
from . import published
from .tables import align_order, generation_row

log = logging.getLogger(__name__)

INDEX = "index.md"
EXPERIMENTS = {
    "E1": ("Autoencoders and diffusability (U-ViT)",
           "docs/method.md §9, E1: SD-VAE, ESM-AE and DSM-AE (f8d4 and f16d16 at paper scale) on CelebA-HQ 256, each with an "
           "unconditional U-ViT trained on its latents: reconstruction (rFID, PSNR, SSIM on the held-out split) and "
           "generation (gFID-10k) per autoencoder."),
    "E2": ("Autoencoders and diffusability (SiT)",
           "docs/method.md §9, E2: SD-VAE, DSM-AE and ESM-AE (f16d16) on ImageNet 256, each with a class-conditional SiT: "
           "reconstruction and generation (gFID-50k, without and with guidance) per autoencoder."),
    "E3": ("Representation alignment: none vs REPA vs iREPA vs DoG-REPA",
           "docs/method.md §9, E3: the same SiT on the best latents, trained without alignment and with REPA, iREPA and "
           "DoG-REPA at equal steps; each aligned row carries the directional spectral energy (RMSC^2) and PSD "
           "exponent of its target (`target-spectra`)."),
    # E3b: the same comparison on our own latents (the extension of E3; docs/reference-fidelity.md).
    "E3b": ("Representation alignment on our latents (the extension)",
            "E3b: the alignment comparison of E3 on our DSM-AE f16d16 latents (SiT-B/1): an extension of the paper's "
            "E3, whose rows cannot be set beside the published numbers (other latents, another network)."),
    "E4": ("Spectral diagnostics",
           "docs/method.md §9, E4: PSD exponents of the images (full size and on each latent grid) and of each autoencoder's "
           "latents, the KL divergence of the latent spectrum distribution to the image's delta-tilted target "
           "(ESM's objective), and the low-pass reconstruction distance per k (DSM's diagnostic: LP_k(x) against "
           "Dec(LP_k(z)); k = 0 is the plain reconstruction distance)."),
}


# --------------------------------------------------------------------------- inputs


def _get(d: dict[str, Any], keys: str, path: Path) -> Any:
    return get_key(d, keys, path)


def _unique(kind: str, items: list[tuple[str, Path]]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for name, folder in items:
        if name in out:
            raise SpecmatchError(f"two {kind} folders hold {name!r}: {out[name]} and {folder}")
        out[name] = folder
    return out


@dataclass
class Inputs:
    """The stage outputs the report reads, keyed by the run (or dataset) name recorded in them,
    each read through the module that writes it."""

    spectra: dict[str, DataSpectra] = field(default_factory=dict)
    ae_eval: dict[str, AEEvaluation] = field(default_factory=dict)
    diffusion: dict[str, dict[str, Any]] = field(default_factory=dict)
    generation: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    samples: dict[str, Path] = field(default_factory=dict)
    target_spectra: pd.DataFrame | None = None
    progress: dict[str, pd.DataFrame] = field(default_factory=dict)
    floors: list[record.GenerationMetrics] = field(default_factory=list)
    folders: dict[str, dict[str, Path]] = field(default_factory=dict)

    @classmethod
    def load(cls, spectra=(), ae_eval=(), diffusion=(), gen_metrics=(), samples=(), target_spectra=None,
             progress=(), floors=()) -> "Inputs":
        self = cls()
        named = []
        for d in map(Path, spectra):
            sp = data_spectra.read(d)
            named.append((sp.dataset, d))
            self.spectra[sp.dataset] = sp
        self.folders["spectra"] = _unique("--spectra", named)
        named = []
        for d in map(Path, ae_eval):
            m = ae_evaluate.read(d)
            named.append((m.name, d))
            self.ae_eval[m.name] = m
        self.folders["ae_eval"] = _unique("--ae-eval", named)
        named = []
        for d in map(Path, diffusion):
            s = diffusion_artifact.read_summary(d)
            for key in ("name", "model", "steps", "latents.autoencoder", "alignment.kind"):
                _get(s, key, d / diffusion_artifact.SUMMARY)
            # The alignment as it was trained: encoder, grids, projector and filter settings.
            if s["alignment"]["kind"] == "dog":
                _get(s, "alignment.dog.sigma2", d / diffusion_artifact.SUMMARY)
            if s["alignment"]["kind"] == "irepa":
                _get(s, "alignment.irepa_gamma", d / diffusion_artifact.SUMMARY)
            named.append((s["name"], d))
            self.diffusion[s["name"]] = {**s, "_folder": d}
        self.folders["diffusion"] = _unique("--diffusion", named)
        named = []
        for d in map(Path, gen_metrics):
            row = generation_row(d)
            row["_folder"] = d
            named.append((row["samples"], d))
            self.generation.setdefault(row["diffusion"], []).append(row)
        self.folders["gen_metrics"] = _unique("--gen-metrics", named)
        named = []
        for d in map(Path, samples):
            proto = sampling_record.read(d)
            if proto is None:
                raise SpecmatchError(f"{d / sampling_record.FILE}: missing (expected a `specmatch sample` output)")
            if not (d / "grid.png").is_file():
                raise SpecmatchError(f"{d / 'grid.png'}: missing (expected a `specmatch sample` output)")
            named.append((proto.name, d))
        self.samples = self.folders["samples"] = _unique("--samples", named)
        if target_spectra is not None:
            self.target_spectra = target_diagnostics.read(target_spectra)
            self.folders["target_spectra"] = {"target-spectra": Path(target_spectra)}
        named = []
        for d in map(Path, progress):
            name, df = diffusion_progress.read(d)
            named.append((name, d))
            self.progress[name] = df
        self.folders["progress"] = _unique("--progress", named)
        named = []
        for d in map(Path, floors):
            m = record.read(d)
            if m.sampling is not None:
                raise SpecmatchError(f"{d}: --floors takes scores of real images, these are of samples ({m.name})")
            named.append((m.name, d))
            self.floors.append(m)
        self.folders["floors"] = _unique("--floors", named)
        attach_baselines(self.generation, self.floors)
        return self

    def add_to(self, prov: Provenance) -> None:
        roles = {"spectra": "data spectra", "ae_eval": "autoencoder evaluation", "diffusion": "diffusion model",
                 "gen_metrics": "generation metrics", "samples": "samples", "target_spectra": "target spectra",
                 "progress": "metric over training", "floors": "real floor"}
        for kind, folders in self.folders.items():
            for folder in folders.values():
                prov.add_input(folder, roles[kind])


# The keys under which a generation number and its untrained network's are comparable.
_SAME_PROTOCOL = ("autoencoder", "model", "process", "sampler", "steps", "cfg_scale", "cfg_interval", "n_samples",
                  "metric", "protocol")


def attach_baselines(generation: dict[str, list[dict[str, Any]]], floors: list[record.GenerationMetrics]) -> None:
    """Give each trained run's generation row what learning is measured between: the value (and
    bootstrap error) of the same network untrained under the same protocol (a `-untrained` run of
    report.baselines.untrained, trained_steps 0) as `untrained`, `untrained_std`; the real floor
    (held-out real images of the same dataset, count, metric and protocol; report.baselines.
    real_floor) as `real_floor`; and the share of the gap between them closed, `gap_closed` =
    (untrained - value) / (untrained - real_floor). None where a baseline is missing."""
    untrained = [r for rows in generation.values() for r in rows if int(r["trained_steps"]) == 0]
    for rows in generation.values():
        for r in rows:
            hit = [u for u in untrained if int(r["trained_steps"]) > 0 and all(u[k] == r[k] for k in _SAME_PROTOCOL)]
            floor = [f.value for f in floors if (f.reference["dataset"], int(f.samples["n"]), f.metric,
                                                 f.protocol_name) == (r["dataset"], int(r["n_samples"]), r["metric"],
                                                                     r["protocol"])]
            r["untrained"] = hit[0]["value"] if hit else None
            r["untrained_std"] = hit[0]["value_std"] if hit else None
            r["real_floor"] = floor[0] if floor else None
            ok = hit and floor and hit[0]["value"] != floor[0]
            r["gap_closed"] = (hit[0]["value"] - r["value"]) / (hit[0]["value"] - floor[0]) if ok else None


# --------------------------------------------------------------------------- experiments


def experiments(p: dict[str, Any], inputs: Inputs) -> dict[str, dict[str, list[str]]]:
    """The runs of each experiment (a null list: every one given, e.g. E4's autoencoders), each
    checked against the inputs: a run the parameters name but no input holds is an error."""
    given = {"autoencoders": (inputs.ae_eval, "--ae-eval"), "diffusions": (inputs.diffusion, "--diffusion"),
             "datasets": (inputs.spectra, "--spectra")}
    out = {}
    for exp in EXPERIMENTS:
        e = p["experiments"][exp]
        runs = {k: list(have if e[k] is None else e[k]) for k, (have, _) in given.items()}
        for key, (have, flag) in given.items():
            missing = [n for n in runs[key] if n not in have]
            if missing:
                raise SpecmatchError(f"report.experiments.{exp}.{key} names {missing}, but no {flag} folder holds "
                                     f"them (given: {sorted(have)}); are they in grid.{key}?")
        missing = [d for d in runs["diffusions"] if d not in inputs.generation]
        if missing:
            raise SpecmatchError(f"report.experiments.{exp}.diffusions names {missing}, but no --gen-metrics folder "
                                 f"scores their samples (scored: {sorted(inputs.generation)})")
        if exp in ("E1", "E2"):
            foreign = {d: inputs.diffusion[d]["latents"]["autoencoder"] for d in runs["diffusions"]
                       if inputs.diffusion[d]["latents"]["autoencoder"] not in runs["autoencoders"]}
            if foreign:
                raise SpecmatchError(f"report.experiments.{exp}.diffusions: {foreign} (run: its autoencoder) are "
                                     f"trained on autoencoders that {exp}.autoencoders does not list")
        out[exp] = runs
    return out


def _one_metric(values: dict[str, str], what: str) -> str:
    """The single metric name of one table's column, or an error naming who uses which."""
    names = sorted(set(values.values()))
    if len(names) > 1:
        raise SpecmatchError(f"{what} mixes metrics {names} ({', '.join(f'{k}: {v}' for k, v in values.items())}); "
                             "a table compares one metric (same feature net and protocol)")
    return names[0] if names else ""


def _one_generation_metric(rows: list[dict[str, Any]], what: str) -> str:
    return _one_metric({str(r["_folder"]): r["metric"] for r in rows}, what)


def _cfg(r) -> str:
    return f"{r['sampler']} {r['steps']} steps, cfg {r['cfg_scale']:g} on {r['cfg_interval']}"


def _gen_cols(r: dict[str, Any]) -> dict[str, Any]:
    return {"diffusion": r["diffusion"], "model": r["model"], "process": r["process"], "alignment": r["alignment"],
            "trained_steps": r["trained_steps"], "sampler": r["sampler"], "steps": r["steps"], "nfe": r["nfe"],
            "cfg_scale": r["cfg_scale"], "cfg_interval": r["cfg_interval"], "protocol": r["protocol"],
            r["metric"]: r["value"],
            f"{r['metric']} std": r["value_std"], f"{r['metric']} untrained": r["untrained"],
            f"{r['metric']} real floor": r["real_floor"], "gap_closed": r["gap_closed"],
            "precision": r["precision"], "recall": r["recall"], "inception_score": r["inception_score"],
            "n_samples": r["n_samples"], "reference": r["reference"],
            "feature_weights_sha256": r["feature_weights_sha256"], "weights": r["weights"], "seed": r["seed"]}


def objective_vs_paper(m: AEEvaluation) -> str:
    """The trained objective's settings that differ from the paper's for its variant (e.g. the
    tiny preset's ESM weight), as 'esm_weight 0.1 (paper 0.01)'; '' when none do."""
    from ..autoencoder.objectives import VARIANTS, objective

    if m.variant not in VARIANTS:  # an imported autoencoder (variant `pretrained`): no objective of ours
        return ""
    paper = objective(m.variant).__dict__
    diff = []
    for k, v in sorted(m.objective.items()):
        ref = paper.get(k)
        ref = list(ref) if isinstance(ref, tuple) else ref
        if k != "variant" and ref is not None and v != ref:
            diff.append(f"{k} {v:g} (paper {ref:g})" if isinstance(v, (int, float)) and isinstance(ref, (int, float))
                        else f"{k} {v} (paper {ref})")
    return "; ".join(diff)


def _ae_cols(m: AEEvaluation) -> dict[str, Any]:
    ls, pr = m.latent_spectrum, m.protocol
    cols = {"dataset": m.dataset, "autoencoder": m.name, "variant": m.variant, "config": m.config,
            "objective_vs_paper": objective_vs_paper(m),
            "latent_grid": f"{ls.grid[0]}x{ls.grid[1]}", "PSNR": m.psnr, "SSIM": m.ssim}
    if m.lpips is not None:
        cols["LPIPS"] = m.lpips
    cols[m.distance_name] = m.distance
    cols.update({"recon_split": pr["split"], "recon_n": pr["n_images"],
                 "recon_feature_weights_sha256": pr["weights_sha256"][:16]})
    return cols


def autoencoder_table(exp: str, runs: dict[str, list[str]], inputs: Inputs) -> pd.DataFrame:
    """E1 / E2: one row per (autoencoder, diffusion run on its latents, sampler); an autoencoder
    without a diffusion run in the experiment has one row with its reconstruction numbers only."""
    aes = [inputs.ae_eval[a] for a in runs["autoencoders"]]
    _one_metric({str(m.folder): m.distance_name for m in aes}, f"{exp}: the reconstruction distance")
    gen = [r for d in runs["diffusions"] for r in inputs.generation[d]]
    _one_generation_metric(gen, f"{exp}: the generation distance")
    rows = []
    for m in aes:
        base = _ae_cols(m)
        mine = [r for d in runs["diffusions"] if inputs.diffusion[d]["latents"]["autoencoder"] == m.name
                for r in sorted(inputs.generation[d], key=_cfg)]
        rows += [{**base, **_gen_cols(r)} for r in mine] or [base]
    return pd.DataFrame(rows)


def _fmt(v) -> str:
    return v if isinstance(v, str) else f"{v:g}"


def e3_table(runs: dict[str, list[str]], inputs: Inputs) -> pd.DataFrame:
    """E3: one row per (diffusion run, sampler): its alignment settings, the metric, and the
    spectral diagnostics of its target kind (from the target-spectra table)."""
    gen = [r for d in runs["diffusions"] for r in inputs.generation[d]]
    _one_generation_metric(gen, "E3: the generation distance")
    rows = []
    for d in runs["diffusions"]:
        a = inputs.diffusion[d]["alignment"]
        kind = a["kind"]
        dog = a.get("dog") or {}
        align = {"alignment": kind, "encoder": a.get("encoder"), "depth": a.get("depth"), "lambda": a.get("weight"),
                 "projector": a.get("projector"),
                 "dog_sigmas": f"{dog['sigma1']:g}/{dog['sigma2']:g}" if kind == "dog" and dog else None,
                 "irepa_gamma": a.get("irepa_gamma") if kind == "irepa" else None}
        target = {"target_RMSC2": None, "target_psd_exponent": None, "target_grid": None, "target_n_images": None,
                  "target_note": None}
        if kind != "none":
            ts = inputs.target_spectra
            if ts is None:
                raise SpecmatchError(f"E3: run {d} is aligned ({kind}) but no --target-spectra folder was given")
            hit = ts[(ts["encoder"] == a["encoder"]) & (ts["kind"] == kind)]
            if hit.empty:
                raise SpecmatchError(f"{inputs.folders['target_spectra']['target-spectra']}/target_spectra.csv: no row "
                                     f"for encoder {a['encoder']!r} and kind {kind!r} (run {d})")
            t = hit.iloc[0]
            # The diagnostics must be of the filter the run trains with, or they describe another target.
            differ = [f"{col} {_fmt(t[col])} (run: {_fmt(align[col])})" for col in ("dog_sigmas", "irepa_gamma")
                      if align[col] is not None and col in t and _fmt(t[col]) != _fmt(align[col])]
            if differ:
                target["target_note"] = "target-spectra diagnosed other settings: " + ", ".join(differ)
            else:
                target.update({"target_RMSC2": t["RMSC2"], "target_psd_exponent": t["psd_exponent"],
                               "target_grid": t["grid"], "target_n_images": int(t["n_images"])})
        for r in inputs.generation[d]:
            g = _gen_cols(r)
            g.pop("alignment")
            rows.append({"diffusion": d, "autoencoder": r["autoencoder"], **align, **g, **target, "_cfg": _cfg(r),
                         "_o": align_order(kind)})
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).sort_values(["_cfg", "_o"], kind="stable").drop(columns=["_cfg", "_o"]).reset_index(
        drop=True)


def data_spectra_table(runs: dict[str, list[str]], inputs: Inputs) -> pd.DataFrame:
    """E4, images: the PSD exponent of each dataset at full size and on each latent grid."""
    rows = []
    for ds in runs["datasets"]:
        sp = inputs.spectra[ds]
        entries = [("full", sp.full)] + [(g, sp.grids[g]) for g in sorted(sp.grids, reverse=True)]
        for g, ms in entries:
            rows.append({"dataset": ds, "map": f"{ms.size[0]}x{ms.size[1]}" + (" (full size)" if g == "full"
                                                                              else " (latent grid)"),
                         "psd_exponent": ms.psd_exponent, "psd_exponent_per_image_mean": ms.psd_exponent_per_image_mean,
                         "psd_exponent_per_image_std": ms.psd_exponent_per_image_std, "split": sp.split,
                         "n_images": sp.n_images, "n_bins": sp.n_bins, "images_sha256": sp.images_sha256[:16]})
    return pd.DataFrame(rows)


def latent_spectra_table(runs: dict[str, list[str]], inputs: Inputs) -> pd.DataFrame:
    """E4, latents: PSD exponent of each autoencoder's latents against the images' on the same
    grid, KL(target || latent), the mean ESM loss and the low-pass distance per k."""
    aes = [inputs.ae_eval[a] for a in runs["autoencoders"]]
    rkey = _one_metric({str(m.folder): m.distance_name for m in aes}, "E4: the low-pass reconstruction distance")
    rows = []
    for m in aes:
        ls = m.latent_spectrum
        sp = inputs.spectra.get(m.dataset)
        grid = sp.grids.get(ls.grid[0]) if sp is not None else None
        row = {"dataset": m.dataset, "autoencoder": m.name, "variant": m.variant, "config": m.config,
               "latent_grid": f"{ls.grid[0]}x{ls.grid[1]}", "latent_psd_exponent": ls.psd_exponent,
               "image_psd_exponent_on_grid": grid.psd_exponent if grid else None,
               "delta": ls.delta, "KL(target||latent)": ls.kl_target_to_latent, "esm_loss": ls.esm_loss_mean,
               f"{rkey} LP k=0": m.distance}
        for k in sorted(m.lowpass):
            row[f"{rkey} LP k={k}"] = m.lowpass[k]
        row.update({"recon_split": m.protocol["split"], "recon_n": m.protocol["n_images"],
                    "recon_feature_weights_sha256": m.protocol["weights_sha256"][:16]})
        rows.append(row)
    return pd.DataFrame(rows)


def sample_spectra_table(p: dict[str, Any], runs: dict[str, list[str]], inputs: Inputs) -> pd.DataFrame:
    """E4, generated images: the spectrum distribution (analysis setting: the paper's figure) of
    the first `sample_spectra.max_images` images of each sample set against its dataset's real
    images (`data-spectra`, full size), as KL(samples || real), and both PSD exponents. A sample
    set whose dataset is not among E4's datasets is left out."""
    import torch

    from ..data.reader import SplitReader
    from ..diffusion.sample import SPLIT

    rows = []
    for sname, folder in sorted(inputs.samples.items()):
        proto = sampling_record.read(folder)
        ae = inputs.ae_eval.get(proto.autoencoder)
        if ae is None or ae.dataset not in runs["datasets"]:
            continue
        real = inputs.spectra[ae.dataset]
        reader = SplitReader(folder, SPLIT)
        n = min(len(reader), p["sample_spectra"]["max_images"])
        images, _ = reader.get(np.arange(n))
        if tuple(images.shape[1:3]) != real.full.size:
            raise SpecmatchError(f"{folder}: samples of {images.shape[1]}x{images.shape[2]} px, but the real images "
                                 f"of {ae.dataset} are {real.full.size[0]}x{real.full.size[1]}")
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        r = data_spectra.compare_to_real(x, real)
        rows.append({"dataset": ae.dataset, "samples": sname, "diffusion": proto.diffusion,
                     "autoencoder": proto.autoencoder, "sampler": proto.describe, "trained_steps": proto.trained_steps,
                     "n_images": n, "KL(samples||real)": r["kl_to_real"], "psd_exponent": r["psd_exponent"],
                     "real_psd_exponent": r["real_psd_exponent"], "real_split": real.split,
                     "real_n_images": real.n_images, "n_bins": real.n_bins})
    return pd.DataFrame(rows)


def progress_tables(p: dict[str, Any], inputs: Inputs) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(points of the metric over training, the generation table's values of the same runs and
    sampler), both with their protocol; `label` says whether a final value's protocol is the
    curve's."""
    if not inputs.progress:
        return pd.DataFrame(), pd.DataFrame()
    points = pd.concat([inputs.progress[d] for d in inputs.progress], ignore_index=True)
    _one_metric({d: "/".join(sorted(set(inputs.progress[d]["metric"]))) for d in inputs.progress},
                "the metric over training")
    finals = []
    for d, df in inputs.progress.items():
        first = df.iloc[0]
        for r in inputs.generation.get(d, []):
            if (r["sampler"], int(r["steps"]), float(r["cfg_scale"]), r["cfg_interval"]) != (
                    first["sampler"], int(first["steps"]), float(first["cfg_scale"]), str(first["cfg_interval"])):
                continue
            same = int(r["n_samples"]) == int(first["n_samples"]) and r["metric"] == first["metric"]
            finals.append({"diffusion": d, "autoencoder": r["autoencoder"], "step": r["trained_steps"],
                           "source": "generation table",
                           "metric": r["metric"], "value": r["value"], "n_samples": r["n_samples"],
                           "sampler": r["sampler"], "steps": r["steps"], "cfg_scale": r["cfg_scale"],
                           "cfg_interval": r["cfg_interval"], "reference": r["reference"],
                           "feature_weights_sha256": r["feature_weights_sha256"],
                           "label": ("generation table (same protocol)" if same
                                     else f"generation table (n={r['n_samples']})")})
    return points, pd.DataFrame(finals)


# --------------------------------------------------------------------------- figures


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
        figures.latents_vs_image_figure(image, latents, figs / name,
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
        figures.image_rows_figure(rows, figs / name, f"{ds}: held-out images and their reconstructions "
                                                     "(posterior mean)")
        out.append((name, f"{ds}: reconstructions"))
    return out


def _copy(src: Path, figs: Path, name: str) -> str:
    shutil.copyfile(src, figs / name)
    return name


# --------------------------------------------------------------------------- the page


def _md(df: pd.DataFrame, cols: list[str]) -> str:
    return markdown(df[[c for c in cols if c in df.columns]]) if len(df) else "(no rows)"


def _is_metric(column: str) -> bool:
    """A generation distance column (FID, FD-<net>), not one of its companions (std, untrained...)."""
    return column == "FID" or (column.startswith("FD-") and " " not in column)


def _protocol_lines(df: pd.DataFrame, gen: bool = True, recon: bool = True) -> list[str]:
    lines = []
    if recon and "recon_n" in df:
        rm = [c for c in df.columns if c.startswith("r") and ("FID" in c or c.startswith("rFD")) and " LP " not in c]
        for (split, n, w), _ in df.groupby(["recon_split", "recon_n", "recon_feature_weights_sha256"]):
            lines.append(f"- reconstruction: {', '.join(rm) or 'distance'} and PSNR/SSIM on {n} `{split}` images "
                         f"(posterior mean), feature weights sha256 {w}...")
    if gen and "n_samples" in df and df["n_samples"].notna().any():
        g = df[df["n_samples"].notna()]
        metrics = sorted({c for c in g.columns if _is_metric(c)})
        for (n, ref, w, proto), _ in g.groupby(["n_samples", "reference", "feature_weights_sha256", "protocol"]):
            lines.append(f"- generation: {', '.join(metrics)} of {int(n)} samples against {ref}, protocol {proto}, "
                         f"feature weights sha256 {w}...")
        for key, sub in g.groupby(["sampler", "steps", "cfg_scale", "cfg_interval", "trained_steps"]):
            s, st, cfg, iv, ts = key
            lines.append(f"- sampler: {s}, {int(st)} steps, guidance {cfg:g} on t in [{iv.replace('-', ', ')}] "
                         f"(runs trained {int(ts)} steps): {', '.join(sorted(set(sub['diffusion'])))}")
    return lines


def _page(name: str, p: dict[str, Any], runs, t: dict[str, pd.DataFrame], figs: dict[str, list[tuple[str, str]]]
          ) -> str:
    def table_links(stem: str) -> str:
        return f"[{stem}.md](tables/{stem}.md) ([CSV](tables/{stem}.csv))"

    def images(items) -> list[str]:
        return [f"![{label}](figures/{f})" for f, label in items]

    L = [f"# Spectrum Matching: the paper's experiments ({name})", "",
         "Produced by `specmatch report paper`, the final rule of the DAG, from the stage outputs of this preset. "
         "Every table is in `tables/` as CSV and Markdown with its protocol columns (metric name, number of "
         "samples, reference set, feature weights, sampler, steps, guidance, trained steps); every figure is in "
         "`figures/`. `specmatch audit <file>` traces any of them back to the raw data and pretrained weights.",
         "", "Distances are named by their feature net: FID only for the standard Inception; other names "
         "(e.g. FD-EffNetLite0-128 of the tiny preset) are not comparable with FID, and numbers with different "
         "protocols are never put in one column.", ""]
    tested = set(t["claims"]["claim"]) if len(t["claims"]) else set()
    L += ["## Claims", "",
          "Each claim of the paper that this grid tests, with this run's numbers (± their bootstrap standard error "
          "over the evaluated images) and a verdict: supported when the claimed advantage exceeds 2 standard "
          "errors of the difference, contradicted when the opposite does, not resolved otherwise. A generation "
          "claim is judged only between runs that beat their own untrained network. "
          f"Table: {table_links('claims')}", "",
          _md(t["claims"], ["claim", "setting", "evidence", "z", "verdict"]) if len(t["claims"]) else
          "(no claim of the paper is tested by the runs of this preset)", "",
          *[f"- {cid}: {text}" + ("" if cid in tested else " Not tested: no pair of this preset's runs compares it.")
            for cid, text in claims_mod.CLAIMS.items()], ""]
    short = {"E1": ["autoencoder", "variant", "latent_grid", "PSNR", "SSIM", "LPIPS"],
             "E2": ["autoencoder", "variant", "latent_grid", "PSNR", "SSIM", "LPIPS"]}
    for exp, (title, what) in EXPERIMENTS.items():
        r = runs[exp]
        L += [f"## {exp}: {title}", "", what, ""]
        listed = [f"{k}: {', '.join(r[k])}" for k in ("datasets", "autoencoders", "diffusions")
                  if r[k] and (exp == "E4" or k != "datasets")]
        if exp in ("E1", "E2"):
            df = t[exp.lower()]
            if df.empty:
                L += [f"No runs in this preset (`report.experiments.{exp}` lists none).", ""]
                continue
            L += ["Runs of this preset: " + "; ".join(listed) + ".", "", "Protocol:", *_protocol_lines(df), "",
                  f"Full table: {table_links(exp.lower())}", ""]
            rk = [c for c in df.columns if c.startswith("rFD") or c == "rFID"]
            gk = [c for c in df.columns if _is_metric(c) or c.endswith((" untrained", " real floor"))] + ["gap_closed"]
            L += [_md(df, short[exp] + rk + ["diffusion", "sampler", "cfg_scale"] + gk), ""]
        elif exp in ("E3", "E3b"):
            df = t[exp.lower()]
            if df.empty:
                L += [f"No runs in this preset (`report.experiments.{exp}` lists none).", ""]
                continue
            gk = [c for c in df.columns if _is_metric(c) or c.endswith((" untrained", " real floor"))] + ["gap_closed"]
            L += ["Runs of this preset: " + "; ".join(listed) + ".", "", "Protocol:", *_protocol_lines(df, recon=False),
                  "", f"Full table: {table_links(exp.lower())}", "",
                  _md(df, ["diffusion", "alignment", "encoder", "sampler", "cfg_scale"] + gk +
                      ["target_RMSC2", "target_psd_exponent", "published_FID", "comparable"]), ""]
            L += published.section(df) if exp == "E3" else []
            if figs["targets"] and (exp == "E3" or not runs["E3"]["diffusions"]):
                L += ["Spectrum distributions of the alignment targets (repa = raw, irepa = spatially normalised, "
                      "dog = band-passed), from `target-spectra`:", "", *images(figs["targets"]), ""]
        else:
            dd, dl = t["e4_data"], t["e4_latents"]
            L += ["Runs of this preset: " + "; ".join(listed) + ".", ""]
            if not dd.empty:
                L += [f"Images: {table_links('e4_data')}", "", _md(dd, ["dataset", "map", "psd_exponent", "split",
                                                                      "n_images"]), ""]
            if not dl.empty:
                lp = [c for c in dl.columns if " LP k=" in c]
                ns = ", ".join(f"{n} `{s}` images" for s, n in sorted(set(zip(dl["recon_split"], dl["recon_n"]))))
                L += [f"Latents: {table_links('e4_latents')}. Low-pass distances ({lp[0].split(' LP ')[0]} between "
                      f"LP_k(x) and Dec(LP_k(mu)); k = 0: none) on {ns}; spectra of the latents' posterior means "
                      "of the same images.", "",
                      _md(dl, ["autoencoder", "latent_grid", "latent_psd_exponent", "image_psd_exponent_on_grid",
                               "KL(target||latent)"] + lp), ""]
            ds_ = t["e4_samples"]
            if not ds_.empty:
                L += [f"Generated images: {table_links('e4_samples')}. Their spectrum distribution against the real "
                      "images' (KL, 0 = the same distribution) and their PSD exponent beside the real one.", "",
                      _md(ds_, ["samples", "sampler", "n_images", "KL(samples||real)", "psd_exponent",
                                "real_psd_exponent"]), ""]
            L += ["Spectrum distributions (the paper's figure: the image's distribution on the latent grid and its "
                  "delta-tilted ESM target, against each autoencoder's latents; training setting: centred, DC "
                  "removed):", "", *images(figs["spectra"]), "",
                  "Spectrum distributions of the images at every grid (`data-spectra`):", "", *images(figs["data"]), ""]
    L += ["## Metric over training", ""]
    if t["fid_over_training"].empty:
        L += ["No run of this preset saves snapshots (`report.progress.diffusions` is empty).", ""]
    else:
        pt = t["fid_over_training"]
        pts = pt[pt["source"] != "generation table"]
        L += [f"The generation metric of the EMA weights saved at `train.snapshot_steps` and of the final weights, "
              f"each with {int(pts['n_samples'].iloc[0])} samples of the run's first sampler (the same noise for "
              "every point) against the reference of its dataset (`fid-progress`); stars: the value in the "
              "generation table, labelled with its number of samples when that differs (a smaller N biases the "
              f"distance upwards). Table: {table_links('fid_over_training')}", "", *images(figs["progress"]), ""]
    L += ["## Reconstructions", "", "The first held-out images of each dataset above each autoencoder's "
          "reconstructions (posterior mean, as in the reconstruction metrics):", "", *images(figs["recon"]), "",
          "## Samples", "", "One grid per diffusion run and sampler (the first samples of the scored set):", ""]
    L += [line for f, label in figs["samples"] for line in (f"### {label}", "", f"![{label}](figures/{f})", "")]
    return "\n".join(L)


# --------------------------------------------------------------------------- the stage


def write(params: dict[str, Any], inputs: Inputs, name: str, out: str | Path) -> dict[str, pd.DataFrame]:
    """The tables, figures and index.md in `out` (atomically), with a provenance record."""
    p = config_mod.validate(params, "report", where="report", source=f"parameters of {name}")
    runs = experiments(p, inputs)
    t = {"e1": autoencoder_table("E1", runs["E1"], inputs) if runs["E1"]["autoencoders"] else pd.DataFrame(),
         "e2": autoencoder_table("E2", runs["E2"], inputs) if runs["E2"]["autoencoders"] else pd.DataFrame(),
         "e3": published.compare(e3_table(runs["E3"], inputs), inputs.diffusion),
         "e3b": published.compare(e3_table(runs["E3b"], inputs), inputs.diffusion),
         "e4_data": data_spectra_table(runs["E4"], inputs),
         "e4_latents": latent_spectra_table(runs["E4"], inputs) if runs["E4"]["autoencoders"] else pd.DataFrame(),
         "e4_samples": sample_spectra_table(p, runs["E4"], inputs)}
    gen = {e: [r for d in runs[e]["diffusions"] for r in inputs.generation[d]] for e in ("E1", "E2", "E3")}
    t["claims"] = claims_mod.table(inputs, runs, gen["E1"] + gen["E2"], gen["E3"])
    points, finals = progress_tables(p, inputs)
    missing = [d for d in p["progress"]["diffusions"] if d not in inputs.progress]
    if missing:
        raise SpecmatchError(f"report.progress.diffusions names {missing}, but no --progress folder holds them "
                             f"(given: {sorted(inputs.progress)})")
    t["fid_over_training"] = pd.concat([points, finals.drop(columns="label") if len(finals) else finals],
                                       ignore_index=True) if len(points) else pd.DataFrame()
    intros = {
        "e1": ("E1: autoencoders and their U-ViT", EXPERIMENTS["E1"][1]),
        "e2": ("E2: autoencoders and their SiT", EXPERIMENTS["E2"][1]),
        "e3": ("E3: none vs REPA vs iREPA vs DoG-REPA", EXPERIMENTS["E3"][1] + " " + published.__doc__.split("\n\n")[1]
               .replace("\n", " ")),
        "e3b": ("E3b: none vs REPA vs iREPA vs DoG-REPA on our latents", EXPERIMENTS["E3b"][1]),
        "e4_data": ("E4: PSD exponents of the images", "Slope of log band energy (centred, DC removed) against "
                    "log(k + 1), of the mean energies and per image, at full size and on each latent grid."),
        "claims": ("Claims of the paper tested by this run", claims_mod.__doc__.split("\n\n")[1].replace("\n", " ")),
        "e4_latents": ("E4: spectral diagnostics of the latents", EXPERIMENTS["E4"][1]),
        "e4_samples": ("E4: spectra of the generated images", "Spectrum distribution (no centring, DC kept) of the "
                       "first images of each sample set against the real images of its dataset at full size: "
                       "KL(samples || real) over the non-empty bins, and the PSD exponents (slope of log band "
                       "energy, centred and DC removed, against log(k + 1))."),
        "fid_over_training": ("Generation metric over training", "One row per evaluated weights: snapshots and final "
                              "weights (`fid-progress`, `n_samples` each), and the generation table's value of the "
                              "same run and sampler (source `generation table`)."),
    }
    prov = Provenance("report-paper", name, p)
    inputs.add_to(prov)
    with atomic.atomic_dir(out) as tmp:
        (tmp / "tables").mkdir()
        figs_dir = tmp / "figures"
        figs_dir.mkdir()
        for stem, df in t.items():
            if len(df):
                title, intro = intros[stem]
                write_table(df, tmp / "tables", stem, title, intro)
        figs: dict[str, list[tuple[str, str]]] = {k: [] for k in ("spectra", "data", "targets", "recon", "samples",
                                                                  "progress")}
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
        if len(points):
            figures.progress_figure(points, finals if len(finals) else pd.DataFrame(
                columns=["diffusion", "metric", "step", "value", "label"]), figs_dir / "fid_over_training.png")
            figs["progress"].append(("fid_over_training.png", "metric over training"))
        atomic.write_text(tmp / INDEX, _page(name, p, runs, t, figs) + "\n")
        prov.write(out, tmp)
    log.info("report %s: %s", name, {k: len(v) for k, v in t.items()})
    return t
