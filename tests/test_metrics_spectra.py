"""Spectral metrics of generated images and latents against a dataset's spectra summary."""

from __future__ import annotations

import pytest
import torch

from specmatch import spectral
from specmatch.data.prepare import prepare
from specmatch.errors import SpecmatchError
from specmatch.metrics import spectra

from conftest import load_split

P = {"split": "train", "max_images": 10000, "batch_size": 64, "n_bins": 16, "deltas": [1.0], "blur": "auto",
     "blur_kernel": 7, "blur_sigma": 1.2, "seed": 0}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    out = tmp_path_factory.mktemp("spec") / "embedded"
    prepare({"source": "embedded", "resolution": 32, "seed": 0, "n_train": 48, "n_test": 8, "shard_size": 64},
            "embedded", out)
    images, _ = load_split(out, "train")
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return spectra.DataSpectra.from_json(spectra.dataset_spectra(out, [8], P)), x


def test_real_images_match_their_own_summary(real):
    summary, x = real
    r = spectra.compare_to_real(x, summary)
    assert r["kl_to_real"] == pytest.approx(0.0, abs=1e-6)
    assert r["psd_exponent"] == pytest.approx(r["real_psd_exponent"], rel=1e-6)
    assert r["psd_exponent"] < -1.0  # natural images: power falls with frequency


def test_white_noise_latents_sit_between_flat_and_the_tilted_target(real):
    """Real images fall roughly as 1/f^2, the delta=1 target as 1/f, white noise is flat: noise
    is off both, but nearer the tilted target than the untilted images; a tilt with the wrong
    sign or swapped distributions would reverse the first comparison."""
    summary, x = real
    z = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    r = spectra.compare_to_real(z, summary, grid=8, setting="training")
    on_grid = spectral.image_to_latent_grid(x, (8, 8))
    r_img = spectra.compare_to_real(on_grid, summary, grid=8, setting="training")
    assert abs(r["psd_exponent"]) < 0.5            # flat spectrum
    assert r_img["psd_exponent"] < -1.0
    assert r["kl_to_real"] > 2 * r["kl_to_target"] > 0.1
    assert r_img["kl_to_target"] > 0.05
    # The untilted training-setting distribution of the on-grid images is what the summary holds.
    assert r_img["kl_to_real"] == pytest.approx(0.0, abs=1e-6)


def test_compare_bad_inputs(real):
    summary, x = real
    with pytest.raises(SpecmatchError, match="no grid 4"):
        spectra.compare_to_real(x, summary, grid=4)
    with pytest.raises(SpecmatchError, match="do not match"):
        spectra.compare_to_real(x[..., :16, :16], summary)
    with pytest.raises(SpecmatchError, match="no delta 0.5"):
        spectra.compare_to_real(x, summary, delta=0.5)
    with pytest.raises(SpecmatchError, match="setting"):
        spectra.compare_to_real(x, summary, setting="other")
