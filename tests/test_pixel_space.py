"""Pixel-space diffusion through the latent stages: the identity "autoencoder" (config and variant
`pixels`), written by `train-ae` without training, read back by every stage like a trained one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specmatch.autoencoder import artifact, evaluate, latents, train
from specmatch.autoencoder import model as ae_model
from specmatch.errors import SpecmatchError

from conftest import load_split

RUN = {"dataset": "embedded_32px", "config": "pixels", "variant": "pixels",
       "train": {"steps": 1, "batch_size": 4, "device": "cpu"},
       "eval": {"net": "efficientnet-lite0", "lpips": False, "batch_size": 5, "device": "cpu", "lowpass_ks": [0, 8]},
       "latents": {"batch_size": 7, "shard_size": 10, "device": "cpu", "hflip": False}}


@pytest.fixture(scope="module")
def pixels(tmp_path_factory, micro_data):
    root = tmp_path_factory.mktemp("pixels")
    summary = train.train(RUN, micro_data, root / "run", root / "ae", "pix")
    return micro_data, root, summary


def test_identity_round_trips_images_exactly():
    m = ae_model.build("pixels")
    assert ae_model.count_parameters(m) == 0
    u8 = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8).numpy()
    x = ae_model.to_float(u8, "cpu")
    post = m.encode(x)
    assert torch.equal(post.mean, x) and torch.equal(m.decode(x), x)
    # A posterior sample (what a diffusion model trains on) is the image to well below a uint8 level.
    z = post.sample(torch.Generator().manual_seed(0))
    assert float((z - x).abs().max()) < 1e-5
    assert np.array_equal(ae_model.to_uint8(m.decode(z)), u8)


@pytest.mark.parametrize("cfg,variant,match", [
    ("pixels", "sdvae", "identity takes config `pixels`"),
    ("tiny", "pixels", "identity takes config `pixels`"),
])
def test_variant_and_config_go_together(tmp_path, micro_data, cfg, variant, match):
    with pytest.raises(SpecmatchError, match=match):
        train.train({**RUN, "config": cfg, "variant": variant}, micro_data, tmp_path / "run", tmp_path / "ae", "x")
    assert not (tmp_path / "ae").exists()


def test_identity_config_shape_is_checked():
    with pytest.raises(SpecmatchError, match="one level and z_channels = in_channels"):
        ae_model.config({"name": "bad", "channels": [3, 3], "z_channels": 3, "norm_groups": 1, "identity": True})
    with pytest.raises(SpecmatchError, match="one level and z_channels = in_channels"):
        ae_model.config({"name": "bad", "channels": [3], "z_channels": 4, "norm_groups": 1, "identity": True})


def test_written_untrained_and_loaded_as_an_autoencoder(pixels):
    _, root, summary = pixels
    assert summary["iterations"] == 0 and summary["parameters"] == 0 and summary["variant"] == "pixels"
    ae, s = artifact.load(root / "ae")
    assert isinstance(ae, ae_model.PixelIdentity) and s["config"]["identity"] is True


def test_latents_are_the_pixels_with_the_data_scale(pixels, tmp_path):
    data, root, _ = pixels
    man = latents.extract(RUN, root / "ae", data, "pix", tmp_path / "lat")
    images, _ = load_split(data, "train")
    x = images.astype(np.float64) / 127.5 - 1.0
    assert man["shape"] == [3, 32, 32] and man["count"] == len(images)
    # s = 1 / std of the sampled latents: the pixels' own std (their noise is 3e-7).
    assert man["scale_factor"] == pytest.approx(1.0 / x.std(), rel=1e-5)
    reader = latents.LatentReader(tmp_path / "lat")
    mu, _, _ = reader.get(np.arange(len(images)))
    np.testing.assert_allclose(np.asarray(mu), np.transpose(x, (0, 3, 1, 2)), rtol=0, atol=1e-6)


def test_evaluation_is_lossless(pixels, tmp_path):
    data, root, _ = pixels
    res = evaluate.evaluate(RUN, root / "ae", data, "pix", tmp_path / "ev")
    assert res["psnr"] == float("inf") and res["ssim"] == pytest.approx(1.0)
    assert abs(res["rFD-EffNetLite0"]) < 1e-3
