"""`specmatch eval-ae`: reconstruction and spectral metrics of a trained autoencoder (docs/method.md §4, 5, 8).

One pass over the held-out split with deterministic reconstructions (the posterior mean):
- rFID (FD with the configured feature net: "rFD-EffNetLite0" on the embedded default), PSNR on
  uint8, SSIM, LPIPS-VGG (metrics.recon.ReconAccumulator);
- low-pass rFID for every k of `lowpass_ks` > 0: FD between LP_k(x) and Dec(LP_k(mu)), the
  DSM diagnostic (images clamped to [-1, 1] and rounded to uint8 before the feature net, as any
  image is);
- the latent's spectrum distribution (training setting) against the image's delta-tilted target
  at the latent grid: the mean distributions, KL(target || latent) of the means, the mean
  per-image ESM loss, and the PSD exponents of the latent and of the target;
- the same for the latents a diffusion model is trained on, posterior samples z = mu + sigma * eps
  (one draw per image, seeded by the evaluation seed and the batch): a posterior whose noise is
  large against the spread of mu flattens the spectrum the diffusion model sees, which the
  mean's spectrum does not show (docs/method.md §8, "the latents the diffusion model sees");
  and the posterior noise against the signal, sigma_rms / std(mu) over all latent elements;
- the first `n_reconstructions` held-out images with their reconstructions (reconstructions.npz,
  uint8, and reconstructions.png: originals above reconstructions), for the report's figures.
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
from tqdm import tqdm

from .. import config as config_mod
from .. import spectral
from ..data.shards import iter_image_batches, read_manifest
from ..errors import SpecmatchError
from ..metrics import bootstrap, features
from ..metrics.bootstrap import Bootstrap
from ..metrics.fid import extract, frechet_distance, statistics
from ..runtime.distributed import resolve_device
from ..metrics.recon import ReconAccumulator, load_lpips
from ..runtime import atomic, seeding
from ..runtime.hashing import ImageStreamHash
from ..runtime.jsonfile import get_key, read_json
from ..runtime.provenance import Provenance
from . import artifact
from .model import to_float, to_uint8

log = logging.getLogger(__name__)

FILE = "metrics.json"
RECONSTRUCTIONS = "reconstructions.npz"
RECONSTRUCTIONS_FIGURE = "reconstructions.png"
SPECTRUM_FIGURE = "latent_spectrum.png"


@dataclass(frozen=True)
class LatentSpectrum:
    """The latents' spectrum distribution (training setting: centred, DC removed) against the
    image's delta-tilted target on the latent grid, over the evaluated images."""

    grid: tuple[int, int]
    n_bins: int
    delta: float
    valid_bins: list[bool]
    latent_distribution: list[float]
    target_distribution: list[float]
    kl_target_to_latent: float
    esm_loss_mean: float
    psd_exponent: float
    target_exponent: float


@dataclass(frozen=True)
class SampledLatents:
    """What the diffusion model is trained on: one posterior sample per evaluated image. Their
    spectrum distribution, KL(target || sampled) and PSD exponent (training setting, the target
    of `LatentSpectrum`), and the posterior noise against the signal: `sigma_rms` = sqrt(mean
    sigma^2), `mu_std` = std(mu), both over all latent elements, `noise_to_signal` their ratio.
    `psd_exponent` is the slope of the mean distribution, as `LatentSpectrum.target_exponent`
    is of the target's, so that the two compare (`LatentSpectrum.psd_exponent`, of mu, is
    fitted to the mean band energies)."""

    distribution: list[float]
    kl_target_to_latent: float
    psd_exponent: float
    sigma_rms: float
    mu_std: float
    noise_to_signal: float


@dataclass(frozen=True)
class AEEvaluation:
    """An `eval-ae` output, read back. `distance_name` is the reconstruction distance's metric
    (`rFID` for the standard Inception, `rFD-<net>` otherwise), `distance` its value; `lowpass`
    maps each k > 0 to the distance between LP_k(x) and Dec(LP_k(mu)); `protocol`: split,
    n_images, images_sha256, weights (ema/raw), feature_net, metric, weights_sha256, lpips."""

    name: str
    autoencoder: str
    variant: str
    config: str
    dataset: str
    n: int
    psnr: float
    ssim: float
    lpips: float | None
    distance_name: str
    distance: float
    lowpass: dict[int, float]
    latent_spectrum: LatentSpectrum
    sampled: SampledLatents
    protocol: dict[str, Any]
    folder: Path
    objective: dict[str, Any]  # the trained objective's fields (autoencoder.objectives.Objective)
    # Half-sample bootstrap over the evaluated images (eval.bootstrap redraws; None when off).
    distance_bootstrap: Bootstrap | None = None
    lowpass_bootstrap: dict[int, Bootstrap] | None = None
    kl_bootstrap: Bootstrap | None = None
    # Of the sampled latents: KL(target || sampled), and their PSD exponent minus the target's
    # (positive: flatter than the target, the "over-noisy" latents of docs/method.md §8).
    sampled_kl_bootstrap: Bootstrap | None = None
    sampled_flatness_bootstrap: Bootstrap | None = None

    @property
    def reconstructions(self) -> Path:
        return self.folder / RECONSTRUCTIONS


def _read_bootstrap(m: dict[str, Any], key: str) -> dict[str, Any]:
    b = m.get("bootstrap")
    if not b:
        return {}
    return {"distance_bootstrap": Bootstrap.from_json(b[key]),
            "lowpass_bootstrap": {int(k): Bootstrap.from_json(v) for k, v in b["lowpass"].items()},
            "kl_bootstrap": Bootstrap.from_json(b["kl_target_to_latent"]),
            "sampled_kl_bootstrap": Bootstrap.from_json(b["sampled_kl_target_to_latent"]),
            "sampled_flatness_bootstrap": Bootstrap.from_json(b["sampled_exponent_minus_target"])}


def distance_name(metric: str) -> str:
    """The reconstruction distance's key: `r` + the feature net's metric name (rFID, rFD-...)."""
    return "r" + metric


def read(folder: str | Path) -> AEEvaluation:
    """The record of an `eval-ae` output folder; an error names the file and the missing key."""
    folder = Path(folder)
    path = folder / FILE
    what = "a `specmatch eval-ae` output"
    m = read_json(path, f"{path}: missing (expected {what})")

    def get(key: str):
        return get_key(m, key, path, what)

    key = distance_name(get("protocol.metric"))
    try:
        return AEEvaluation(
            name=get("name"), autoencoder=get("autoencoder"), variant=get("variant"), config=get("config"),
            dataset=get("dataset"), n=int(get("n")), psnr=float(get("psnr")), ssim=float(get("ssim")),
            lpips=None if m.get("lpips") is None else float(m["lpips"]), distance_name=key,
            distance=float(get(key)), lowpass={int(k): float(v) for k, v in get("lowpass").items()},
            latent_spectrum=LatentSpectrum(
                grid=tuple(int(v) for v in get("latent_spectrum.grid")), n_bins=int(get("latent_spectrum.n_bins")),
                delta=float(get("latent_spectrum.delta")), valid_bins=list(get("latent_spectrum.valid_bins")),
                latent_distribution=list(get("latent_spectrum.latent_distribution")),
                target_distribution=list(get("latent_spectrum.target_distribution")),
                kl_target_to_latent=float(get("latent_spectrum.kl_target_to_latent")),
                esm_loss_mean=float(get("latent_spectrum.esm_loss_mean")),
                psd_exponent=float(get("latent_spectrum.psd_exponent")),
                target_exponent=float(get("latent_spectrum.target_exponent"))),
            sampled=SampledLatents(
                distribution=list(get("sampled_latents.distribution")),
                kl_target_to_latent=float(get("sampled_latents.kl_target_to_latent")),
                psd_exponent=float(get("sampled_latents.psd_exponent")),
                sigma_rms=float(get("sampled_latents.sigma_rms")), mu_std=float(get("sampled_latents.mu_std")),
                noise_to_signal=float(get("sampled_latents.noise_to_signal"))),
            protocol=dict(get("protocol")), folder=folder, objective=dict(get("objective")),
            **_read_bootstrap(m, key))
    except (TypeError, ValueError, KeyError) as e:
        raise SpecmatchError(f"{path}: not {what} ({type(e).__name__}: {e})") from None


def evaluate(run: dict[str, Any], ae_dir: str | Path, dataset: str | Path, name: str, out: str | Path) -> dict[str, Any]:
    run = config_mod.validate(run, "ae_run", where="autoencoder run", source=f"parameters of {name}")
    e = run["eval"]
    dev = resolve_device(e["device"])
    dataset, out = Path(dataset), Path(out)
    man = read_manifest(dataset)
    if e["split"] not in man["splits"] or man["splits"][e["split"]]["count"] < 2:
        raise SpecmatchError(f"{dataset}: eval.split {e['split']!r} needs at least 2 images")
    ae, summary = artifact.load(ae_dir, e["use_ema"], dev)
    net = features.load(e["net"], dev, run["resources_dir"])
    lpips = load_lpips(dev, run["resources_dir"]) if e["lpips"] else None
    acc = ReconAccumulator(lpips, net, dev)
    ks = sorted({int(k) for k in e["lowpass_ks"] if k > 0})
    blk = 8
    lp_feats: dict[int, dict[str, list[np.ndarray]]] = {k: {"real": [], "recon": []} for k in ks}
    p_lat, p_tgt, esm, energies = [], [], [], []
    p_smp = []
    noise = torch.zeros(4, dtype=torch.float64)  # elements, sum sigma^2, sum mu, sum mu^2
    hasher = None
    n_bins, delta = e["n_bins"], e["delta"]
    shown: dict[str, list[np.ndarray]] = {"originals": [], "reconstructions": []}
    n_shown = 0
    with torch.no_grad():
        batches = iter_image_batches(dataset, e["split"], e["batch_size"], e["max_images"], e["seed"])
        for i_batch, images in enumerate(tqdm(batches, desc=f"eval-ae {name}", unit="batch")):
            if hasher is None:
                hasher = ImageStreamHash(images.shape[1:])
            hasher.update(images)
            x = to_float(images, dev)
            posterior = ae.encode(x)
            mu = posterior.mean
            draw = torch.Generator(device=dev).manual_seed(seeding.step_seed(e["seed"], i_batch, "eval-posterior"))
            z = posterior.sample(draw).float()
            noise += torch.stack([torch.tensor(float(mu.numel())), posterior.var.double().sum().cpu(),
                                  mu.double().sum().cpu(), mu.double().pow(2).sum().cpu()])
            recon = to_uint8(ae.decode(mu))
            acc.add(images, recon)
            take = min(len(images), e["n_reconstructions"] - n_shown)
            if take > 0:
                shown["originals"].append(np.asarray(images[:take]))
                shown["reconstructions"].append(recon[:take])
                n_shown += take
            for k in ks:
                if mu.shape[-1] % blk or x.shape[-1] % blk:
                    raise SpecmatchError(f"low-pass rFID: image {x.shape[-1]} px and latent {mu.shape[-1]} "
                                         f"do not tile into {blk}x{blk} blocks; drop eval.lowpass_ks")
                lp_x = to_uint8(spectral.block_lowpass(x, k, blk))
                lp_r = to_uint8(ae.decode(spectral.block_lowpass(mu, k, blk)))
                for key, imgs in (("real", lp_x), ("recon", lp_r)):
                    lp_feats[k][key].append(extract(imgs, net, len(imgs), dev, progress=False).pool)
            h, w = mu.shape[-2:]
            e_z = spectral.band_energies(mu.float(), n_bins, **spectral.TRAINING)
            e_x = spectral.image_band_energies(x, (h, w), n_bins)
            p_lat.append(spectral.distribution_from_energies(e_z).double().cpu())
            p_tgt.append(spectral.distribution_from_energies(spectral.delta_tilt(e_x, delta)).double().cpu())
            energies.append(e_z.double().cpu())
            p_smp.append(spectral.distribution_from_energies(
                spectral.band_energies(z, n_bins, **spectral.TRAINING)).double().cpu())
            # esm_loss is the batch mean of the per-image KLs: weight it by the batch size.
            esm.append(float(spectral.esm_loss(x, mu.float(), delta, n_bins)) * len(x))
    if hasher is None:
        raise SpecmatchError(f"{dataset}: split {e['split']!r} has no images")
    rec = acc.summary()
    valid = spectral.bin_counts(h, w, n_bins) > 0
    pz, px, ps = torch.cat(p_lat).mean(0), torch.cat(p_tgt).mean(0), torch.cat(p_smp).mean(0)
    n_el, s_var, s_mu, s_mu2 = noise.tolist()
    sigma_rms, mu_std = math.sqrt(s_var / n_el), math.sqrt(max(s_mu2 / n_el - (s_mu / n_el) ** 2, 0.0))
    metric = net.spec.metric
    result = {
        "name": name, "autoencoder": summary["name"], "variant": summary["variant"], "config": summary["config"]["name"],
        "dataset": man["name"], "objective": summary["objective"],
        **rec,
        "lowpass": {str(k): frechet_distance(*_stats(lp_feats[k]["real"]), *_stats(lp_feats[k]["recon"]))
                    for k in ks},
        "lowpass_metric": f"r{metric} between LP_k(x) and Dec(LP_k(mu))",
        "latent_spectrum": {
            "grid": [int(h), int(w)], "n_bins": n_bins, "delta": delta, "valid_bins": valid.tolist(),
            "latent_distribution": pz.tolist(), "target_distribution": px.tolist(),
            "kl_target_to_latent": float(spectral.kl_divergence(px, pz, valid)),
            "esm_loss_mean": sum(esm) / rec["n"],
            "psd_exponent": float(spectral.psd_slope(torch.cat(energies).mean(0), valid)[0]),
            "target_exponent": float(spectral.psd_slope(px, valid)[0]),
        },
        "sampled_latents": {
            "draw": "z = mu + sigma * eps, one draw per image",
            "distribution": ps.tolist(), "kl_target_to_latent": float(spectral.kl_divergence(px, ps, valid)),
            "psd_exponent": float(spectral.psd_slope(ps, valid)[0]),
            "sigma_rms": sigma_rms, "mu_std": mu_std,
            "noise_to_signal": sigma_rms / mu_std if mu_std > 0 else math.inf,
        },
        "protocol": {"split": e["split"], "n_images": rec["n"], "images_sha256": hasher.hexdigest(),
                     "reconstruction": "posterior mean (deterministic)", "weights": "ema" if (
                         e["use_ema"] and summary.get("ema")) else "raw",
                     "feature_net": net.spec.name, "metric": metric, "weights_sha256": net.weights_sha256,
                     "lpips": None if lpips is None else {"vgg_sha256": lpips.vgg_sha256,
                                                          "heads_sha256": lpips.heads_sha256}},
    }
    if e["bootstrap"]:
        result["bootstrap"] = _bootstraps(e["bootstrap"], e["seed"], metric, acc, lp_feats, p_tgt, p_lat, valid,
                                          p_smp)
    prov = Provenance("eval-ae", name, run, seeds={"eval": e["seed"]})
    prov.add_input(ae_dir, "autoencoder")
    prov.add_input(dataset, "dataset")
    prov.add_input(net.weights_path, f"weights:{net.spec.name}", net.weights_sha256)
    prov.protocol = result["protocol"]
    with atomic.atomic_dir(out) as tmp:
        (tmp / FILE).write_text(json.dumps(result, indent=1) + "\n")
        _figure(result, tmp / SPECTRUM_FIGURE)
        if n_shown:
            _reconstructions({k: np.concatenate(v) for k, v in shown.items()}, result, tmp)
        prov.write(out, tmp)
    log.info("eval-ae %s: %s", name, {k: result[k] for k in result if k not in ("latent_spectrum", "protocol")})
    return result


def _bootstraps(n_boot: int, seed: int, metric: str, acc: ReconAccumulator, lp_feats, p_tgt, p_lat,
                valid, p_smp) -> dict[str, Any]:
    """Half-sample bootstraps over the evaluated images (metrics.bootstrap): the reconstruction
    distance and each low-pass distance (image i with its own reconstruction on both sides),
    KL(target || latent) of the mean distributions for mu and for the sampled latents, and the
    sampled latents' PSD exponent minus the target's."""
    real, recon = (np.concatenate(acc.feats[k]) for k in ("real", "recon"))
    px, pz, ps = torch.cat(p_tgt), torch.cat(p_lat), torch.cat(p_smp)

    def kl(idx, latent=pz) -> float:
        i = torch.as_tensor(np.asarray(idx))
        return float(spectral.kl_divergence(px[i].mean(0), latent[i].mean(0), valid))

    def flatness(idx) -> float:
        i = torch.as_tensor(np.asarray(idx))
        return float(spectral.psd_slope(ps[i].mean(0), valid)[0] - spectral.psd_slope(px[i].mean(0), valid)[0])

    return {distance_name(metric): bootstrap.paired(real, recon, n_boot, seed).to_json(),
            "lowpass": {str(k): bootstrap.paired(np.concatenate(f["real"]), np.concatenate(f["recon"]), n_boot,
                                                 seed).to_json() for k, f in lp_feats.items()},
            "kl_target_to_latent": bootstrap.of_statistic(len(px), kl, n_boot, seed).to_json(),
            "sampled_kl_target_to_latent": bootstrap.of_statistic(len(px), lambda i: kl(i, ps), n_boot,
                                                                  seed).to_json(),
            "sampled_exponent_minus_target": bootstrap.of_statistic(len(px), flatness, n_boot, seed).to_json()}


def _stats(chunks: list[np.ndarray]):
    s = statistics(np.concatenate(chunks))
    return s.mu, s.sigma



def _reconstructions(arrays: dict[str, np.ndarray], result: dict[str, Any], tmp: Path) -> None:
    """reconstructions.npz (uint8 originals and reconstructions, in the split's evaluation order)
    and reconstructions.png: rows of originals, each above the row of their reconstructions."""
    from ..render.figures import image_grid

    np.savez(tmp / RECONSTRUCTIONS, **arrays)
    cols = min(8, len(arrays["originals"]))
    rows = []
    for i in range(0, len(arrays["originals"]), cols):
        for key in ("originals", "reconstructions"):
            row = arrays[key][i:i + cols]
            blank = np.full((cols - len(row),) + row.shape[1:], 255, np.uint8)  # keep the pairs aligned
            rows.append(np.concatenate([row, blank]))
    image_grid(np.concatenate(rows), tmp / RECONSTRUCTIONS_FIGURE, columns=cols,
               title=f"{result['name']} ({result['variant']}): originals above reconstructions (posterior mean)")


def _figure(result: dict[str, Any], path: Path) -> None:
    from ..render.figures import latent_spectrum_figure

    latent_spectrum_figure(result, path)
