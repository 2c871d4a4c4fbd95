"""The experiments of the report (docs/method.md §9, E1-E4 and the extension E3b): which runs
form each, and their tables.

The runs of an experiment are those `report.experiments` lists (null: every one the inputs
hold; `grid.experiment_runs`), and the report adds what only it can check: every diffusion run
has scored samples, and E1/E2 list the autoencoders their diffusion runs are trained on. A
table never mixes metrics: a distance sits in a column named by its metric (FID,
rFD-EffNetLite0-128, ...), and a table whose rows were scored by different metrics is refused.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from ..autoencoder.evaluate import AEEvaluation
from ..data import sample_folder
from ..errors import SpecmatchError
from ..grid import EXPERIMENTS, experiment_runs
from ..metrics import record
from ..metrics import spectra as data_spectra
from . import claims as claims_mod
from . import published
from .generation_table import align_order, train_seed
from .inputs import KINDS, Inputs

def runs_of(p: dict[str, Any], inputs: Inputs) -> dict[str, dict[str, list[str]]]:
    """The runs of each experiment (a null list: every one given, e.g. E4's autoencoders), each
    checked against the inputs: a run the parameters name but no input holds, a diffusion run
    without scored samples, and an E1/E2 diffusion run on an autoencoder the experiment does not
    list are errors."""
    try:
        out = experiment_runs(p["experiments"], inputs.runs())
    except SpecmatchError as e:
        flags = ", ".join(f"{k.runs}: {k.flag}" for k in KINDS.values() if k.runs)
        grid = ", ".join(f"grid.{k.runs}" for k in KINDS.values() if k.runs)
        raise SpecmatchError(f"{e}; available: the names its input folders hold ({flags}). Is each named run in "
                             f"the grid ({grid}), and its folder given?") from e
    for exp, r in out.items():
        missing = [d for d in r["diffusions"] if d not in inputs.generation]
        if missing:
            raise SpecmatchError(f"report.experiments.{exp}.diffusions names {missing}, but no --gen-metrics folder "
                                 f"scores their samples (scored: {sorted(inputs.generation)})")
        if exp in ("E1", "E2"):
            foreign = {d: inputs.diffusion[d]["latents"]["autoencoder"] for d in r["diffusions"]
                       if inputs.diffusion[d]["latents"]["autoencoder"] not in r["autoencoders"]}
            if foreign:
                raise SpecmatchError(f"report.experiments.{exp}.diffusions: {foreign} (run: its autoencoder) are "
                                     f"trained on autoencoders that {exp}.autoencoders does not list")
    return out


# The keys under which a generation number and its untrained network's are comparable.
_SAME_PROTOCOL = ("autoencoder", "model", "process", "sampler", "steps", "cfg_scale", "cfg_interval", "n_samples",
                  "metric", "protocol")


def _same_seed(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two generation rows come from the same training seed (the seed of the initial
    weights of an untrained network); true where either does not record it."""
    sa, sb = train_seed(a), train_seed(b)
    return sa is None or sb is None or sa == sb


def attach_baselines(generation: dict[str, list[dict[str, Any]]], floors: list[record.GenerationMetrics]) -> None:
    """Give each trained run's generation row what learning is measured between: the value (and
    bootstrap error) of the same network untrained under the same protocol and training seed (a `-untrained` run of
    report.baselines.untrained, trained_steps 0) as `untrained`, `untrained_std`; the real floor
    (held-out real images of the same dataset, count, metric and protocol; report.baselines.
    real_floor) as `real_floor`; and the share of the gap between them closed, `gap_closed` =
    (untrained - value) / (untrained - real_floor). None where a baseline is missing."""
    untrained = [r for rows in generation.values() for r in rows if int(r["trained_steps"]) == 0]
    for rows in generation.values():
        for r in rows:
            hit = [u for u in untrained if int(r["trained_steps"]) > 0 and all(u[k] == r[k] for k in _SAME_PROTOCOL)
                   and _same_seed(u, r)]
            floor = [f.value for f in floors if (f.reference["dataset"], int(f.samples["n"]), f.metric,
                                                 f.protocol_name) == (r["dataset"], int(r["n_samples"]), r["metric"],
                                                                     r["protocol"])]
            r["untrained"] = hit[0]["value"] if hit else None
            r["untrained_std"] = hit[0]["value_std"] if hit else None
            r["real_floor"] = floor[0] if floor else None
            ok = hit and floor and hit[0]["value"] != floor[0]
            r["gap_closed"] = (hit[0]["value"] - r["value"]) / (hit[0]["value"] - floor[0]) if ok else None


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
        proto = sample_folder.read(folder)
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



# Title and introduction of each table file (`render.tables.write_table`).
INTROS = {
    "e1": ("E1: autoencoders and their U-ViT", EXPERIMENTS["E1"].description),
    "e2": ("E2: autoencoders and their SiT", EXPERIMENTS["E2"].description),
    "e3": ("E3: none vs REPA vs iREPA vs DoG-REPA", EXPERIMENTS["E3"].description + " "
           + published.__doc__.split("\n\n")[1].replace("\n", " ")),
    "e3b": ("E3b: none vs REPA vs iREPA vs DoG-REPA on our latents", EXPERIMENTS["E3b"].description),
    "e4_data": ("E4: PSD exponents of the images", "Slope of log band energy (centred, DC removed) against "
                "log(k + 1), of the mean energies and per image, at full size and on each latent grid."),
    "claims": ("Claims of the paper tested by this run", claims_mod.__doc__.split("\n\n")[1].replace("\n", " ")),
    "e4_latents": ("E4: spectral diagnostics of the latents", EXPERIMENTS["E4"].description),
    "e4_samples": ("E4: spectra of the generated images", "Spectrum distribution (no centring, DC kept) of the "
                   "first images of each sample set against the real images of its dataset at full size: "
                   "KL(samples || real) over the non-empty bins, and the PSD exponents (slope of log band "
                   "energy, centred and DC removed, against log(k + 1))."),
    "fid_over_training": ("Generation metric over training", "One row per evaluated weights: snapshots and final "
                          "weights (`fid-progress`, `n_samples` each), and the generation table's value of the "
                          "same run and sampler (source `generation table`)."),
}


class Progress(NamedTuple):
    """The metric over training (`progress_tables`): its points, and the generation table's
    values of the same runs with a `label` for the figure."""

    points: pd.DataFrame
    finals: pd.DataFrame


def tables(p: dict[str, Any], runs: dict[str, dict[str, list[str]]], inputs: Inputs
           ) -> tuple[dict[str, pd.DataFrame], Progress]:
    """Every table of the report by file stem (an experiment without runs: an empty frame), and
    the metric over training for its figure."""
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
    return t, Progress(points, finals)
