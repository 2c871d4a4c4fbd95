"""The paper report: EMA snapshots in the diffusion trainer, `fid-progress`, eval-ae's
reconstructions, and `report paper` (tables checked value by value against their inputs, bad
inputs, deterministic figures, the audit of the page).

The trainer and stage tests run on the micro latent cache of conftest (4x16x16 latents of 32 px
images); the report tests build small but realistic stage outputs in tmp_path, every number
distinct, so that a wrong column mapping fails."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from specmatch.ops import audit
from specmatch.cli import main as cli_main
from specmatch.diffusion import artifact, train
from specmatch.diffusion import fid_progress as progress
from specmatch.errors import SpecmatchError
from specmatch.autoencoder import model as ae_model
from specmatch.render import figures
from specmatch.report import paper
from specmatch.runtime.provenance import Provenance

from conftest import MICRO_AE_RUN, assert_bitwise, load_split, weights


def uvit(steps=4, **train_kw):
    return {"autoencoder": "micro", "model": "UViT-tiny/2", "process": {"kind": "vp-linear"},
            "train": {"steps": steps, "batch_size": 4, "device": "cpu", "lr": 1e-3, "ema_decay": 0.9,
                      "checkpoint_every": 2, "log_every": 1, "seed": 5, **train_kw}}


def _ema(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if k.startswith("ema.")}


# --------------------------------------------------------------------------- snapshots


def test_snapshots_hold_the_ema_weights_of_their_step(tmp_path, micro_latents):
    lat = micro_latents[2]
    full = train.train(uvit(steps=4, snapshot_steps=[3, 1]), lat, tmp_path / "out", "a", run_dir=tmp_path / "run")
    assert full["snapshots"]["steps"] == [1, 3] and full["snapshots"]["weights"] == "ema"
    assert sorted(p.name for p in (tmp_path / "out" / "snapshots").iterdir()) == [
        "step-00000001.safetensors", "step-00000003.safetensors"]
    # The same run stopped after 1 and after 3 steps: its EMA then is the snapshot, bit for bit.
    for s in (1, 3):
        short = train.train(uvit(steps=s), lat, tmp_path / f"o{s}", "b", run_dir=tmp_path / f"r{s}")
        assert short["fingerprint"] == full["fingerprint"]  # snapshot_steps do not change the run
        snap = load_file(artifact.snapshot_path(tmp_path / "out", s))
        assert snap.keys() == _ema(weights(tmp_path / f"o{s}")).keys()
        assert_bitwise(snap, _ema(weights(tmp_path / f"o{s}")))
        net, _ = artifact.load(tmp_path / "out", snapshot=s)
        assert all(torch.equal(v, snap["ema." + k]) for k, v in net.state_dict().items())
    # The run's final weights do not depend on whether it saved snapshots.
    train.train(uvit(steps=4), lat, tmp_path / "plain", "c", run_dir=tmp_path / "rplain")
    assert_bitwise(weights(tmp_path / "out"), weights(tmp_path / "plain"))
    assert not (tmp_path / "plain" / "snapshots").exists()
    assert "snapshots" not in json.loads((tmp_path / "plain" / "diffusion.json").read_text())


def test_snapshots_survive_a_resume_and_are_recovered_from_kept_checkpoints(tmp_path, micro_latents):
    lat = micro_latents[2]
    ref = train.train(uvit(steps=4, snapshot_steps=[1, 2, 3]), lat, tmp_path / "ref", "r", run_dir=tmp_path / "rr")
    # Interrupted after step 2 (the output of a 2-step run stands in for the kill, continued with
    # train.extend: the schedule is constant): its snapshot of step 1 stays in the run folder;
    # step 2's is taken from the step-2 checkpoint; 3 comes later.
    train.train(uvit(steps=2, snapshot_steps=[1]), lat, tmp_path / "part", "p", run_dir=tmp_path / "run")
    assert artifact.snapshot_path(tmp_path / "run", 1).is_file() and not artifact.snapshot_path(tmp_path / "run", 2).exists()
    resumed = train.train(uvit(steps=4, snapshot_steps=[1, 2, 3], extend=True), lat, tmp_path / "out", "p",
                          run_dir=tmp_path / "run")
    assert resumed["snapshots"]["steps"] == ref["snapshots"]["steps"] == [1, 2, 3]
    for s in (1, 2, 3):
        assert_bitwise(load_file(artifact.snapshot_path(tmp_path / "out", s)),
                       load_file(artifact.snapshot_path(tmp_path / "ref", s)))
    assert_bitwise(weights(tmp_path / "out"), weights(tmp_path / "ref"))
    # A step that neither a snapshot nor a kept checkpoint remembers cannot be made any more.
    train.train(uvit(steps=3, checkpoint_every=100), lat, tmp_path / "x", "x", run_dir=tmp_path / "run3")
    with pytest.raises(SpecmatchError, match=r"snapshot_steps \[1\] precede .*run3"):
        train.train(uvit(steps=4, checkpoint_every=100, snapshot_steps=[1], extend=True), lat, tmp_path / "y", "x",
                    run_dir=tmp_path / "run3")
    with pytest.raises(SpecmatchError, match=r"snapshot_steps \[9\] of x lie beyond train.steps=4"):
        train.train(uvit(steps=4, snapshot_steps=[9]), lat, tmp_path / "y", "x", run_dir=tmp_path / "run9")
    assert not (tmp_path / "y").exists()
    with pytest.raises(SpecmatchError, match="no snapshot of step 5"):
        artifact.load(tmp_path / "out", snapshot=5)


# --------------------------------------------------------------------------- fid-progress


METRICS = {"net": "efficientnet-lite0-128", "device": "cpu", "batch_size": 16, "split": "train", "is_split_size": 4}
SAMPLER = {"method": "dpm-solver", "steps": 3, "batch_size": 4, "shard_size": 8, "device": "cpu"}


@pytest.fixture(scope="module")
def progress_run(micro_latents, tmp_path_factory):
    """A 4-step U-ViT with a snapshot at step 2, reference statistics of the micro set, and the
    fid-progress output over 8 samples."""
    from specmatch.metrics import reference

    data, ae_dir, lat = micro_latents
    root = tmp_path_factory.mktemp("progress")
    train.train(uvit(steps=4, snapshot_steps=[2]), lat, root / "model", "u", run_dir=root / "run")
    reference.ref(data, METRICS, "ref", root / "ref")
    code = cli_main(["fid-progress", "--model", str(root / "model"), "--autoencoder", str(ae_dir), "--ref",
                     str(root / "ref"), "--name", "u", "--out", str(root / "progress"), "--params",
                     json.dumps({"sampler": SAMPLER, "metrics": METRICS, "n_samples": 8})])
    assert code == 0
    return root, ae_dir


def test_progress_scores_snapshots_and_final_weights_as_fid_calc_does(progress_run, tmp_path):
    from specmatch.diffusion import sample
    from specmatch.metrics import scoring

    root, ae_dir = progress_run
    df = pd.read_csv(root / "progress" / "progress.csv")
    assert df["step"].tolist() == [2, 4] and df["source"].tolist() == ["snapshot", "final weights"]
    assert (df["metric"] == "FD-EffNetLite0-128").all() and (df["n_samples"] == 8).all()
    assert df["value"].iloc[0] != df["value"].iloc[1]
    # The final point equals `sample` + `fid calc` of the same weights with the same settings.
    sample.sample(root / "model", ae_dir, {**SAMPLER, "n_samples": 8}, "s", tmp_path / "s", work_dir=tmp_path / "w")
    m = scoring.calc(tmp_path / "s", "samples", root / "ref", METRICS, "m", tmp_path / "m")
    pj = json.loads((root / "progress" / "progress.json").read_text())
    final = pj["points"][1]
    assert final["samples"]["images_sha256"] == m.samples["images_sha256"]  # the same images
    assert final["FD-EffNetLite0-128"] == m.value and m.metric == "FD-EffNetLite0-128"  # the same metric code
    assert (final["precision"], final["recall"]) == (m.precision, m.recall)
    assert df["value"].iloc[1] == pytest.approx(m.value, rel=1e-5)  # the CSV keeps 6 digits
    rec = json.loads((root / "progress" / "provenance.json").read_text())
    assert {i["role"] for i in rec["inputs"]} == {"diffusion model", "autoencoder", "reference",
                                                  "weights:efficientnet-lite0-128"}
    assert rec["protocol"]["n_samples"] == 8


def test_progress_bad_inputs(progress_run, micro_latents, tmp_path):
    root, ae_dir = progress_run
    p = {"sampler": SAMPLER, "metrics": METRICS, "n_samples": 8}
    plain = tmp_path / "plain"
    shutil.copytree(root / "model", plain)
    shutil.rmtree(plain / "snapshots")
    summary = json.loads((plain / "diffusion.json").read_text())
    summary.pop("snapshots")
    (plain / "diffusion.json").write_text(json.dumps(summary))
    with pytest.raises(SpecmatchError, match="no snapshots"):
        progress.run(plain, ae_dir, root / "ref", p, "x", tmp_path / "out")
    with pytest.raises(SpecmatchError, match="n_samples"):
        progress.run(root / "model", ae_dir, root / "ref", {**p, "n_samples": 1}, "x", tmp_path / "out")
    with pytest.raises(SpecmatchError, match="not reference statistics"):
        progress.run(root / "model", ae_dir, tmp_path, p, "x", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_eval_ae_saves_reconstructions_of_the_first_held_out_images(micro_latents, tmp_path):
    from specmatch.autoencoder import evaluate
    from specmatch.autoencoder.artifact import load as load_trained
    from specmatch.data.shards import iter_image_batches

    data, ae_dir, _ = micro_latents
    run = {**MICRO_AE_RUN, "eval": {"net": "efficientnet-lite0-128", "lpips": False, "batch_size": 3, "device": "cpu",
                                    "lowpass_ks": [0], "n_reconstructions": 5}}
    res = evaluate.evaluate(run, ae_dir, data, "micro", tmp_path / "ev")
    assert res["dataset"] == "embedded"
    with np.load(tmp_path / "ev" / "reconstructions.npz") as z:
        orig, rec = z["originals"], z["reconstructions"]
    first = np.concatenate(list(iter_image_batches(data, "test", 3, None, 0)))[:5]
    np.testing.assert_array_equal(orig, first)
    ae, _ = load_trained(ae_dir, True, "cpu")
    with torch.no_grad():
        mine = ae_model.to_uint8(ae.decode(ae.encode(ae_model.to_float(first, "cpu")).mean))
    assert np.abs(mine.astype(int) - rec.astype(int)).max() <= 1  # batches of 3 there, 5 here
    assert (tmp_path / "ev" / "reconstructions.png").read_bytes()[:4] == b"\x89PNG"
    evaluate.evaluate({**run, "eval": {**run["eval"], "n_reconstructions": 0}}, ae_dir, data, "micro",
                      tmp_path / "ev0")
    assert not (tmp_path / "ev0" / "reconstructions.npz").exists()


# --------------------------------------------------------------------------- report paper

DS = "embedded"
METRIC = "FD-EffNetLite0-128"
AES = {"ae-sdvae": ("sdvae", 21.5, 0.61, 40.5, {"8": 30.25, "12": 20.125}, 0.31, -1.9),
       "ae-esm": ("esm", 22.5, 0.62, 41.5, {"8": 31.25, "12": 21.125}, 0.21, -1.2),
       "ae-dsm": ("dsm", 23.5, 0.63, 42.5, {"8": 32.25, "12": 22.125}, 0.11, -2.4)}
# diffusion run -> (autoencoder, model, alignment kind, {sampler: (value, n, cfg scale)})
DIFFS = {"u-sdvae": ("ae-sdvae", "UViT-tiny/2", "none", {"dpm": (101.0, 128, 1.0)}),
         "u-esm": ("ae-esm", "UViT-tiny/2", "none", {"dpm": (102.0, 128, 1.0)}),
         "u-dsm": ("ae-dsm", "UViT-tiny/2", "none", {"dpm": (103.0, 128, 1.0)}),
         "s-dsm": ("ae-dsm", "SiT-tiny/2", "none", {"sde": (201.0, 128, 1.0), "sde-cfg": (202.0, 128, 2.0)}),
         "s-dsm-repa": ("ae-dsm", "SiT-tiny/2", "repa", {"sde": (211.0, 128, 1.0)}),
         "s-dsm-irepa": ("ae-dsm", "SiT-tiny/2", "irepa", {"sde": (212.0, 128, 1.0)}),
         "s-dsm-dog": ("ae-dsm", "SiT-tiny/2", "dog", {"sde": (213.0, 128, 1.0)}),
         # untrained twins (report.baselines.untrained): the U-ViT learned, the SiT did not (201 vs 205 +- 2)
         "u-sdvae-untrained": ("ae-sdvae", "UViT-tiny/2", "none", {"dpm": (300.0, 128, 1.0)}),
         "s-dsm-untrained": ("ae-dsm", "SiT-tiny/2", "none", {"sde": (205.0, 128, 1.0), "sde-cfg": (206.0, 128, 2.0)})}
STD = {"kl": 0.01, "lp": 0.5, "gen": 2.0, "flat": 0.05}  # bootstrap standard errors of the fixture's numbers
# The latents the diffusion models see (eval-ae's posterior samples): PSD exponent against the
# target's -1.5; SD-VAE's are flatter by 0.3 (6 standard errors): C4's premise holds.
TARGET_EXPONENT, SAMPLED_EXPONENT = -1.5, {"ae-sdvae": -1.2, "ae-esm": -1.45, "ae-dsm": -2.2}
TARGETS = {"repa": (0.0123, -0.5), "irepa": (0.5123, -0.25), "dog": (0.3123, 0.75)}
PARAMS = {"experiments": {"E1": {"autoencoders": list(AES), "diffusions": ["u-sdvae", "u-esm", "u-dsm"]},
                          "E2": {"autoencoders": ["ae-dsm"], "diffusions": ["s-dsm"]},
                          "E3": {"diffusions": ["s-dsm", "s-dsm-repa", "s-dsm-irepa", "s-dsm-dog"]},
                          "E4": {"autoencoders": None, "datasets": None}},
          "progress": {"diffusions": ["u-sdvae", "u-dsm"], "n_samples": 64}, "reconstructions": 4}
W = "ab" * 32


def _objective(variant: str) -> dict:
    """As train-ae records it; the ESM-AE with a tenfold ESM weight (the tiny preset's)."""
    from specmatch.autoencoder.objectives import objective

    o = {k: list(v) if isinstance(v, tuple) else v for k, v in objective(variant).__dict__.items()}
    return {**o, "esm_weight": 0.1} if variant == "esm" else o


def _boot(std: float, point: float = 0.0) -> dict:
    return {"n": 20, "std": std, "ci95": [point - 1.96 * std, point + 1.96 * std], "seed": 0}


def _jdump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def _sample_set(folder: Path, images: np.ndarray) -> None:
    """A dataset-format `samples` split holding `images`, as `specmatch sample` writes it."""
    from specmatch.data.shards import MANIFEST_SCHEMA, ShardWriter, write_manifest

    w = ShardWriter(folder, "samples", images.shape[1], shard_size=len(images))
    for i, im in enumerate(images):
        w.add(im, 0, i)
    write_manifest(folder, {"schema": MANIFEST_SCHEMA, "name": folder.name, "source": "samples",
                            "resolution": images.shape[1], "classes": [], "num_classes": 0,
                            "splits": {"samples": w.close()}, "files": [], "skipped": [], "params_sha256": "0" * 64})


def _dist(seed: int, valid) -> list[float]:
    p = np.random.default_rng(seed).random(len(valid)) * np.asarray(valid)
    return (p / p.sum()).tolist()


@pytest.fixture(scope="module")
def stage_outputs(tmp_path_factory, micro_latents):
    """Stage outputs of a small grid: real data spectra of the micro set (grids 16 and 8), and
    eval-ae / train-diffusion / fid calc / sample / target-spectra / fid-progress outputs with
    distinct numbers; returns {flag: folders}."""
    from specmatch.metrics import spectra

    root = tmp_path_factory.mktemp("stages")
    spectra.run(micro_latents[0], {"max_images": 24, "batch_size": 8}, [16, 8], DS, root / "spectra" / DS)
    valid = json.loads((root / "spectra" / DS / "spectra.json").read_text())["grids"]["16"]["valid_bins"]
    rng = np.random.default_rng(0)
    originals = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    real, _ = load_split(micro_latents[0], "train")
    for i, (ae, (variant, psnr, ssim, rfd, lp, kl, pe)) in enumerate(AES.items()):
        d = root / "ae_eval" / ae
        _jdump(d / "metrics.json", {
            "name": ae, "autoencoder": ae, "variant": variant, "config": "tiny", "dataset": DS, "n": 128,
            "objective": _objective(variant),
            "psnr": psnr, "ssim": ssim, f"r{METRIC}": rfd, "lowpass": lp,
            "lowpass_metric": f"r{METRIC} between LP_k(x) and Dec(LP_k(mu))",
            "latent_spectrum": {"grid": [16, 16], "n_bins": 16, "delta": 1.0, "valid_bins": valid,
                                "latent_distribution": _dist(i + 1, valid), "target_distribution": _dist(9, valid),
                                "kl_target_to_latent": kl, "esm_loss_mean": kl + 0.001, "psd_exponent": pe,
                                "target_exponent": TARGET_EXPONENT},
            "sampled_latents": {"draw": "z = mu + sigma * eps, one draw per image", "distribution": _dist(i + 5, valid),
                                "kl_target_to_latent": 2 * kl, "psd_exponent": SAMPLED_EXPONENT[ae],
                                "sigma_rms": 0.5, "mu_std": 1.0, "noise_to_signal": 0.5},
            "protocol": {"split": "test", "n_images": 128, "metric": METRIC, "weights_sha256": W,
                         "feature_net": "efficientnet-lite0-128"},
            "bootstrap": {f"r{METRIC}": _boot(STD["lp"], rfd), "lowpass": {k: _boot(STD["lp"], v) for k, v in lp.items()},
                          "kl_target_to_latent": _boot(STD["kl"], kl),
                          "sampled_kl_target_to_latent": _boot(STD["kl"], 2 * kl),
                          "sampled_exponent_minus_target": _boot(STD["flat"], SAMPLED_EXPONENT[ae] - TARGET_EXPONENT)}})
        np.savez(d / "reconstructions.npz", originals=originals,
                 reconstructions=np.clip(originals.astype(int) + 20 * (i + 1), 0, 255).astype(np.uint8))
    for diff, (ae, model, kind, samplers) in DIFFS.items():
        # As train-diffusion writes them: the alignment as trained, filter settings included.
        align = {"kind": "none"} if kind == "none" else {
            "kind": kind, "encoder": "enc-s8", "depth": 2, "weight": 0.5, "projector": "conv" if kind == "irepa" else "mlp",
            "target_grid": [8, 8], "token_grid": [8, 8],
            **({"dog": {"sigma1": 0.8, "sigma2": 2.0}} if kind == "dog" else {}),
            **({"irepa_gamma": 1.0} if kind == "irepa" else {})}
        d = root / "diffusion" / diff
        steps = 0 if diff.endswith("-untrained") else 160
        _jdump(d / "diffusion.json", {"name": diff, "model": model, "steps": steps, "latents": {"autoencoder": ae},
                                      "alignment": align})
        Provenance("train-diffusion", diff, {"alignment": {"kind": kind}}).write(d, d)
        for s, (value, n, cfg) in samplers.items():
            sampling = {"name": f"{diff}-{s}", "diffusion": diff, "autoencoder": ae, "model": model,
                        "process": "linear" if model.startswith("SiT") else "vp-linear", "trained_steps": steps,
                        "alignment": "none" if kind == "none" else f"{kind} (enc-s8, depth 2, lambda 0.5)",
                        "weights": "ema", "sampler": "dpm-solver" if s == "dpm" else "euler-maruyama",
                        "steps": 20 if s == "dpm" else 30, "nfe_per_sample": 21 if s == "dpm" else 30,
                        "cfg_scale": cfg, "cfg_interval": [0.0, 0.7] if cfg != 1 else [0.0, 1.0], "seed": 0,
                        "world_size": 1, "n_samples": n, "fingerprint": "f" * 64, "scale_factor": 0.5, "order": 2,
                        "t_min": None, "class_balanced": True if model.startswith("SiT") else None, "batch_size": 16,
                        "generated_now": n, "seconds": 1.0, "images_per_s": float(n)}
            _jdump(root / "gen_metrics" / diff / s / "metrics.json", {
                "name": f"{diff}-{s}", "metric": METRIC, METRIC: value, "precision": value / 1000,
                "recall": value / 2000, "IS-EffNetLite0-128": value / 100,
                "IS-EffNetLite0-128_std": 0.0, "samples": {"n": n},
                "reference": {"dataset": DS, "split": "train", "n": 1024}, "protocol": {"name": "pytorch-fid", "weights_sha256": W, "feature_net": "efficientnet-lite0-128"},
                f"{METRIC}_bootstrap": _boot(STD["gen"], value),
                "sampling": sampling})
            _jdump(root / "samples" / diff / s / "sampling.json", sampling)
            # u-sdvae "samples" the real training images (the spectra's own set); the others are noise.
            _sample_set(root / "samples" / diff / s, real if diff == "u-sdvae" else
                        rng.integers(0, 256, real.shape, dtype=np.uint8))
            figures.image_grid(originals[:4], root / "samples" / diff / s / "grid.png", title=f"{diff} {s}")
    ts = root / "target_spectra"
    ts.mkdir()
    pd.DataFrame([{"encoder": "enc-s8", "kind": k, "RMSC2": r, "RMSC2_std": 0.01, "psd_exponent": e, "grid": "8x8",
                   "dim": 40, "image_size": 64, "n_images": 1024, "n_bins": 16, "dog_sigmas": "0.8/2",
                   "irepa_gamma": 1.0, "weights_sha256": W[:16], "targets": "enc-s8"}
                  for k, (r, e) in TARGETS.items()]).to_csv(ts / "target_spectra.csv", index=False)
    figures.image_grid(originals[:2], ts / "target_spectra.png")
    for diff in PARAMS["progress"]["diffusions"]:
        d = root / "progress" / diff
        rows = [{"diffusion": diff, "autoencoder": DIFFS[diff][0], "step": st, "source": src, "metric": METRIC,
                 "value": v, "n_samples": 64, "sampler": "dpm-solver", "steps": 20, "nfe": 21, "cfg_scale": 1.0,
                 "cfg_interval": "0-1", "reference": f"{DS}/train (n=1024)", "feature_weights_sha256": W[:16],
                 "precision": 0.5, "recall": 0.5, "inception_score": 2.0, "seed": 0, "weights": "ema",
                 "protocol": "pytorch-fid"}
                for st, src, v in ((40, "snapshot", 300.0), (80, "snapshot", 250.0), (160, "final weights", 180.0))]
        d.mkdir(parents=True)
        pd.DataFrame(rows).to_csv(d / "progress.csv", index=False)
        _jdump(d / "progress.json", {"name": diff, "diffusion": diff, "points": []})
    # The real floor at 128 samples (held-out real images scored like the samples).
    _jdump(root / "floors" / f"{DS}-n128" / "metrics.json", {
        "name": f"{DS}-real-floor-n128", "metric": METRIC, METRIC: 50.0, "precision": 0.9, "recall": 0.9,
        "samples": {"n": 128, "split": "test"}, "reference": {"dataset": DS, "split": "train", "n": 1024},
        "protocol": {"name": "pytorch-fid", "weights_sha256": W, "feature_net": "efficientnet-lite0-128"}})
    return {"spectra": [root / "spectra" / DS], "ae_eval": sorted((root / "ae_eval").iterdir()),
            "diffusion": sorted((root / "diffusion").iterdir()),
            "gen_metrics": sorted(root.glob("gen_metrics/*/*")), "samples": sorted(root.glob("samples/*/*")),
            "target_spectra": ts, "progress": sorted((root / "progress").iterdir()),
            "floors": [root / "floors" / f"{DS}-n128"]}


def _report(stage_outputs, out: Path, params=PARAMS, **replace):
    inputs = paper.Inputs.load(**{**stage_outputs, **replace})
    return paper.write(params, inputs, "test", out)


@pytest.fixture(scope="module")
def report(stage_outputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report"
    return _report(stage_outputs, out), out


def test_e1_e2_rows_carry_each_autoencoder_and_run_value(report):
    t, out = report
    e1 = pd.read_csv(out / "tables" / "e1.csv")
    assert len(e1) == 3 and e1["autoencoder"].tolist() == list(AES)
    for _, r in e1.iterrows():
        variant, psnr, ssim, rfd, *_ = AES[r["autoencoder"]]
        assert (r["variant"], r["PSNR"], r["SSIM"], r[f"r{METRIC}"]) == (variant, psnr, ssim, rfd)
        diff = r["diffusion"]
        assert DIFFS[diff][0] == r["autoencoder"]
        value, n, cfg = DIFFS[diff][3]["dpm"]
        assert (r[METRIC], r["n_samples"], r["cfg_scale"]) == (value, n, cfg)
        assert (r["sampler"], r["steps"]) == ("dpm-solver", 20)
        assert r["precision"] == value / 1000 and r["inception_score"] == value / 100
        assert r["reference"] == f"{DS}/train (n=1024)" and r["feature_weights_sha256"] == W[:16]
        assert r["latent_grid"] == "16x16" and r["recon_n"] == 128 and r["trained_steps"] == 160
    assert "FID" not in e1.columns and "value" not in e1.columns  # distances are named by their metric
    e2 = pd.read_csv(out / "tables" / "e2.csv")
    assert e2["autoencoder"].tolist() == ["ae-dsm", "ae-dsm"] and e2["diffusion"].tolist() == ["s-dsm", "s-dsm"]
    assert sorted(zip(e2["cfg_scale"], e2[METRIC])) == [(1.0, 201.0), (2.0, 202.0)]
    assert (e2["PSNR"] == 23.5).all()
    assert (out / "tables" / "e1.md").read_text().startswith("# E1")


def test_e3_orders_alignments_and_joins_the_target_spectra(report):
    _, out = report
    e3 = pd.read_csv(out / "tables" / "e3.csv")
    plain = e3[e3["cfg_scale"] == 1.0]
    assert plain["alignment"].tolist() == ["none", "repa", "irepa", "dog"]
    for _, r in plain.iterrows():
        assert r[METRIC] == DIFFS[r["diffusion"]][3]["sde"][0]
        if r["alignment"] == "none":
            assert pd.isna(r["target_RMSC2"])
        else:
            assert (r["target_RMSC2"], r["target_psd_exponent"]) == TARGETS[r["alignment"]]
            assert r["encoder"] == "enc-s8" and r["target_grid"] == "8x8"
    assert e3.loc[e3["alignment"] == "dog", "dog_sigmas"].tolist() == ["0.8/2"]
    assert e3.loc[e3["alignment"] == "irepa", "irepa_gamma"].tolist() == [1.0]
    assert e3[e3["cfg_scale"] == 2.0][METRIC].tolist() == [202.0]


def test_e3_leaves_out_target_spectra_of_other_filter_settings(stage_outputs, tmp_path):
    """A run whose DoG sigmas differ from those target-spectra diagnosed gets no target numbers."""
    src = [d for d in stage_outputs["diffusion"] if d.name == "s-dsm-dog"][0]
    dog = tmp_path / "s-dsm-dog"
    dog.mkdir()
    summary = json.loads((src / "diffusion.json").read_text())
    summary["alignment"]["dog"] = {"sigma1": 0.8, "sigma2": 3.0}
    _jdump(dog / "diffusion.json", summary)
    Provenance("train-diffusion", "s-dsm-dog", {}).write(dog, dog)
    t = _report(stage_outputs, tmp_path / "r", diffusion=[d for d in stage_outputs["diffusion"] if d != src] + [dog])
    row = t["e3"][t["e3"]["alignment"] == "dog"].iloc[0]
    assert row["dog_sigmas"] == "0.8/3" and pd.isna(row["target_RMSC2"])
    assert row["target_note"] == "target-spectra diagnosed other settings: dog_sigmas 0.8/2 (run: 0.8/3)"


def test_e4_tables_and_progress_table(report, stage_outputs):
    _, out = report
    sj = json.loads((stage_outputs["spectra"][0] / "spectra.json").read_text())
    e4d = pd.read_csv(out / "tables" / "e4_data.csv")
    assert e4d["map"].tolist() == ["32x32 (full size)", "16x16 (latent grid)", "8x8 (latent grid)"]
    assert e4d["psd_exponent"].tolist() == pytest.approx(
        [sj["full_resolution"]["psd_exponent"]["of_mean_energy"], sj["grids"]["16"]["psd_exponent"]["of_mean_energy"],
         sj["grids"]["8"]["psd_exponent"]["of_mean_energy"]], rel=1e-5)
    e4l = pd.read_csv(out / "tables" / "e4_latents.csv").set_index("autoencoder")
    for ae, (_, _, _, rfd, lp, kl, pe) in AES.items():
        r = e4l.loc[ae]
        assert (r["KL(target||latent)"], r["latent_psd_exponent"], r[f"r{METRIC} LP k=0"]) == (kl, pe, rfd)
        assert (r[f"r{METRIC} LP k=8"], r[f"r{METRIC} LP k=12"]) == (lp["8"], lp["12"])
        assert r["image_psd_exponent_on_grid"] == pytest.approx(sj["grids"]["16"]["psd_exponent"]["of_mean_energy"],
                                                                 rel=1e-5)
    # Generated images: the set that holds the real training images (those data-spectra summarised)
    # has their spectrum (KL 0, the same PSD exponent); uniform noise is flat and far from it.
    e4s = pd.read_csv(out / "tables" / "e4_samples.csv").set_index("samples")
    assert len(e4s) == len(stage_outputs["samples"])
    same = e4s.loc["u-sdvae-dpm"]
    assert same["KL(samples||real)"] == pytest.approx(0.0, abs=1e-6) and same["n_images"] == 24
    assert same["psd_exponent"] == pytest.approx(sj["full_resolution"]["psd_exponent"]["of_mean_energy"], rel=1e-5)
    noise = e4s.drop(index="u-sdvae-dpm")
    assert (noise["KL(samples||real)"] > 0.01).all() and (noise["psd_exponent"].abs() < 0.3).all()
    assert (noise["real_psd_exponent"] < -1.0).all()
    pr = pd.read_csv(out / "tables" / "fid_over_training.csv")
    main = pr[pr["source"] == "generation table"]
    assert sorted(main["diffusion"]) == ["u-dsm", "u-sdvae"] and (main["n_samples"] == 128).all()
    assert main.set_index("diffusion")["value"].to_dict() == {"u-sdvae": 101.0, "u-dsm": 103.0}
    assert pr[pr["source"] != "generation table"]["step"].tolist() == [40, 80, 160] * 2


def test_page_links_every_table_and_figure(report):
    _, out = report
    page = (out / "index.md").read_text()
    for f in sorted((out / "tables").iterdir()) + sorted((out / "figures").iterdir()):
        assert f"]({f.parent.name}/{f.name})" in page, f.name
    names = {p.name for p in (out / "figures").iterdir()}
    assert {"spectra_embedded_16x16.png", "data_spectra_embedded.png", "target_spectra.png",
            "reconstructions_embedded.png", "fid_over_training.png"} <= names
    assert {f"samples_{d}-{s}.png" for d, v in DIFFS.items() for s in v[3]} <= names
    for exp in ("E1", "E2", "E3", "E4"):
        assert f"## {exp}:" in page
    assert f"{METRIC} of 128 samples against {DS}/train (n=1024), protocol pytorch-fid" in page
    # The same page for a browser, with the same links (opened in chromium by test_report_html.py).
    assert set(re.findall(r'href="(tables/[^"]+)"', (out / paper.HTML).read_text())) == {
        f"tables/{f.name}" for f in (out / "tables").iterdir()}


def test_figures_are_deterministic(report, stage_outputs, tmp_path):
    _, out = report
    _report(stage_outputs, tmp_path / "again")
    for f in (out / "figures").iterdir():
        assert f.read_bytes()[:4] == b"\x89PNG"
        assert f.read_bytes() == (tmp_path / "again" / "figures" / f.name).read_bytes(), f.name
    assert (out / "index.md").read_bytes() == (tmp_path / "again" / "index.md").read_bytes()


def test_provenance_lists_every_input_and_the_audit_walks_it(report, stage_outputs):
    _, out = report
    rec = json.loads((out / "provenance.json").read_text())
    given = [Path(p) for v in stage_outputs.values() for p in (v if isinstance(v, list) else [v])]
    assert sorted(Path(i["path"]).resolve() for i in rec["inputs"]) == sorted(p.resolve() for p in given)
    assert rec["stage"] == "report-paper" and rec["params"]["progress"]["n_samples"] == 64
    tree, problems = audit.audit(out / "tables" / "e1.csv", root="/", dvc=False)
    assert not problems and len(tree.inputs) == len(given)


def test_provenance_lists_the_inputs_by_kind_in_flag_order(report, stage_outputs):
    _, out = report
    rec = json.loads((out / "provenance.json").read_text())
    roles = {"spectra": "data spectra", "ae_eval": "autoencoder evaluation", "diffusion": "diffusion model",
             "gen_metrics": "generation metrics", "samples": "samples", "target_spectra": "target spectra",
             "progress": "metric over training", "floors": "real floor"}
    expected = [(roles[k], Path(p).resolve()) for k, v in stage_outputs.items()
                for p in (v if isinstance(v, list) else [v])]
    assert list(roles) == list(stage_outputs)
    assert [(i["role"], Path(i["path"]).resolve()) for i in rec["inputs"]] == expected


@pytest.mark.parametrize("kind, flag, name", [
    ("ae_eval", "--ae-eval", "ae-dsm"), ("diffusion", "--diffusion", "s-dsm"),
    ("gen_metrics", "--gen-metrics", "s-dsm-sde"), ("samples", "--samples", "s-dsm-sde"),
    ("progress", "--progress", "u-dsm")])
def test_two_folders_holding_one_name_are_refused(stage_outputs, tmp_path, kind, flag, name):
    """A folder is known by the name recorded in it: a copy under another path is a duplicate."""
    first = stage_outputs[kind][0]
    copy = tmp_path / "elsewhere"
    shutil.copytree(first, copy)
    with pytest.raises(SpecmatchError, match=re.escape(f"two {flag} folders hold '{name}': {first} and {copy}") + "$"):
        paper.Inputs.load(**{**stage_outputs, kind: stage_outputs[kind] + [copy]})


def test_inputs_of_another_kind_are_named(stage_outputs, tmp_path):
    scored = stage_outputs["gen_metrics"][0]
    with pytest.raises(SpecmatchError, match=re.escape(f"{scored}: --floors takes scores of real images, these are of "
                                                       "samples (s-dsm-sde)")):
        paper.Inputs.load(**{**stage_outputs, "floors": [scored]})
    no_grid = tmp_path / "s"
    shutil.copytree(stage_outputs["samples"][0], no_grid)
    (no_grid / "grid.png").unlink()
    with pytest.raises(SpecmatchError, match=r"s/grid.png: missing \(expected a `specmatch sample` output\)"):
        paper.Inputs.load(**{**stage_outputs, "samples": [no_grid]})
    with pytest.raises(TypeError, match=r"unknown input kinds \['ae_evals'\]"):  # a typo would drop the folders
        paper.Inputs.load(**{**stage_outputs, "ae_evals": stage_outputs["ae_eval"]})


def test_audit_names_a_changed_input(stage_outputs, tmp_path):
    outputs = {k: v for k, v in stage_outputs.items()}
    copy = tmp_path / "ae_eval"
    shutil.copytree(stage_outputs["ae_eval"][0].parent, copy)
    outputs["ae_eval"] = sorted(copy.iterdir())
    _report(outputs, tmp_path / "report")
    (copy / "ae-esm" / "metrics.json").write_text((copy / "ae-esm" / "metrics.json").read_text() + " ")
    _, problems = audit.audit(tmp_path / "report" / "index.md", root="/", dvc=False)
    assert any("modified" in p and "ae-esm" in p for p in problems), problems


def test_missing_metrics_file_is_named(stage_outputs, tmp_path):
    bad = tmp_path / "ae-x"
    bad.mkdir()
    with pytest.raises(SpecmatchError, match=r"ae-x/metrics.json: missing \(expected a `specmatch eval-ae` output\)"):
        _report(stage_outputs, tmp_path / "r", ae_eval=stage_outputs["ae_eval"] + [bad])
    gm = tmp_path / "gm"
    gm.mkdir()
    with pytest.raises(SpecmatchError, match=r"gm: no metrics.json"):
        _report(stage_outputs, tmp_path / "r", gen_metrics=[gm])
    m = json.loads((stage_outputs["ae_eval"][0] / "metrics.json").read_text())
    del m["protocol"]["metric"]
    _jdump(tmp_path / "ae-y" / "metrics.json", m)
    with pytest.raises(SpecmatchError, match=r"ae-y/metrics.json: no key 'protocol.metric'"):
        _report(stage_outputs, tmp_path / "r", ae_eval=[tmp_path / "ae-y"])
    assert not (tmp_path / "r").exists()


def test_run_without_inputs_is_named(stage_outputs, tmp_path):
    p = json.loads(json.dumps(PARAMS))
    p["experiments"]["E1"]["autoencoders"].append("ae-nope")
    with pytest.raises(SpecmatchError, match=r"E1.autoencoders names \['ae-nope'\], which are not among the "
                                             r"autoencoders available \(\['ae-dsm', 'ae-esm', 'ae-sdvae'\]\); "
                                             r"available: .*autoencoders: --ae-eval"):
        _report(stage_outputs, tmp_path / "r", params=p)
    p = json.loads(json.dumps(PARAMS))
    p["progress"]["diffusions"].append("u-esm")
    with pytest.raises(SpecmatchError, match=r"progress.diffusions names \['u-esm'\]"):
        _report(stage_outputs, tmp_path / "r", params=p)
    p = json.loads(json.dumps(PARAMS))
    p["experiments"]["E2"]["diffusions"] = ["u-esm"]
    with pytest.raises(SpecmatchError, match=r"E2.diffusions: \{'u-esm': 'ae-esm'\}"):
        _report(stage_outputs, tmp_path / "r", params=p)
    with pytest.raises(SpecmatchError, match="no --target-spectra"):
        _report(stage_outputs, tmp_path / "r", target_spectra=None)
    assert not (tmp_path / "r").exists()


def test_mixed_metric_names_are_refused(stage_outputs, tmp_path):
    src = [d for d in stage_outputs["gen_metrics"] if d.parent.name == "u-esm"][0]
    fid = tmp_path / "u-esm-fid"
    m = json.loads((src / "metrics.json").read_text())
    m["metric"], m["FID"] = "FID", m.pop(METRIC)
    _jdump(fid / "metrics.json", m)
    gen = [d for d in stage_outputs["gen_metrics"] if d != src] + [fid]
    with pytest.raises(SpecmatchError,
                       match=rf"E1: the generation distance mixes metrics \['{METRIC}', 'FID'\].*u-esm-fid: FID"):
        _report(stage_outputs, tmp_path / "r", gen_metrics=gen)
    assert not (tmp_path / "r").exists()


def test_cli_report_paper(stage_outputs, tmp_path, capsys):
    args = ["report", "paper", "--name", "t", "--params", json.dumps(PARAMS), "--out", str(tmp_path / "r")]
    for flag, key in (("--spectra", "spectra"), ("--ae-eval", "ae_eval"), ("--diffusion", "diffusion"),
                      ("--gen-metrics", "gen_metrics"), ("--samples", "samples"), ("--progress", "progress")):
        args += [flag, *map(str, stage_outputs[key])]
    assert cli_main(args + ["--target-spectra", str(stage_outputs["target_spectra"])]) == 0
    assert (tmp_path / "r" / "index.md").is_file() and "e1 (3 rows)" in capsys.readouterr().out
    bad = json.loads(json.dumps(PARAMS))
    bad["experiments"]["E5"] = {}
    assert cli_main(args[:5] + [json.dumps(bad)] + args[6:]) == 2
    assert "report.experiments" in capsys.readouterr().err


def test_claims_section_judges_each_claim_by_its_uncertainty(report):
    """The fixture's numbers: ESM's KL 0.21 vs SD-VAE's 0.31 (+-0.01 each): supported; DSM's k=12
    low-pass 22.1 vs 20.1 (+-0.5): contradicted; U-ViT on ESM/DSM latents 102/103 vs 101 (+-2):
    not resolved; the SiT runs (201-213) do not beat their untrained network (205 +- 2), so the
    alignment claims are not judged. The images' power law is measured on the real micro set."""
    t, out = report
    c = pd.read_csv(out / "tables" / "claims.csv")
    by = {cid: g for cid, g in c.groupby("claim")}
    assert list(by["C1"]["verdict"]) == ["supported"] and "R^2" in by["C1"]["evidence"].iloc[0]
    assert list(by["C2"]["verdict"]) == ["supported"] and by["C2"]["z"].iloc[0] == pytest.approx(0.1 / np.hypot(
        STD["kl"], STD["kl"]), rel=1e-3)
    assert list(by["C3"]["verdict"]) == ["contradicted"] and "k=12" in by["C3"]["evidence"].iloc[0]
    assert list(by["C4-premise"]["verdict"]) == ["supported"]
    assert by["C4-premise"]["z"].iloc[0] == pytest.approx(0.3 / STD["flat"], rel=1e-3)
    assert sorted(by["C4"]["verdict"]) == ["not resolved at this N"] * 2
    assert "C4c" not in by  # no control autoencoder in this grid
    assert len(by["C5"]) == 1 and len(by["C6"]) == 2
    assert all(v.startswith("not resolved: the runs did not learn") for v in list(by["C5"]["verdict"]) +
               list(by["C6"]["verdict"]))
    e1 = pd.read_csv(out / "tables" / "e1.csv").set_index("diffusion")
    assert e1.loc["u-esm", "objective_vs_paper"] == "esm_weight 0.1 (paper 0.01)"
    assert pd.isna(e1.loc["u-sdvae", "objective_vs_paper"])
    assert e1.loc["u-sdvae", f"{METRIC} untrained"] == 300.0 and pd.isna(e1.loc["u-esm", f"{METRIC} untrained"])
    assert e1.loc["u-sdvae", f"{METRIC} std"] == STD["gen"]
    # u-sdvae: untrained 300, floor 50, trained 101: it closed (300 - 101) / (300 - 50) of the gap.
    assert e1.loc["u-sdvae", f"{METRIC} real floor"] == 50.0
    assert e1.loc["u-sdvae", "gap_closed"] == pytest.approx(199 / 250, rel=1e-4)
    page = (out / "index.md").read_text()
    assert "## Claims" in page and page.index("## Claims") < page.index("## E1")
    # Every claim has a row here but the control comparison (no control autoencoder in this grid).
    # (C0 needs band-error outputs: tests/test_band_error_stage.py and the tiny DAG).
    assert [line.split(":")[0] for line in page.splitlines() if "Not tested" in line] == ["- C0", "- C4c"]


def _claim_eval(name, variant, psnr, flat, flat_std=0.05, dataset="ds"):
    from types import SimpleNamespace

    from specmatch.metrics.bootstrap import Bootstrap

    return SimpleNamespace(
        name=name, variant=variant, dataset=dataset, config="tiny", n=128, psnr=psnr,
        latent_spectrum=SimpleNamespace(psd_exponent=-2.5, target_exponent=-1.5, kl_target_to_latent=0.05),
        sampled=SimpleNamespace(psd_exponent=-1.5 + flat, kl_target_to_latent=0.06, noise_to_signal=0.6),
        sampled_flatness_bootstrap=Bootstrap(20, flat_std, flat - 0.1, flat + 0.1, 0))


def _claim_gen(diffusion, autoencoder, value):
    return {"diffusion": diffusion, "autoencoder": autoencoder, "value": value, "value_std": 1.0, "untrained": 300.0,
            "untrained_std": 1.0, "model": "UViT-tiny/2", "process": "vp-linear", "trained_steps": 100,
            "sampler": "dpm-solver", "steps": 20, "cfg_scale": 1.0, "cfg_interval": "0-1", "n_samples": 512,
            "metric": METRIC, "protocol": "pytorch-fid"}


@pytest.mark.parametrize("flat, premise", [(0.3, "supported"), (0.02, "not resolved at this N"),
                                            (-0.3, "contradicted")])
def test_c4_is_judged_only_where_its_premise_holds_and_against_the_control(flat, premise):
    """C4 ("ESM latents are more diffusable than SD-VAE's") needs SD-VAE's sampled latents to be
    flatter than the target; where they are not (the premise row is not supported), C4 reads
    "not tested" whatever the generation numbers say. C4c against the no-KL control is judged
    regardless, and a verdict names a reconstruction more than 1 dB worse than its base's."""
    from specmatch.report import claims

    evals = {"sd": _claim_eval("sd", "sdvae", 27.0, flat), "esm": _claim_eval("esm", "esm", 25.5, -0.1),
             "ctl": _claim_eval("ctl", "ae", 25.8, -0.4)}
    gen = [_claim_gen("u-sd", "sd", 120.0), _claim_gen("u-esm", "esm", 100.0), _claim_gen("u-ctl", "ctl", 110.0)]

    class Inputs:
        ae_eval = evals

    rows = claims.premise(Inputs, list(evals))
    assert [(r["claim"], r["verdict"]) for r in rows] == [("C4-premise", premise)]
    assert rows[0]["z"] == pytest.approx(flat / 0.05, rel=1e-3)
    by = {r["claim"]: r for r in claims.diffusability(gen, evals)}
    assert set(by) == {"C4", "C4c"}
    # 100 +- 1 against 120 +- 1 and 110 +- 1: z = 20 / sqrt(2) and 10 / sqrt(2).
    assert by["C4c"]["z"] == pytest.approx(10 / np.sqrt(2), rel=1e-3) and by["C4c"]["verdict"] == "supported"
    if premise == "supported":
        assert by["C4"]["verdict"].startswith("supported") and by["C4"]["z"] == pytest.approx(20 / np.sqrt(2), rel=1e-3)
    else:
        assert by["C4"]["verdict"].startswith(claims.NOT_TESTED)
    # ESM reconstructs 1.5 dB worse than SD-VAE (more than RECON_GAP_DB), 0.3 dB worse than the control.
    assert "confounded: esm reconstructs 1.5 dB worse" in by["C4"]["verdict"]
    assert "confounded" not in by["C4c"]["verdict"]


def _c0(learned=0.5, b=0.3, lead=0.2, lead_se=0.05):
    return {"learned": learned, "learned_se": 0.1, "high_minus_low_mid": b, "high_minus_low_mid_se": 0.1,
            "early_step": 40, "early_fraction": {"low_mid": 0.8, "high": 0.8 - lead},
            "early_fraction_diff": lead, "early_fraction_diff_se": lead_se}


@pytest.mark.parametrize("c0, verdict", [
    (_c0(), "supported"),
    (_c0(lead=-0.2), "contradicted"),  # the high bands learned first, though they end worse
    (_c0(b=-0.3), "contradicted"),
    (_c0(b=0.1), "not resolved at this N"),
    # Ends worse beyond 2 standard errors, but a lead of 1 standard error: not decided.
    (_c0(lead=0.05), "not resolved at this N (the high bands end worse, but their learning is not later beyond 2 "
                     "standard errors)"),
    (_c0(learned=0.1), "not tested: the run did not learn at this length"),
    ({**_c0(), "early_fraction_diff": None, "early_fraction_diff_se": None},
     "not resolved: no snapshot between initialisation and the final weights (train.snapshot_steps)"),
])
def test_c0_verdict_follows_its_definition(c0, verdict):
    """docs/band-error.md: C0 needs the run to have learned, the high bands' loss-weighted error
    above the low and mid bands' by 2 standard errors at the final weights, and the low and mid
    bands' median half-improvement step before the high bands'."""
    from specmatch.diffusion import band_error, band_error_stage, transport
    from specmatch.report import claims

    x0 = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    path = transport.make_path("vp-linear")
    P, _ = band_error.coefficient_power(x0)
    result = band_error.measure(band_error.wiener_model_fn(P, path), path, x0, [0.2, 0.8], n_bins=4, n_boot=4)
    c0 = {**c0, "rho_final": {"low": 1.0, "mid": 1.1, "high": 1.3}}

    class Inputs:
        band_error = {"u": ({"diffusion": "u", "trained_steps": 160, "c0": c0},
                            [band_error_stage.Point(40, "snapshot", result), band_error_stage.Point(160, "final weights",
                                                                                                      result)])}

    (row,) = claims.frequency_bias(Inputs, ["u"])
    assert row["claim"] == "C0" and row["verdict"] == verdict, row
    assert "u: 2 points to step 160" in row["setting"]


def test_untrained_baseline_of_the_same_training_seed():
    """A run of training seed 1 is read against the untrained network of seed 1 (other initial
    weights than seed 0's), under the same protocol; a row that records no seed takes the first."""
    from specmatch.report.experiments import attach_baselines

    proto = {"autoencoder": "ae", "model": "UViT-tiny/2", "process": "vp-linear", "sampler": "dpm-solver", "steps": 20,
             "cfg_scale": 1.0, "cfg_interval": "0-1", "n_samples": 128, "metric": METRIC, "protocol": "pytorch-fid",
             "dataset": "d"}
    rows = [{**proto, "diffusion": f"u{s}-untrained", "trained_steps": 0, "train_seed": s, "value": v,
             "value_std": 1.0} for s, v in ((0, 300.0), (1, 400.0))]
    rows += [{**proto, "diffusion": f"u{s}", "trained_steps": 100, "train_seed": s, "value": 200.0,
              "value_std": 1.0} for s in (0, 1, None)]
    attach_baselines({"E1": rows}, [])
    assert [r["untrained"] for r in rows[2:]] == [300.0, 400.0, 300.0]
