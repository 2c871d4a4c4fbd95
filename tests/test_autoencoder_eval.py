"""`eval-ae` and `extract-latents` on a micro autoencoder trained for two steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from specmatch import spectral
from specmatch.autoencoder import artifact, evaluate, latents, train
from specmatch.autoencoder import model as ae_model
from specmatch.autoencoder.model import DiagonalGaussian
from specmatch.data.prepare import prepare
from specmatch.errors import SpecmatchError
from specmatch.metrics import recon

from conftest import load_split

MICRO = {"name": "micro", "channels": [8, 16], "z_channels": 4, "num_res_blocks": 1, "norm_groups": 4}
RUN = {"dataset": "embedded", "config": MICRO, "variant": "sdvae",
       "train": {"steps": 2, "batch_size": 4, "device": "cpu", "ema_decay": 0.0, "log_every": 1},
       "loss": {"lpips_weight": 0.0},
       "eval": {"net": "efficientnet-lite0", "lpips": False, "batch_size": 5, "device": "cpu",
                "lowpass_ks": [0, 8]},
       "latents": {"batch_size": 7, "shard_size": 10, "device": "cpu"}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("aeeval")
    data = root / "embedded"
    prepare({"source": "embedded", "resolution": 32, "seed": 0, "n_train": 12, "n_test": 9, "shard_size": 8},
            "embedded", data)
    train.train(RUN, data, root / "run", root / "ae", "micro")
    return data, root / "ae"


def test_eval_metrics_against_independent_recomputation(tmp_path, trained):
    data, ae_dir = trained
    res = evaluate.evaluate(RUN, ae_dir, data, "micro", tmp_path / "ev")
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == ["latent_spectrum.png", "metrics.json",
                                                                   "provenance.json", "reconstructions.npz",
                                                                   "reconstructions.png"]
    ae, _ = artifact.load(ae_dir, use_ema=False)
    images, _ = load_split(data, "test")
    with torch.no_grad():
        x = evaluate.to_float(images, "cpu")
        mu = ae.encode(x).mean
        rec = ae_model.to_uint8(ae.decode(mu))
    assert res["n"] == 9
    # Batches of 5 there, 9 here: convolution rounding may flip a pixel's uint8 rounding.
    assert res["psnr"] == pytest.approx(float(recon.psnr(images, rec).mean()), rel=1e-4)
    assert res["ssim"] == pytest.approx(float(recon.ssim(images, rec).mean()), rel=1e-4)
    assert "rFD-EffNetLite0" in res and "rFID" not in res and set(res["lowpass"]) == {"8"}
    s = res["latent_spectrum"]
    valid = torch.tensor(s["valid_bins"])
    p_z = spectral.distribution_from_energies(spectral.band_energies(mu, 16, **spectral.TRAINING)).double().mean(0)
    np.testing.assert_allclose(s["latent_distribution"], p_z.numpy(), rtol=1e-5, atol=1e-7)
    kl = spectral.kl_divergence(torch.tensor(s["target_distribution"]), torch.tensor(s["latent_distribution"]), valid)
    assert s["kl_target_to_latent"] == pytest.approx(float(kl), rel=1e-5)
    per_image = [float(spectral.esm_loss(x[i:i + 1], mu[i:i + 1])) for i in range(len(x))]
    assert s["esm_loss_mean"] == pytest.approx(float(np.mean(per_image)), rel=1e-4)
    assert res["protocol"]["reconstruction"].startswith("posterior mean")
    # The bootstrap (default 20 half-sample redraws) goes with every number, and reads back typed.
    b = res["bootstrap"]
    assert b["rFD-EffNetLite0"]["n"] == 20 and set(b["lowpass"]) == {"8"}
    rec_ = evaluate.read(tmp_path / "ev")
    assert rec_.kl_bootstrap.std == b["kl_target_to_latent"]["std"] > 0
    assert rec_.distance_bootstrap.std > 0 and rec_.lowpass_bootstrap[8].n == 20
    assert rec_.kl_bootstrap.low < s["kl_target_to_latent"] < rec_.kl_bootstrap.high


def test_eval_bad_inputs(tmp_path, trained):
    data, ae_dir = trained
    with pytest.raises(SpecmatchError, match="autoencoder.json"):
        evaluate.evaluate(RUN, tmp_path, data, "x", tmp_path / "ev")
    with pytest.raises(SpecmatchError, match="not a prepared dataset"):
        evaluate.evaluate(RUN, ae_dir, tmp_path, "x", tmp_path / "ev")
    with pytest.raises(SpecmatchError, match="eval.batch_size"):
        evaluate.evaluate({**RUN, "eval": {**RUN["eval"], "batch_size": 0}}, ae_dir, data, "x", tmp_path / "ev")
    assert not (tmp_path / "ev").exists()


def test_latent_cache_entries_and_flips(tmp_path, trained):
    data, ae_dir = trained
    man = latents.extract(RUN, ae_dir, data, "micro", tmp_path / "lat")
    assert man["count"] == 24 and man["images"] == 12 and [s["count"] for s in man["shards"]] == [10, 10, 4]
    parts = [np.load(tmp_path / "lat" / s["file"]) for s in man["shards"]]
    mu = np.concatenate([p["mu"] for p in parts])
    flip = np.concatenate([p["flip"] for p in parts])
    index = np.concatenate([p["index"] for p in parts])
    assert flip.tolist() == [False] * 12 + [True] * 12 and index.tolist() == list(range(12)) * 2
    ae, _ = artifact.load(ae_dir, use_ema=False)
    images, labels = load_split(data, "train")
    with torch.no_grad():
        x = evaluate.to_float(images, "cpu")
        np.testing.assert_allclose(mu[:12], ae.encode(x).mean.numpy(), atol=1e-5)
        np.testing.assert_allclose(mu[12:], ae.encode(x.flip(-1)).mean.numpy(), atol=1e-5)
    assert np.concatenate([p["labels"] for p in parts]).tolist() == labels.tolist() * 2
    assert json.loads((tmp_path / "lat" / "manifest.json").read_text())["scale_factor"] == man["scale_factor"]


class _KnownPosterior(torch.nn.Module):
    """Encodes every image to mu = 0.3, sigma = 2: posterior samples are N(0.3, 4)."""

    def encode(self, x):
        b = x.shape[0]
        moments = torch.cat([torch.full((b, 4, 16, 16), 0.3), torch.full((b, 4, 16, 16), float(np.log(4.0)))], 1)
        return DiagonalGaussian(moments)


def test_scale_factor_on_a_known_distribution(tmp_path, trained, monkeypatch):
    data, ae_dir = trained
    summary = json.loads((ae_dir / "autoencoder.json").read_text())
    summary["config"]["channels"] = [8, 16]
    monkeypatch.setattr(latents.artifact, "load", lambda *a, **k: (_KnownPosterior(), summary))
    man = latents.extract(RUN, ae_dir, data, "known", tmp_path / "lat")
    n = 24 * 4 * 16 * 16   # elements: std error of the std ~ 2 / sqrt(2n) ~ 0.006
    assert man["scale_elements"] == n
    assert man["latent_mean"] == pytest.approx(0.3, abs=0.05)
    assert man["latent_std"] == pytest.approx(2.0, abs=0.03)
    assert man["scale_factor"] == pytest.approx(1 / man["latent_std"], rel=1e-12)
    capped = latents.extract({**RUN, "latents": {**RUN["latents"], "scale_samples": 5}}, ae_dir, data, "known",
                             tmp_path / "lat5")
    assert capped["scale_elements"] == 5 * 4 * 16 * 16


class _NoisyPosterior(torch.nn.Module):
    """mu a fixed smooth field of std 0.05, sigma = 1: the samples are white noise to within 0.3%."""

    def encode(self, x):
        b = x.shape[0]
        ramp = torch.linspace(-1, 1, 16)
        mu = 0.05 * (ramp[None, :] + ramp[:, None]).expand(b, 4, 16, 16) / (ramp[None, :] + ramp[:, None]).std(correction=0)
        return DiagonalGaussian(torch.cat([mu, torch.zeros(b, 4, 16, 16)], 1))

    def decode(self, z):
        return torch.zeros(len(z), 3, 32, 32)


def test_sampled_latents_of_a_posterior_dominated_by_its_noise(tmp_path, trained, monkeypatch):
    """The latents the diffusion model sees are posterior samples: with sigma 20 times the spread
    of mu they are white noise, whose spectrum distribution is flat (equal mean power in every
    band; band 0 has its DC cell zeroed), while mu's is steep. The noise-to-signal ratio is
    sigma_rms / std(mu) = 1 / 0.05 exactly."""
    data, ae_dir = trained
    summary = json.loads((ae_dir / "autoencoder.json").read_text())
    monkeypatch.setattr(evaluate.artifact, "load", lambda *a, **k: (_NoisyPosterior(), summary))
    res = evaluate.evaluate({**RUN, "eval": {**RUN["eval"], "lowpass_ks": [0]}}, ae_dir, data, "noisy",
                            tmp_path / "ev")
    s = res["sampled_latents"]
    assert s["sigma_rms"] == pytest.approx(1.0, rel=1e-9) and s["mu_std"] == pytest.approx(0.05, rel=1e-5)
    assert s["noise_to_signal"] == pytest.approx(20.0, rel=1e-5)
    counts = spectral.bin_counts(16, 16).double()
    flat = torch.where(counts > 0, 1.0, 0.0)
    flat[0] = (counts[0] - 1) / counts[0]
    flat = (flat / flat.sum()).numpy()
    # 9 images x 4 channels: a band of c cells is a mean of 36 c squared normals (sd sqrt(2 / 36 c)).
    sd = np.sqrt(2 / (36 * counts.clamp_min(1).numpy()))
    valid = counts.numpy() > 0
    assert np.all(np.abs(np.asarray(s["distribution"])[valid] / flat[valid] - 1) < 4 * sd[valid] + 0.05)
    assert abs(s["psd_exponent"]) < 0.1 < abs(res["latent_spectrum"]["psd_exponent"])
    rec = evaluate.read(tmp_path / "ev")
    assert rec.sampled.noise_to_signal == s["noise_to_signal"] and rec.sampled_flatness_bootstrap.n == 20
    # Flatter than the image target (a negative exponent): the premise of ESM holds for these latents.
    assert rec.sampled.psd_exponent - rec.latent_spectrum.target_exponent > 0
    b = rec.sampled_flatness_bootstrap
    assert (b.low + b.high) / 2 == pytest.approx(rec.sampled.psd_exponent - rec.latent_spectrum.target_exponent)


@pytest.mark.slow
def test_latent_cache_same_with_two_processes(tmp_path, trained):
    """torchrun with 2 gloo processes writes the cache one process writes (shards round-robin,
    noise seeded per entry), scale factor included."""
    import os
    import socket
    import subprocess
    import sys

    data, ae_dir = trained
    one = latents.extract(RUN, ae_dir, data, "micro", tmp_path / "one")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "specmatch.cli", "extract-latents", "--autoencoder", str(ae_dir), "--dataset", str(data),
           "--name", "micro", "--params", json.dumps(RUN), "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = latents.read_manifest(tmp_path / "two")
    assert two["world_size"] == 2 and two["count"] == one["count"]
    # Not bitwise: the single process convolves with 2 threads, the ranks with 1 each, so mu
    # differs in the last float32 bits (~1e-7), and the scale by ~1e-9.
    assert two["scale_factor"] == pytest.approx(one["scale_factor"], rel=1e-6)
    for a, b in zip(one["shards"], two["shards"]):
        with np.load(tmp_path / "one" / a["file"]) as za, np.load(tmp_path / "two" / b["file"]) as zb:
            for key in ("mu", "logvar", "labels", "index", "flip"):
                np.testing.assert_allclose(za[key], zb[key], rtol=1e-4, atol=1e-5)
