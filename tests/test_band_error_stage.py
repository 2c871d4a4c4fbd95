"""`specmatch band-error` on a micro U-ViT with one EMA snapshot: every point measures the weights
of its step on the held-out images' scaled posterior samples, and bad inputs are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from specmatch.autoencoder import artifact as ae_artifact
from specmatch.cli import main as cli_main
from specmatch.diffusion import artifact, band_error, band_error_stage, train, transport
from specmatch.errors import SpecmatchError

from conftest import load_split

P = {"n_images": 8, "t": [0.1, 0.5, 0.9], "n_boot": 10, "loss_draws": 2, "batch_size": 3, "device": "cpu"}


@pytest.fixture(scope="module")
def uvit_run(micro_latents, tmp_path_factory):
    data, ae_dir, lat = micro_latents
    root = tmp_path_factory.mktemp("band-error")
    run = {"autoencoder": "micro", "model": "UViT-tiny/2", "process": {"kind": "vp-linear"},
           "train": {"steps": 4, "batch_size": 4, "device": "cpu", "lr": 1e-3, "ema_decay": 0.9, "checkpoint_every": 2,
                     "log_every": 1, "seed": 5, "snapshot_steps": [2]}}
    train.train(run, lat, root / "model", "u", run_dir=root / "run")
    return data, ae_dir, root / "model"


def _cli(model, ae_dir, data, out, params) -> int:
    return cli_main(["band-error", "--model", str(model), "--autoencoder", str(ae_dir), "--dataset", str(data),
                     "--name", "u", "--params", json.dumps(params), "--out", str(out)])


def test_each_point_measures_its_weights_on_the_held_out_posterior_samples(uvit_run, tmp_path, capsys):
    data, ae_dir, model = uvit_run
    assert _cli(model, ae_dir, data, tmp_path / "be", P) == 0
    assert '"trained_steps": 4' in capsys.readouterr().out
    info, points = band_error_stage.read(tmp_path / "be")
    assert [(p.step, p.source) for p in points] == [(0, "initialisation"), (2, "snapshot"), (4, "final weights")]
    assert info["data"]["n_images"] == 8 and (tmp_path / "be" / "provenance.json").is_file()
    # Independently: the held-out images encoded by the autoencoder, one posterior sample each
    # with the stage's seeds, scaled by the run's factor; each point's weights loaded by step.
    summary = artifact.read_summary(model)
    ae, _ = ae_artifact.load(ae_dir, True, "cpu")
    images, _ = load_split(data, "test")
    from specmatch.autoencoder.model import to_float
    from specmatch.runtime import seeding

    x0 = []
    with torch.no_grad():
        for b, i in enumerate(range(0, 8, 3)):
            post = ae.encode(to_float(images[i:i + 3], "cpu"))
            gen = torch.Generator().manual_seed(seeding.step_seed(0, b, "band-error-posterior"))
            x0.append(post.sample(gen).float() * summary["latents"]["scale_factor"])
    x0 = torch.cat(x0)
    path = transport.from_params(summary["process"])
    for point, snap in zip(points[1:], (2, None)):
        net, _ = artifact.load(model, True, "cpu", snapshot=snap)
        ref = band_error.measure(lambda x, t: net(x, t, None), path, x0, P["t"], seed=0, batch_size=5, n_boot=10,
                                 loss_draws=2)
        np.testing.assert_allclose(point.result.rel_err, ref.rel_err, rtol=1e-6)
        np.testing.assert_allclose(point.result.loss_model, ref.loss_model, rtol=1e-6)
    # The two points hold different weights, hence different errors.
    assert not np.allclose(points[0].result.rel_err, points[1].result.rel_err)
    c0 = info["c0"]
    assert set(c0["groups"]) == {"low", "mid", "high"} and len(c0["t_half"]) == 16
    assert c0["learned_se"] > 0 and c0["high_minus_low_mid_se"] > 0
    # (a) read at the snapshot of step 2, between initialisation and the final weights.
    assert c0["early_step"] == 2 and c0["early_fraction_diff"] == pytest.approx(
        c0["early_fraction"]["low_mid"] - c0["early_fraction"]["high"]) and c0["early_fraction_diff_se"] > 0
    # The untrained network is far from the optimum: training removed most of its error.
    assert points[0].result.excess_ratio().mean() > points[-1].result.excess_ratio().mean()


def test_bad_inputs_are_refused_naming_them(uvit_run, micro_latents, tmp_path, capsys):
    data, ae_dir, model = uvit_run
    assert _cli(model, ae_dir, data, tmp_path / "a", {**P, "n_image": 8}) == 2
    assert "unknown key(s) ['n_image']" in capsys.readouterr().err
    assert _cli(model, ae_dir, data, tmp_path / "b", {**P, "n_images": 9}) == 2
    assert "fewer than n_images 9" in capsys.readouterr().err
    assert _cli(model, ae_dir, data, tmp_path / "c", {**P, "t": [0.5]}) == 2
    assert "at least 2 noise levels" in capsys.readouterr().err
    assert _cli(model, ae_dir, data, tmp_path / "d", {**P, "t": [0.5, 1.5]}) == 2
    assert "t" in capsys.readouterr().err
    summary = json.loads((ae_dir / "autoencoder.json").read_text())
    other = tmp_path / "other-ae"
    import shutil

    shutil.copytree(ae_dir, other)
    (other / "autoencoder.json").write_text(json.dumps({**summary, "name": "another"}))
    assert _cli(model, other, data, tmp_path / "e", P) == 2
    assert "trained on the latents of autoencoder 'micro'" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abcde")
    with pytest.raises(SpecmatchError, match="band_error.json: missing"):
        band_error_stage.read(tmp_path)
