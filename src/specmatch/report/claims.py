"""The claims section of the report: each claim of the paper that the grid tests, with this run's
numbers, their uncertainty and a verdict.

A comparison of two numbers a and b (lower is better for every quantity here) with standard
errors sa and sb is read through z = (b - a) / sqrt(sa^2 + sb^2), the advantage of a in units of
its uncertainty: "supported" when z > 2, "contradicted" when z < -2, "not resolved at this N"
otherwise. The standard errors are half-sample bootstraps over the evaluated images
(metrics.bootstrap: `eval-ae`'s `eval.bootstrap`, `fid calc`'s `metrics.bootstrap`); the two
sides of a comparison are scored on the same images, so treating their errors as independent
overstates the error of the difference (a conservative verdict). A generation claim is only
judged between runs that learned: when a run's distance does not beat its own untrained network
(report.baselines.untrained) by 2 standard errors, the claim is "not resolved: the runs did not
learn at this length".

How the spread over seeds enters: a generation claim compares two sides, each the runs that differ
only in their training seed (`train.seed`; the same autoencoder, alignment with its settings and
weights, under the same protocol; a row whose seed is unknown, as in records written before it
was recorded, counts as a seed of its own). A side of n runs with distances v_i and bootstrap
standard errors s_i reads as their mean, with the standard error
sqrt(sum_i s_i^2 / n^2 + var_seed / n), var_seed the sample variance of the v_i (ddof 1; 0 for one
seed, whose spread is then not measured: the setting says so). The seed variance already holds the
image-sampling noise of each run, so that noise is counted twice: a conservative verdict. Both
sides must have learned, each pooled over its seeds: the mean distance of its runs must beat the
mean of their untrained networks (each of its own seed, pooled the same way) by 2 standard
errors, so a seed that learned little weighs in the mean rather than vetoing the side; runs that
repeat a known seed are not seed replicates and are compared one by one.

C4 rests on a premise (docs/method.md §8): SD-VAE's latents, as the diffusion model sees them
(posterior samples), are flatter than the delta-tilted target ("over-noisy"). The premise row
reads `eval-ae`'s sampled latents: their PSD exponent minus the target's, with its bootstrap
standard error. Where the premise is not established for the SD-VAE of a comparison, its C4
rows read "not tested" instead of a verdict. A C4 verdict also says when the candidate
reconstructs more than `RECON_GAP_DB` worse than the autoencoder it is compared with (a
confound). C4c compares the same candidates with the control autoencoder (variant `ae`: the
SD-VAE objective without its KL term and without a spectral term), which separates "spectrum
matching" from "less posterior noise".

The power-law claim is judged on the images' mean band energies: the least-squares fit of log E_k
on log(k + 1) (scipy.stats.linregress) must explain at least 95% of the variance (R^2) with a
slope below zero by more than 2 of its standard errors.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from .generation_table import train_seed

SUPPORTED, CONTRADICTED, UNRESOLVED = "supported", "contradicted", "not resolved at this N"
Z = 2.0
R2_POWER_LAW = 0.95
RECON_GAP_DB = 1.0
NOT_TESTED = "not tested: premise fails at this scale"

CLAIMS = {
    "C0": "The diffusion loss learns the low and mid frequencies first and best: relative to the Gaussian optimum, "
          "their loss-weighted error improves earlier in training and ends lower than the high bands'.",
    "C1": "The images' spectrum follows a power law (energy falling with frequency).",
    "C2": "ESM brings the latent spectrum to the flattened target: a lower KL(target || latent) than SD-VAE's.",
    "C3": "DSM keeps low frequencies decodable: a lower low-pass reconstruction distance than SD-VAE's at the "
          "strongest low-pass.",
    "C4-premise": "SD-VAE's latents as the diffusion model sees them (posterior samples) are over-noisy: "
                  "flatter than the delta-tilted target (a PSD exponent above the target's).",
    "C4": "ESM/DSM latents are more diffusable than SD-VAE's: a lower generation distance at equal steps.",
    "C4c": "ESM/DSM latents are more diffusable than the control's (the same autoencoder without KL and "
           "without a spectral term): a lower generation distance at equal steps.",
    "C5": "REPA beats no alignment: a lower generation distance at equal steps.",
    "C6": "DoG-REPA beats iREPA and REPA: a lower generation distance at equal steps.",
}


def _std(v) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def compare(better: float, s_better: float | None, worse: float, s_worse: float | None) -> tuple[float | None, str]:
    """(z, verdict) for the claim that `better` is lower than `worse`."""
    if s_better is None or s_worse is None:
        return None, "not resolved: no uncertainty (set the bootstrap parameters)"
    se = math.hypot(s_better, s_worse)
    if se == 0:
        return (math.inf if worse > better else -math.inf if worse < better else 0.0,
                SUPPORTED if worse > better else CONTRADICTED if worse < better else UNRESOLVED)
    z = (worse - better) / se
    return z, SUPPORTED if z > Z else CONTRADICTED if z < -Z else UNRESOLVED


def _fmt(v: float, s: float | None) -> str:
    return f"{v:.4g}" + ("" if s is None else f" ± {s:.2g}")


def _row(cid: str, setting: str, evidence: str, z: float | None, verdict: str) -> dict[str, Any]:
    return {"claim": cid, "statement": CLAIMS[cid], "setting": setting, "evidence": evidence,
            "z": None if z is None else round(float(z), 2), "verdict": verdict}


def frequency_bias(inputs, diffusions: list[str]) -> list[dict[str, Any]]:
    """C0 from each `band-error` output (docs/band-error.md): 'not tested' when the run did not
    learn (rho over all bands fell by no more than 2 standard errors from the first snapshot to the
    final weights). Two comparisons, each with its bootstrap standard error over images: (a) by the
    first snapshot, the low and mid bands have made a larger share of their log-improvement (from
    initialisation to the final weights) than the high bands, (b) at the final weights
    rho_high - rho_low+mid > 0. Supported when both exceed 2 standard errors,
    contradicted when either is reversed beyond 2, not resolved otherwise; z is (b)'s."""
    rows = []
    for d in diffusions:
        if d not in inputs.band_error:
            continue
        info, points = inputs.band_error[d]
        c0, last = info["c0"], points[-1].result
        setting = (f"{d}: {len(points)} points to step {info['trained_steps']}, {last.n_images} held-out "
                   f"{'x'.join(map(str, last.shape))} maps, {len(last.t)} noise levels, {last.n_bins} bands")
        diff, se = c0["high_minus_low_mid"], c0["high_minus_low_mid_se"]
        rho = ", ".join(f"{g} {v:.3g}" for g, v in c0["rho_final"].items())
        evidence = f"final rho (error / optimum, loss-weighted): {rho}; (b) high - low+mid {_fmt(diff, se)}"
        if c0["learned"] is None or not c0["learned"] > Z * (c0["learned_se"] or 0.0):
            learned = "no snapshot" if c0["learned"] is None else _fmt(c0["learned"], c0["learned_se"])
            rows.append(_row("C0", setting, evidence + f"; rho over all bands fell by {learned}", None,
                             "not tested: the run did not learn at this length"))
            continue
        frac, f_se = c0["early_fraction_diff"], c0["early_fraction_diff_se"]
        if frac is None or f_se is None or not math.isfinite(frac):
            rows.append(_row("C0", setting, evidence, diff / se if se else None,
                             "not resolved: no snapshot between initialisation and the final weights "
                             "(train.snapshot_steps)"))
            continue
        ef = c0["early_fraction"]
        evidence += (f"; (a) share of the log-improvement made by step {c0['early_step']}: low+mid "
                     f"{ef['low_mid']:.3g}, high {ef['high']:.3g}, difference {_fmt(frac, f_se)}")
        z_b = diff / se if se and se > 0 else None
        z_a = frac / f_se if f_se > 0 else (math.copysign(math.inf, frac) if frac else 0.0)
        if z_b is None:
            verdict = "not resolved: no uncertainty (set band_error n_boot)"
        elif z_b > Z and z_a > Z:
            verdict = SUPPORTED
        elif z_b < -Z or z_a < -Z:
            verdict = CONTRADICTED
        else:
            verdict = UNRESOLVED + (" (the high bands end worse, but their learning is not later beyond 2 standard "
                                    "errors)" if z_b > Z else "")
        rows.append(_row("C0", setting, evidence, z_b, verdict))
    return rows


def power_law(inputs, datasets: list[str]) -> list[dict[str, Any]]:
    rows = []
    for ds in datasets:
        sp = inputs.spectra[ds]
        m = sp.full
        e = np.asarray(m.band_energy, np.float64)
        ok = np.asarray(m.valid_bins, bool) & (e > 0)
        fit = stats.linregress(np.log(np.arange(1, len(e) + 1))[ok], np.log(e[ok]))
        r2, z = fit.rvalue ** 2, -fit.slope / fit.stderr if fit.stderr > 0 else math.inf
        verdict = (SUPPORTED if r2 >= R2_POWER_LAW and z > Z else
                   CONTRADICTED if fit.slope >= 0 or r2 < 0.8 else UNRESOLVED)
        rows.append(_row("C1", f"{ds}/{sp.split}, {sp.n_images} images, {m.size[0]}x{m.size[1]}",
                         f"PSD exponent {fit.slope:.3f} ± {fit.stderr:.2g} (fit of the mean band energies, "
                         f"R^2 {r2:.3f}; per image {m.psd_exponent_per_image_mean:.3f} ± "
                         f"{m.psd_exponent_per_image_std:.2g} std)", z, verdict))
    return rows


def _pairs(aes: dict, variants: tuple[str, ...], base_variant: str = "sdvae"):
    """(candidate, base) evaluations on the same dataset and architecture."""
    base = {(m.dataset, m.config): m for m in aes.values() if m.variant == base_variant}
    for m in aes.values():
        if m.variant in variants and (m.dataset, m.config) in base:
            yield m, base[(m.dataset, m.config)]


def _premise_z(m) -> float | None:
    """z of "the sampled latents are flatter than the target" (None: no bootstrap)."""
    b = m.sampled_flatness_bootstrap
    if b is None or b.std == 0:
        return None
    return (m.sampled.psd_exponent - m.latent_spectrum.target_exponent) / b.std


def premise(inputs, names: list[str]) -> list[dict[str, Any]]:
    """The premise row of C4, one per SD-VAE of the grid."""
    rows = []
    for a in names:
        m = inputs.ae_eval[a]
        if m.variant != "sdvae":
            continue
        z = _premise_z(m)
        diff = m.sampled.psd_exponent - m.latent_spectrum.target_exponent
        se = None if m.sampled_flatness_bootstrap is None else m.sampled_flatness_bootstrap.std
        verdict = ("not resolved: no uncertainty (set the bootstrap parameters)" if z is None else
                   SUPPORTED if z > Z else CONTRADICTED if z < -Z else UNRESOLVED)
        rows.append(_row("C4-premise", f"{m.name} ({m.dataset}, {m.config}, {m.n} held-out images, one posterior "
                                       "sample each)",
                         f"sampled latents' PSD exponent {m.sampled.psd_exponent:.3f} against the target's "
                         f"{m.latent_spectrum.target_exponent:.3f}: difference {_fmt(diff, se)} (mu's "
                         f"{m.latent_spectrum.psd_exponent:.3f}); KL(target || sampled) "
                         f"{m.sampled.kl_target_to_latent:.4g} (mu: {m.latent_spectrum.kl_target_to_latent:.4g}); "
                         f"posterior noise / signal {m.sampled.noise_to_signal:.3g}", z, verdict))
    return rows


def encoding(inputs, names: list[str]) -> list[dict[str, Any]]:
    aes = {a: inputs.ae_eval[a] for a in names}
    rows = []
    for m, sd in _pairs(aes, ("esm", "esm_dsm")):
        a, b = m.latent_spectrum.kl_target_to_latent, sd.latent_spectrum.kl_target_to_latent
        sa = m.kl_bootstrap.std if m.kl_bootstrap else None
        sb = sd.kl_bootstrap.std if sd.kl_bootstrap else None
        z, verdict = compare(a, sa, b, sb)
        rows.append(_row("C2", f"{m.dataset}, {m.config}, {m.latent_spectrum.grid[0]}x{m.latent_spectrum.grid[1]} "
                               f"latents, {m.n} held-out images",
                         f"{m.name}: {_fmt(a, sa)}; {sd.name}: {_fmt(b, sb)} (ratio {a / b:.3g})", z, verdict))
    return rows


def decoding(inputs, names: list[str]) -> list[dict[str, Any]]:
    aes = {a: inputs.ae_eval[a] for a in names}
    rows = []
    for m, sd in _pairs(aes, ("dsm", "esm_dsm")):
        ks = sorted(set(m.lowpass) & set(sd.lowpass))
        if not ks:
            continue
        k = ks[-1]
        a, b = m.lowpass[k], sd.lowpass[k]
        sa = m.lowpass_bootstrap[k].std if m.lowpass_bootstrap else None
        sb = sd.lowpass_bootstrap[k].std if sd.lowpass_bootstrap else None
        z, verdict = compare(a, sa, b, sb)
        others = "; ".join(f"k={j}: {m.lowpass[j]:.4g} vs {sd.lowpass[j]:.4g}" for j in ks[:-1])
        rows.append(_row("C3", f"{m.dataset}, {m.config}, {m.n} held-out images, {m.distance_name} between LP_k(x) "
                               "and Dec(LP_k(mu))",
                         f"k={k}: {m.name} {_fmt(a, sa)}; {sd.name} {_fmt(b, sb)}" + (f" ({others})" if others else ""),
                         z, verdict))
    return rows


def _learned(r: dict[str, Any]) -> bool | None:
    """Whether a run's distance beats its untrained network's by 2 standard errors (None: no
    baseline)."""
    u = r.get("untrained")
    if u is None or (isinstance(u, float) and math.isnan(u)):
        return None
    z, _ = compare(r["value"], _std(r.get("value_std")), u, _std(r.get("untrained_std")))
    return z is not None and z > Z


def _side_learned(side: list[dict[str, Any]]) -> bool | None:
    """Whether a side's runs, pooled over their training seeds, beat their untrained networks
    (each of its own seed, pooled the same way) by 2 standard errors: `_learned` of one run, the
    mean over seeds otherwise, so that a seed that learned little is weighed with the others
    instead of vetoing the side (None: no baseline)."""
    if len(side) == 1:
        return _learned(side[0])
    base = [r for r in side if r.get("untrained") is not None and not pd.isna(r.get("untrained"))]
    if len(base) < len(side):
        return None if not base else False
    trained = _pooled(side)
    untrained = _pooled([{"value": r["untrained"], "value_std": r.get("untrained_std")} for r in side])
    z, _ = compare(trained[0], trained[1], untrained[0], untrained[1])
    return z is not None and z > Z


_PROTOCOL_KEYS = ("model", "process", "trained_steps", "sampler", "steps", "cfg_scale", "cfg_interval", "n_samples",
                  "metric", "protocol")


def _same_protocol(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a[k] == b[k] for k in _PROTOCOL_KEYS)


# Besides the protocol (`_same_protocol`), what the runs of one side share: only their training
# seed (and run name) differs.
_SIDE_KEYS = ("autoencoder", "alignment", "weights", "dataset")


def _sides(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The rows grouped into sides, in order of first appearance: the runs that differ only in their
    training seed, ordered by seed (unknown seeds last, each run a seed of its own). A row repeated
    (the same run and sample set) counts once; a group that repeats a seed (or holds two sample
    sets of one run of unknown seed) holds rows that are not seed replicates, and each of them is a
    side of its own."""
    groups: list[list[dict[str, Any]]] = []
    for r in rows:
        g = next((g for g in groups if all(g[0].get(k) == r.get(k) for k in _PROTOCOL_KEYS + _SIDE_KEYS)), None)
        if g is None:
            groups.append([r])
        elif not any(o is r or (o["diffusion"], o.get("samples")) == (r["diffusion"], r.get("samples")) for o in g):
            g.append(r)
    sides = []
    for g in groups:
        # An unknown seed is a seed of its own, but two sample sets of one run are not two seeds.
        seeds = [train_seed(r) if train_seed(r) is not None else ("run", r["diffusion"]) for r in g]
        if len(set(seeds)) < len(seeds):
            sides += [[r] for r in g]
        else:
            sides.append(sorted(g, key=lambda r: (train_seed(r) is None, train_seed(r) or 0)))
    return sides


def _pooled(side: list[dict[str, Any]]) -> tuple[float, float | None]:
    """(mean, standard error) of a side: sqrt(sum s_i^2 / n^2 + var_seed / n) (module docstring)."""
    v = [float(r["value"]) for r in side]
    s = [_std(r.get("value_std")) for r in side]
    if len(side) == 1:
        return v[0], s[0]
    n = len(v)
    mean = float(np.mean(v))
    if any(x is None for x in s):
        return mean, None
    return mean, math.sqrt(sum(x * x for x in s) / n ** 2 + float(np.var(v, ddof=1)) / n)


def _side_text(side: list[dict[str, Any]], mean: float, se: float | None) -> str:
    if len(side) == 1:
        return f"{side[0]['diffusion']}: {_fmt(mean, se)}"
    names = ", ".join(dict.fromkeys(r["diffusion"] for r in side))
    each = ", ".join(_fmt(r["value"], _std(r.get("value_std"))) for r in side)
    return f"{names} ({len(side)} seeds: {each}; mean {_fmt(mean, se)})"


def _seeds_text(cand: list[dict[str, Any]], base: list[dict[str, Any]]) -> str:
    nc, nb = len(cand), len(base)
    if nc == nb:
        return f"{nc} training seeds" if nc > 1 else "1 training seed (seed spread not measured)"
    one = cand[0]["diffusion"] if nc == 1 else base[0]["diffusion"]
    return (f"{nc} and {nb} training seeds" + (f" (seed spread of {one} not measured)" if min(nc, nb) == 1 else ""))


def _generation(cid: str, cand_side: list[dict[str, Any]], base_side: list[dict[str, Any]]) -> dict[str, Any]:
    """The claim row of two sides (module docstring: each the runs of one setting over their
    training seeds)."""
    cand = cand_side[0]
    setting = (f"{cand['model']} {cand['trained_steps']} steps, {cand['sampler']} {cand['steps']} steps, cfg "
               f"{cand['cfg_scale']:g}, {int(cand['n_samples'])} samples, {cand['metric']} ({cand['protocol']}), "
               + _seeds_text(cand_side, base_side))
    a, sa = _pooled(cand_side)
    b, sb = _pooled(base_side)
    evidence = f"{_side_text(cand_side, a, sa)}; {_side_text(base_side, b, sb)}"
    for r in cand_side + base_side:
        if r.get("untrained") is not None and not pd.isna(r.get("untrained")):
            evidence += f" [{r['diffusion']} untrained: {r['untrained']:.4g}]"
    if False in (_side_learned(cand_side), _side_learned(base_side)):
        return _row(cid, setting, evidence, None, "not resolved: the runs did not learn at this length (a distance "
                                                  "not below its untrained network's)")
    z, verdict = compare(a, sa, b, sb)
    return _row(cid, setting, evidence, z, verdict)


def diffusability(gen_rows: list[dict[str, Any]], evals: dict[str, Any]) -> list[dict[str, Any]]:
    """C4 and C4c from E1/E2 rows: each run on ESM/DSM latents against the run on SD-VAE latents
    (C4) and on the control's (C4c) of the same dataset under the same protocol (`evals`:
    autoencoder -> its `eval-ae` record), each side pooled over its training seeds (`_sides`). A C4
    row whose SD-VAE does not establish the premise reads NOT_TESTED; a verdict notes a
    reconstruction more than RECON_GAP_DB worse."""
    rows = []
    sides = _sides(gen_rows)
    for cid, base_variant in (("C4", "sdvae"), ("C4c", "ae")):
        base = [s for s in sides if s[0]["autoencoder"] in evals and evals[s[0]["autoencoder"]].variant == base_variant]
        for c in sides:
            m = evals.get(c[0]["autoencoder"])
            if m is None or m.variant not in ("esm", "dsm", "esm_dsm"):
                continue
            for b in base:
                sd = evals[b[0]["autoencoder"]]
                if sd.dataset != m.dataset or not _same_protocol(c[0], b[0]):
                    continue
                row = _generation(cid, c, b)
                if cid == "C4" and not (_premise_z(sd) or 0.0) > Z:
                    row["verdict"] = f"{NOT_TESTED} (C4-premise of {sd.name} not supported)"
                gap = sd.psnr - m.psnr
                if gap > RECON_GAP_DB:
                    row["verdict"] += f"; confounded: {m.name} reconstructs {gap:.1f} dB worse (PSNR) than {sd.name}"
                rows.append(row)
    return rows


def alignment(e3_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """C5 (repa vs none) and C6 (dog vs irepa and vs repa) from E3 rows of the same protocol, each
    side pooled over its training seeds (`_sides`)."""
    rows = []
    by_kind: dict[str, list[list[dict[str, Any]]]] = {}
    for s in _sides(e3_rows):
        by_kind.setdefault(str(s[0]["alignment"]).split(" ")[0], []).append(s)  # 'dog (encoder, ...)' -> dog
    for cid, cand, base in (("C5", "repa", "none"), ("C6", "dog", "irepa"), ("C6", "dog", "repa")):
        for a in by_kind.get(cand, []):
            for b in by_kind.get(base, []):
                if _same_protocol(a[0], b[0]):
                    rows.append(_generation(cid, a, b))
    return rows


def table(inputs, runs: dict[str, dict[str, list[str]]], gen_e12: list[dict[str, Any]],
          gen_e3: list[dict[str, Any]]) -> pd.DataFrame:
    """Every claim row of this report, in claim order."""
    aes = list(dict.fromkeys(runs["E1"]["autoencoders"] + runs["E2"]["autoencoders"] + runs["E4"]["autoencoders"]))
    rows = (frequency_bias(inputs, list(inputs.band_error)) + power_law(inputs, runs["E4"]["datasets"])
            + encoding(inputs, aes) + decoding(inputs, aes)
            + premise(inputs, aes) + diffusability(gen_e12, {a: inputs.ae_eval[a] for a in aes})
            + alignment(gen_e3))
    return pd.DataFrame(rows, columns=["claim", "statement", "setting", "evidence", "z", "verdict"])
