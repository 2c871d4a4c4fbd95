"""Tests of the spectral core (docs/method.md §2, 3, 4 and 7) against independent references.

Nothing here compares `specmatch.spectral` with itself. The references are:
- scipy.fft's DCT and a Makhoul FFT-based DCT-II written below in numpy (transforms, power);
- the bin formula of docs/method.md §2.4 recomputed in numpy, and hand counts (bins, DSM masks);
- `bench/_torch_dct_reference.py`, the authors'-style implementation (torch-dct, an explicit
  2-D Gaussian convolution, a real bicubic `F.interpolate`, a python loop over bins), which the
  benchmark times against too. It is run in float64 here so that it is the more exact side;
- closed forms (the DTFT of a sampled Gaussian for the DoG filter, exact power laws).
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.fft
import scipy.ndimage
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _torch_dct_reference as ref  # noqa: E402

from specmatch import spectral as sp  # noqa: E402

PINNED_COUNTS = {
    16: [3, 5, 7, 13, 13, 15, 23, 19, 23, 31, 31, 31, 19, 11, 9, 3],
    32: [8, 22, 32, 42, 58, 68, 78, 86, 106, 118, 128, 118, 74, 46, 28, 12],
}
DSM_KEPT = {8: 28, 10: 15, 12: 6}
DELTAS = [0.0, 0.6, 1.0, 1.2]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tensors are small: a second thread only adds contention on a 2-core CI machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- inputs and helpers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_maps(shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    """Doubly integrated white noise: a steep, power-law-like spectrum, as natural images
    have, so that the band energies span several decades (the hard case for precision)."""
    n = torch.randn(shape, generator=_gen(seed), dtype=torch.float64)
    s = n.cumsum(-1).cumsum(-2)
    s = s - s.mean(dim=(-2, -1), keepdim=True)
    s = s / s.abs().amax(dim=(-3, -2, -1), keepdim=True)  # into [-1, 1], like images
    return s.to(dtype)


def white_maps(shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


MAKERS = {"smooth": smooth_maps, "white": white_maps}


# The blur of a 256 px float64 batch is the most expensive thing in this file, so each image
# batch and each reference grid is computed once and shared (the tensors are never mutated).
@functools.lru_cache(maxsize=None)
def image_batch(img: int) -> torch.Tensor:
    return smooth_maps((2, 3, img, img), seed=img)


def _effective_blur(blur: str, size: int) -> str:
    return {"auto": "off" if size == 32 else "on"}.get(blur, blur)  # docs/method.md §3.1 [impl]


@functools.lru_cache(maxsize=None)
def _ref_blurred(img: int) -> torch.Tensor:
    return ref.gaussian_blur(image_batch(img).double(), 7, 1.2)


@functools.lru_cache(maxsize=None)
def ref_grid(img: int, size: int, blur: str) -> torch.Tensor:
    """Reference (float64) blur + resize of `image_batch(img)` to size x size."""
    on = _effective_blur(blur, size) == "on"
    src = _ref_blurred(img) if on else image_batch(img).double()
    return ref.blur_and_resize(src, (size, size), "off")


@functools.lru_cache(maxsize=None)
def our_grid(img: int, size: int, blur: str) -> torch.Tensor:
    return sp.image_to_latent_grid(image_batch(img), (size, size), blur=blur)


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, floor: float = 1e-7,
               atol: float = 0.0):
    """Element-wise relative agreement; `floor` (times the largest |expected|) only keeps
    exact zeros and values at the float32 round-off level of the largest one from failing."""
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    tol = rtol * e.abs() + floor * e.abs().max().clamp_min(1e-30) + atol
    bad = (a - e).abs() > tol
    if bad.any():
        rel = ((a - e).abs() / e.abs().clamp_min(1e-30)).max().item()
        raise AssertionError(f"{int(bad.sum())} of {a.numel()} elements differ; max rel diff {rel:.3g}\n"
                             f"actual[bad]={a[bad][:8].tolist()}\nexpected[bad]={e[bad][:8].tolist()}")


def np_dct_ortho_fft(x: np.ndarray, axis: int) -> np.ndarray:
    """Orthonormal DCT-II along `axis` by Makhoul's reordering and one complex FFT."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    n = x.shape[-1]
    v = np.concatenate([x[..., ::2], x[..., 1::2][..., ::-1]], axis=-1)
    k = np.arange(n)
    out = np.real(np.fft.fft(v, axis=-1) * np.exp(-1j * np.pi * k / (2 * n)))
    out = out * np.sqrt(2.0 / n)
    out[..., 0] /= np.sqrt(2.0)
    return np.moveaxis(out, -1, axis)


def np_radial_bins(h: int, w: int, n_bins: int = 16) -> np.ndarray:
    u, v = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    r = np.hypot(u, v)
    return np.minimum(np.floor(n_bins * r / np.hypot(h - 1, w - 1)).astype(int), n_bins - 1)


def np_block_dct(s: np.ndarray, blk: int = 8) -> np.ndarray:
    """(B, C, H, W) -> per-block orthonormal DCT coefficients (B, C, H/blk, W/blk, blk, blk)."""
    b, c, hh, ww = s.shape
    blocks = s.reshape(b, c, hh // blk, blk, ww // blk, blk).transpose(0, 1, 2, 4, 3, 5)
    return scipy.fft.dctn(blocks, type=2, norm="ortho", axes=(-2, -1))


def hand_keep_mask(k: int, blk: int = 8) -> np.ndarray:
    keep = np.ones((blk, blk), dtype=bool)
    for u in range(blk):
        for v in range(blk):
            if k > 0 and u + v >= 2 * (blk - 1) - (k - 1):
                keep[u, v] = False
    return keep


# --------------------------------------------------------------------------- DCT


@pytest.mark.parametrize("h,w", [(4, 4), (8, 8), (16, 16), (32, 32), (8, 16)])
def test_dct2_matches_scipy(h, w):
    x = white_maps((2, 3, h, w), seed=h * 100 + w)
    want = scipy.fft.dctn(x.double().numpy(), type=2, norm="ortho", axes=(-2, -1))
    got = sp.dct2(x)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=2e-6 * np.abs(want).max())
    back = sp.idct2(torch.from_numpy(want).float())
    want_back = scipy.fft.idctn(want, type=2, norm="ortho", axes=(-2, -1))
    np.testing.assert_allclose(back.numpy(), want_back, rtol=0, atol=2e-6 * np.abs(want_back).max())


@pytest.mark.parametrize("h,w", [(4, 4), (8, 8), (16, 16), (32, 32), (8, 16)])
def test_dct2_parseval_and_round_trip(h, w):
    x = smooth_maps((2, 3, h, w), seed=7)
    X = sp.dct2(x)
    np.testing.assert_allclose(X.double().pow(2).sum((-2, -1)).numpy(),
                               x.double().pow(2).sum((-2, -1)).numpy(), rtol=1e-5)
    torch.testing.assert_close(sp.idct2(X), x, rtol=0, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_dct2_property_random_shapes(h, w, seed):
    x = white_maps((1, 2, h, w), seed=seed)
    X = sp.dct2(x)
    np.testing.assert_allclose(X.numpy(), scipy.fft.dctn(x.double().numpy(), norm="ortho", axes=(-2, -1)),
                               rtol=0, atol=1e-5)
    assert abs(X.double().pow(2).sum().item() - x.double().pow(2).sum().item()) <= 1e-5 * x.double().pow(2).sum().item()
    torch.testing.assert_close(sp.idct2(X), x, rtol=0, atol=1e-5)


def test_dct2_is_float32_under_autocast_and_for_bf16_inputs():
    x = white_maps((1, 2, 16, 16), seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        X = sp.dct2(x)
    assert X.dtype == torch.float32
    torch.testing.assert_close(X, sp.dct2(x), rtol=0, atol=0)
    assert sp.dct2(x.bfloat16()).dtype == torch.float32


# --------------------------------------------------------------------------- power spectrum


def np_power(s: np.ndarray, center: str, remove_dc: bool) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    if center == "mean":
        s = s - s.mean(axis=(-2, -1), keepdims=True)
    X = np_dct_ortho_fft(np_dct_ortho_fft(s, -1), -2)
    p = np.maximum((X ** 2).mean(axis=1), 1e-12)
    if remove_dc:
        p[:, 0, 0] = 0.0
    return p


def test_makhoul_reference_is_a_dct():
    # The helper itself must be right before it judges anything.
    x = np.random.default_rng(0).standard_normal((3, 13))
    np.testing.assert_allclose(np_dct_ortho_fft(x, -1), scipy.fft.dct(x, norm="ortho", axis=-1), atol=1e-12)


@pytest.mark.parametrize("h,w", [(4, 4), (8, 8), (16, 16), (32, 32), (8, 16)])
@pytest.mark.parametrize("center,remove_dc", [("none", False), ("mean", True), ("mean", False), ("none", True)])
def test_power_spectrum_matches_fft_reference(h, w, center, remove_dc):
    s = smooth_maps((3, 5, h, w), seed=h + w) + 0.3  # an offset so that centring matters
    got = sp.power_spectrum(s, center=center, remove_dc=remove_dc)
    assert got.shape == (3, h, w) and got.dtype == torch.float32
    assert_rel(got, torch.from_numpy(np_power(s.numpy(), center, remove_dc)), rtol=1e-4, floor=1e-7)


def test_power_spectrum_clamp_and_dc():
    zeros = torch.zeros(2, 3, 8, 8)
    p = sp.power_spectrum(zeros)
    assert torch.all(p == torch.tensor(1e-12, dtype=torch.float32))
    p = sp.power_spectrum(zeros, remove_dc=True)
    assert p[:, 0, 0].eq(0).all() and (p.flatten(1)[:, 1:] == torch.tensor(1e-12, dtype=torch.float32)).all()
    # A constant map: all power in DC; centring removes it, leaving only the clamp floor.
    const = torch.full((1, 2, 8, 8), 0.5)
    p = sp.power_spectrum(const, center="none")
    assert p[0, 0, 0].item() == pytest.approx(0.25 * 64, rel=1e-6)
    assert p.flatten()[1:].max().item() <= 1e-11
    p = sp.power_spectrum(const, center="mean")
    assert p.max().item() <= 1e-11


def test_power_spectrum_is_the_mean_over_channels():
    a = smooth_maps((2, 1, 16, 16), seed=1)
    b = 3.0 * white_maps((2, 1, 16, 16), seed=2)
    both = sp.power_spectrum(torch.cat([a, b], 1))
    torch.testing.assert_close(both, 0.5 * (sp.power_spectrum(a) + sp.power_spectrum(b)), rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------- radial bins


@pytest.mark.parametrize("n", [16, 32])
def test_bin_counts_pinned(n):
    assert np.bincount(np_radial_bins(n, n).ravel(), minlength=16).tolist() == PINNED_COUNTS[n]
    assert sp.bin_counts(n, n).tolist() == PINNED_COUNTS[n]


@pytest.mark.parametrize("h,w", [(4, 4), (8, 8), (16, 16), (32, 32), (8, 16), (5, 11)])
def test_radial_bins_match_formula(h, w):
    np.testing.assert_array_equal(sp.radial_bins(h, w).numpy(), np_radial_bins(h, w))


def test_empty_bins_on_small_maps():
    # By hand, 4x4: r_max = sqrt(18), bin = floor(3.771 r); the distinct radii
    # 0, 1, 1.41, 2, 2.24, 2.83, 3, 3.16, 3.61, 4.24 land in bins 0,3,5,7,8,10,11,11,13,15.
    counts4 = sp.bin_counts(4, 4).tolist()
    assert counts4 == [1, 0, 0, 2, 0, 1, 0, 2, 2, 0, 1, 4, 0, 2, 0, 1]
    assert [k for k, c in enumerate(counts4) if c == 0] == [1, 2, 4, 6, 9, 12, 14]
    # By hand, 8x8: bin m holds the cells with 98 m^2 / 256 <= u^2 + v^2 < 98 (m+1)^2 / 256;
    # every bin is hit (e.g. bin 2 only by (1, 1), bin 7 by r^2 = 20, bin 14 by r^2 = 85,
    # bin 15 only by the corner (7, 7)).
    # NOTE: docs/method.md §2.4 says "on small maps (8x8, 4x4) some bins are empty"; with 16 bins that
    # holds for 4x4 only, 8x8 has none.
    counts8 = sp.bin_counts(8, 8).tolist()
    assert counts8 == np.bincount(np_radial_bins(8, 8).ravel(), minlength=16).tolist()
    assert counts8 == [1, 2, 1, 4, 3, 4, 5, 2, 8, 7, 6, 9, 4, 5, 2, 1]
    assert min(counts8) > 0
    # Empty bins come out as exact zeros in the energies and the distribution.
    s = smooth_maps((2, 3, 4, 4), seed=3)
    empty = torch.tensor(counts4) == 0
    assert (sp.band_energies(s)[:, empty] == 0).all()
    assert (sp.spectrum_distribution(s, delta=1.0)[:, empty] == 0).all()


# --------------------------------------------------------------------------- against the authors'-style reference


SETTINGS = [dict(center="mean", remove_dc=True), dict(center="none", remove_dc=False)]


@pytest.mark.parametrize("n", [4, 8, 16, 32])
@pytest.mark.parametrize("kind", ["smooth", "white"])
@pytest.mark.parametrize("setting", SETTINGS, ids=["training", "analysis"])
def test_band_energies_match_reference(n, kind, setting):
    s = MAKERS[kind]((3, 4, n, n), seed=n)
    got = sp.band_energies(s, **setting)
    assert got.shape == (3, 16) and got.dtype == torch.float32
    assert_rel(got, ref.band_energies(s.double(), **setting))


@pytest.mark.parametrize("n", [4, 8, 16, 32])
@pytest.mark.parametrize("kind", ["smooth", "white"])
@pytest.mark.parametrize("delta", DELTAS)
@pytest.mark.parametrize("setting", SETTINGS, ids=["training", "analysis"])
def test_spectrum_distribution_matches_reference(n, kind, delta, setting):
    s = MAKERS[kind]((3, 4, n, n), seed=10 * n + 1)
    got = sp.spectrum_distribution(s, delta=delta, **setting)
    want = ref.spectrum_distribution(s.double(), delta=delta, **setting)
    assert_rel(got, want)
    torch.testing.assert_close(got.double().sum(-1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(h=st.integers(2, 20), w=st.integers(2, 20), delta=st.sampled_from(DELTAS), seed=st.integers(0, 2**16))
def test_spectrum_distribution_property_random_grids(h, w, delta, seed):
    # Arbitrary, also non-square, grids: whatever bins are empty there, both agree.
    s = smooth_maps((2, 3, h, w), seed=seed)
    assert_rel(sp.spectrum_distribution(s, delta=delta, center="mean", remove_dc=True),
               ref.spectrum_distribution(s.double(), delta=delta, center="mean", remove_dc=True))


LATENTS = [(64, 8), (16, 16), (4, 32)]  # (channels, size): f32d64, f16d16, f8d4 at 256 px


@pytest.mark.parametrize("img", [64, 256])
@pytest.mark.parametrize("size", [8, 16, 32])
@pytest.mark.parametrize("blur", ["auto", "on", "off"])
def test_image_to_latent_grid_matches_reference(img, size, blur):
    got = our_grid(img, size, blur)
    assert got.shape == (2, 3, size, size) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_grid(img, size, blur), rtol=0, atol=1e-6)


def test_image_to_latent_grid_blur_kernel_and_sigma_are_used():
    x = white_maps((1, 3, 64, 64), seed=5)
    got = sp.image_to_latent_grid(x, (16, 16), blur="on", blur_kernel=5, blur_sigma=0.7)
    want = ref.blur_and_resize(x.double(), (16, 16), "on", kernel_size=5, sigma=0.7)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    assert (got - sp.image_to_latent_grid(x, (16, 16), blur="on")).abs().max() > 1e-3


@pytest.mark.parametrize("img", [64, 256])
@pytest.mark.parametrize("size", [8, 16, 32])
@pytest.mark.parametrize("blur", ["auto", "on", "off"])
def test_image_band_energies_matches_reference(img, size, blur):
    # The ESM image side before the tilt: fused operators vs the literal blur, resize and DCT.
    got = sp.image_band_energies(image_batch(img), (size, size), blur=blur)
    assert got.shape == (2, 16) and got.dtype == torch.float32
    assert_rel(got, ref.band_energies(ref_grid(img, size, blur), center="mean", remove_dc=True))


def test_image_band_energies_float32_under_bf16_autocast():
    x = image_batch(64)
    plain = sp.image_band_energies(x, (16, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = sp.image_band_energies(x, (16, 16))
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, plain, rtol=1e-6, atol=0)


def latent_batch(ch: int, size: int, kind: str, seed: int) -> torch.Tensor:
    return MAKERS[kind]((2, ch, size, size), seed=seed)


@pytest.mark.parametrize("img", [64, 256])
@pytest.mark.parametrize("ch,size", LATENTS)
@pytest.mark.parametrize("delta", DELTAS)
@pytest.mark.parametrize("blur", ["auto", "on", "off"])
def test_esm_loss_matches_reference(img, ch, size, delta, blur):
    z = latent_batch(ch, size, "smooth" if delta in (0.0, 1.0) else "white", seed=size + img)
    got = sp.esm_loss(image_batch(img), z, delta=delta, blur=blur)
    want = ref.esm_loss_on_grid(ref_grid(img, size, blur), z.double(), delta=delta)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert_rel(got, want, rtol=1e-5, floor=0, atol=1e-7)


@pytest.mark.parametrize("size,blur", [(16, "auto"), (32, "auto"), (8, "on"), (32, "on"), (16, "off")])
def test_esm_loss_matches_reference_end_to_end(size, blur):
    # The whole reference (its own blur and resize inside), not the cached grids.
    x = smooth_maps((3, 3, 64, 64), seed=size)
    z = white_maps((3, 8, size, size), seed=size + 1)
    want = ref.esm_loss(x.double(), z.double(), delta=1.0, blur=blur)
    assert_rel(sp.esm_loss(x, z, delta=1.0, blur=blur), want, rtol=1e-5, floor=0, atol=1e-7)


@pytest.mark.parametrize("blur", ["auto", "on"])
def test_esm_loss_matches_reference_non_square(blur):
    # Separate operators per axis: a 64x96 image onto a 16x24 latent (and 32x48, where auto
    # skips the blur because the latent is 32 high).
    x = smooth_maps((2, 3, 64, 96), seed=21)
    for h, w in [(16, 24), (32, 48)]:
        z = white_maps((2, 4, h, w), seed=h)
        want = ref.esm_loss(x.double(), z.double(), delta=1.0, blur=blur)
        assert_rel(sp.esm_loss(x, z, delta=1.0, blur=blur), want, rtol=1e-5, floor=0, atol=1e-7)


@pytest.mark.parametrize("ch,size", LATENTS)
def test_esm_loss_gradient_matches_reference(ch, size):
    z = latent_batch(ch, size, "white", seed=3)
    z1 = z.clone().requires_grad_(True)
    sp.esm_loss(image_batch(256), z1).backward()
    z2 = z.double().requires_grad_(True)
    ref.esm_loss_on_grid(ref_grid(256, size, "auto"), z2).backward()
    assert_rel(z1.grad, z2.grad, rtol=1e-4, floor=1e-5)


@pytest.mark.parametrize("img,size,blur", [(64, 8, "on"), (64, 16, "on"), (64, 32, "on"), (64, 8, "off"),
                                            (64, 16, "off"), (64, 32, "off"), (256, 16, "auto"),
                                            (256, 32, "auto"), (256, 32, "on")])
def test_esm_fused_path_equals_literal_path(img, size, blur):
    # esm_loss folds blur + resize + DCT into one matrix per axis and skips the centring;
    # it must equal the literal composition of the public building blocks.
    z = latent_batch(8, size, "white", seed=11)
    delta = 1.0
    e_x = sp.band_energies(our_grid(img, size, blur), center="mean", remove_dc=True)
    p_x = sp.distribution_from_energies(sp.delta_tilt(e_x, delta))
    p_z = sp.spectrum_distribution(z, center="mean", remove_dc=True)
    literal = sp.kl_divergence(p_x, p_z).mean()
    assert_rel(sp.esm_loss(image_batch(img), z, delta=delta, blur=blur), literal, rtol=1e-5, floor=0, atol=1e-7)


@pytest.mark.parametrize("ch,n,img", [(3, 64, 64), (16, 16, 16), (4, 32, 32)])
@pytest.mark.parametrize("k", [8, 10, 12])
@pytest.mark.parametrize("kind", ["smooth", "white"])
def test_block_lowpass_matches_reference(ch, n, img, k, kind):
    s = MAKERS[kind]((2, ch, img, img), seed=k)
    got = sp.block_lowpass(s, k)
    assert got.shape == s.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref.block_lowpass(s.double(), k), rtol=0, atol=2e-6)


# --------------------------------------------------------------------------- DSM


@pytest.mark.parametrize("k,kept", sorted(DSM_KEPT.items()))
def test_dsm_kept_coefficient_counts(k, kept):
    hand = hand_keep_mask(k)
    assert hand.sum() == kept
    np.testing.assert_array_equal(sp.dsm_keep_mask(k).numpy(), hand)
    # And what block_lowpass actually keeps: the nonzero block-DCT coefficients of white noise.
    s = white_maps((2, 3, 16, 24), seed=k)
    coeff = np_block_dct(sp.block_lowpass(s, k).double().numpy())
    nonzero = np.abs(coeff) > 1e-5
    np.testing.assert_array_equal(nonzero.any(axis=(0, 1, 2, 3)), hand)
    assert nonzero.all(axis=(0, 1, 2, 3)).sum() == kept


def test_dsm_k0_returns_input_unchanged():
    s = white_maps((2, 3, 16, 16), seed=0)
    assert sp.block_lowpass(s, 0) is s
    assert sp.dsm_keep_mask(0).all()


@pytest.mark.parametrize("k", [8, 10, 12])
def test_block_lowpass_is_an_orthogonal_projection(k):
    x = white_maps((2, 3, 32, 32), seed=k).double()
    lp = sp.block_lowpass(x, k).double()
    torch.testing.assert_close(sp.block_lowpass(lp, k).double(), lp, rtol=0, atol=1e-5)
    assert lp.pow(2).sum() <= x.pow(2).sum()
    inner = (lp * (x - lp)).sum().item()
    assert abs(inner) <= 1e-5 * x.pow(2).sum().item()
    # And it is a strict low-pass: something was removed from white noise.
    assert lp.pow(2).sum() < 0.8 * x.pow(2).sum()


@settings(max_examples=10, deadline=None)
@given(k=st.integers(1, 14), nh=st.integers(1, 3), nw=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_block_lowpass_property_projection(k, nh, nw, seed):
    x = white_maps((1, 2, 8 * nh, 8 * nw), seed=seed)
    lp = sp.block_lowpass(x, k)
    torch.testing.assert_close(sp.block_lowpass(lp, k), lp, rtol=0, atol=1e-5)
    coeff = np_block_dct(lp.double().numpy())
    assert np.abs(coeff[..., ~hand_keep_mask(k)]).max(initial=0.0) < 1e-5


@pytest.mark.parametrize("hw", [(12, 12), (16, 12), (20, 16)])
def test_block_lowpass_rejects_indivisible_sizes(hw):
    h, w = hw
    with pytest.raises(ValueError, match=f"{h}x{w}.*block size 8"):
        sp.block_lowpass(torch.zeros(1, 3, h, w), 8)


def test_block_lowpass_same_mask_on_image_and_latent():
    k = 10
    img = smooth_maps((2, 3, 64, 64), seed=1)
    lat = white_maps((2, 16, 16, 16), seed=2)
    for s in (img, lat):
        coeff_in = np_block_dct(s.double().numpy())
        coeff_out = np_block_dct(sp.block_lowpass(s, k).double().numpy())
        keep = hand_keep_mask(k)
        # Inside the mask the coefficients are untouched, outside they are zero.
        np.testing.assert_allclose(coeff_out[..., keep], coeff_in[..., keep], atol=2e-6)
        assert np.abs(coeff_out[..., ~keep]).max() < 2e-6
    # Channels are filtered independently, whatever their number.
    both = sp.block_lowpass(torch.cat([lat[:, :3], lat[:, 3:]], 1), k)
    torch.testing.assert_close(both[:, :3], sp.block_lowpass(lat[:, :3], k))


def test_block_lowpass_gradient_flows():
    z = white_maps((1, 4, 16, 16), seed=0).requires_grad_(True)
    sp.block_lowpass(z, 8).pow(2).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


# --------------------------------------------------------------------------- ESM: gradients, zero, autocast


def test_esm_gradient_flows_into_z_only():
    x = smooth_maps((2, 3, 64, 64), seed=0).requires_grad_(True)
    z = white_maps((2, 16, 16, 16), seed=1).requires_grad_(True)
    loss = sp.esm_loss(x, z)
    assert loss.requires_grad
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().max() > 0
    assert x.grad is None or not x.grad.any()


@pytest.mark.parametrize("img,size,blur", [(64, 16, "auto"), (256, 16, "auto"), (256, 32, "auto"),
                                            (64, 8, "on"), (64, 32, "off")])
def test_esm_loss_zero_when_latent_is_the_image(img, size, blur):
    x = image_batch(img)
    z = our_grid(img, size, blur)
    assert abs(sp.esm_loss(x, z, delta=0.0, blur=blur).item()) < 1e-6
    # ... and not zero once the image side is tilted.
    assert sp.esm_loss(x, z, delta=1.0, blur=blur).item() > 1e-4


def test_esm_loss_nonnegative_and_sensitive():
    x = smooth_maps((4, 3, 64, 64), seed=1)
    losses = [sp.esm_loss(x, MAKERS[kind]((4, 16, 16, 16), seed=2)).item() for kind in ("smooth", "white")]
    assert min(losses) >= 0 and abs(losses[0] - losses[1]) > 1e-3


@pytest.mark.parametrize("ch,size", [(16, 16), (4, 32)])
def test_esm_loss_float32_under_bf16_autocast(ch, size):
    x = image_batch(64)
    z = smooth_maps((2, ch, size, size), seed=9)
    plain = sp.esm_loss(x, z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = sp.esm_loss(x, z)
    assert auto.dtype == torch.float32
    assert abs(auto.item() - plain.item()) <= 1e-6 * abs(plain.item())


# Regression test (docs/method.md §2.2: float32 even under bf16 autocast). It caught a real bug:
# `band_energies` did its bin-averaging matmul outside the autocast guard and returned
# bfloat16 (~3 significant digits), and `spectrum_distribution` with it. esm_loss was not
# affected: it runs everything inside its own guard.
def test_band_energies_and_distribution_float32_under_bf16_autocast():
    z = smooth_maps((2, 4, 32, 32), seed=9)
    e_plain = sp.band_energies(z, center="mean", remove_dc=True)
    p_plain = sp.spectrum_distribution(z, delta=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = sp.band_energies(z, center="mean", remove_dc=True)
        p = sp.spectrum_distribution(z, delta=1.0)
    assert e.dtype == torch.float32, f"band_energies under bf16 autocast returned {e.dtype}"
    assert p.dtype == torch.float32, f"spectrum_distribution under bf16 autocast returned {p.dtype}"
    torch.testing.assert_close(e, e_plain, rtol=1e-6, atol=0)
    torch.testing.assert_close(p, p_plain, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- REPA family


def np_rmsc2(tokens: np.ndarray, h: int, w: int) -> np.ndarray:
    u = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
    out = []
    for b in range(u.shape[0]):
        c = scipy.fft.dctn(u[b].reshape(h, w, -1), type=2, norm="ortho", axes=(0, 1))
        out.append(((c ** 2).sum() - (c[0, 0] ** 2).sum()) / (h * w))
    return np.array(out)


@pytest.mark.parametrize("h,w,d", [(16, 16, 32), (8, 12, 5)])
def test_rmsc2_is_non_dc_dct_energy_of_directions(h, w, d):
    t = white_maps((3, h * w, d), seed=d) + 0.5
    torch.testing.assert_close(sp.rmsc2(t).double(), torch.from_numpy(np_rmsc2(t.double().numpy(), h, w)),
                               rtol=1e-5, atol=1e-7)


def test_rmsc2_zero_for_constant_field_and_scale_invariant():
    v = white_maps((2, 1, 24), seed=0)
    const = v.expand(2, 64, 24).contiguous()
    scales = torch.rand(2, 64, 1, generator=_gen(1)) * 10 + 0.1
    assert sp.rmsc2(const).abs().max() < 1e-6
    assert sp.rmsc2(const * scales).abs().max() < 1e-6
    t = white_maps((2, 64, 24), seed=2)
    torch.testing.assert_close(sp.rmsc2(t * scales), sp.rmsc2(t), rtol=1e-5, atol=1e-7)
    # Bounded by 1 (unit vectors), and near 1 for isotropic random directions in 24-D.
    assert (sp.rmsc2(t) <= 1 + 1e-6).all() and (sp.rmsc2(t) > 0.8).all()


def sampled_gaussian_gain(f: float, sigma: float, radius: int) -> float:
    """DTFT at frequency f (cycles per token) of the normalised sampled Gaussian on -r..r."""
    j = np.arange(-radius, radius + 1)
    g = np.exp(-j ** 2 / (2 * sigma ** 2))
    return float((g * np.cos(2 * np.pi * f * j)).sum() / g.sum())


def test_dog_filter_zero_on_constant_field():
    y = torch.full((2, 5, 16, 16), 3.7)
    assert sp.dog_filter(y, normalize=False).abs().max() < 1e-5


def test_dog_filter_is_a_band_pass():
    n, s1, s2, truncate = 32, 0.8, 2.0, 3.0
    r1, r2 = math.ceil(truncate * s1), math.ceil(truncate * s2)
    rows = torch.arange(n, dtype=torch.float64)
    wavelengths = [2, 3, 4, 6, 8, 16, 32]
    gains = []
    for lam in wavelengths:
        wave = torch.cos(2 * math.pi * rows / lam + 0.3)
        y = wave.view(1, 1, n, 1).expand(1, 2, n, n).float().contiguous()
        out = sp.dog_filter(y, s1, s2, truncate=truncate, normalize=False)[0, 0].double()
        # Away from the border (reflect padding) a sinusoid is scaled by the filter's DTFT.
        inner = slice(r2, n - r2)
        w_in = wave[inner].view(-1, 1).expand(-1, n)
        gain = (out[inner] * w_in).sum() / w_in.pow(2).sum()
        torch.testing.assert_close(out[inner], gain * w_in, rtol=0, atol=1e-5)
        expected = sampled_gaussian_gain(1 / lam, s1, r1) - sampled_gaussian_gain(1 / lam, s2, r2)
        assert gain.item() == pytest.approx(expected, abs=1e-5), lam
        gains.append(gain.item())
    best = int(np.argmax(gains))
    assert wavelengths[best] in (4, 6, 8)  # peak in the middle band
    assert gains[-1] < 0.25 * gains[best]  # broad structure suppressed
    assert gains[0] < 0.25 * gains[best]  # the 2-token wavelength rolled off
    assert gains[-1] < gains[-2] < gains[best] and gains[0] < gains[1] < gains[best]


@pytest.mark.parametrize("n", [16, 32])
@pytest.mark.parametrize("s1,s2", [(0.8, 2.0), (0.5, 1.5)])
def test_dog_filter_matches_scipy_everywhere(n, s1, s2):
    # Borders included: torch's "reflect" (edge sample not repeated) is scipy's "mirror".
    # The kernel radius ceil(truncate * sigma) is the implementation's documented choice.
    y = smooth_maps((2, 3, n, n), seed=n) + 0.2 * white_maps((2, 3, n, n), seed=1)
    yn = y.double().numpy()

    def blur(sigma):
        return scipy.ndimage.gaussian_filter(yn, sigma, mode="mirror", radius=math.ceil(3.0 * sigma), axes=(-2, -1))

    want = blur(s1) - blur(s2)
    got = sp.dog_filter(y, s1, s2, truncate=3.0, normalize=False)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)
    got_n = sp.dog_filter(y, s1, s2, truncate=3.0)
    np.testing.assert_allclose(got_n.numpy(), want / want.std(axis=(-2, -1), keepdims=True), rtol=0, atol=1e-4)


def test_dog_filter_normalised_std_is_one():
    y = smooth_maps((2, 6, 16, 16), seed=3) * 5
    d = sp.dog_filter(y)
    np.testing.assert_allclose(d.double().numpy().std(axis=(-2, -1)), 1.0, atol=1e-4)
    assert torch.isfinite(d).all()


@pytest.mark.parametrize("s1,s2", [(2.0, 2.0), (2.0, 0.8), (-0.1, 1.0)])
def test_dog_filter_rejects_bad_sigmas(s1, s2):
    with pytest.raises(ValueError, match="sigma1"):
        sp.dog_filter(torch.zeros(1, 2, 8, 8), s1, s2)


# --------------------------------------------------------------------------- PSD slope


@pytest.mark.parametrize("a", [1.0, 2.0, 2.5])
def test_psd_slope_recovers_power_law(a):
    k = torch.arange(16, dtype=torch.float64)
    e = 3.7 * (k + 1) ** -a
    assert sp.psd_slope(e).item() == pytest.approx(-a, abs=1e-9)
    batch = torch.stack([e, 0.01 * e])
    torch.testing.assert_close(sp.psd_slope(batch), torch.full((2,), -a, dtype=torch.float64))
    # Empty (zero) bins are ignored ...
    holes = e.clone()
    holes[[1, 2, 4, 6, 9, 12, 14]] = 0
    assert sp.psd_slope(holes).item() == pytest.approx(-a, abs=1e-9)
    # ... and so are bins marked invalid, whatever they hold.
    junk = e.clone()
    junk[[3, 7]] = 1e3
    valid = torch.ones(16, dtype=torch.bool)
    valid[[3, 7]] = False
    assert sp.psd_slope(junk, valid).item() == pytest.approx(-a, abs=1e-9)
    assert sp.psd_slope(e.float()).item() == pytest.approx(-a, abs=1e-5)


def test_psd_slope_needs_two_positive_bins():
    e = torch.zeros(16)
    e[3] = 1.0
    with pytest.raises(ValueError, match="fewer than two"):
        sp.psd_slope(e)
    with pytest.raises(ValueError, match="fewer than two"):
        sp.psd_slope(torch.ones(16), torch.arange(16) == 0)


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_helpful_errors():
    x = torch.zeros(2, 3, 64, 64)
    z = torch.zeros(2, 4, 16, 16)
    with pytest.raises(ValueError, match=r"\(B, C, h, w\).*\(3, 16, 16\)"):
        sp.band_energies(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        sp.spectrum_distribution(torch.zeros(1, 1, 2, 16, 16))
    with pytest.raises(ValueError, match="at least 2x2.*1x1"):
        sp.power_spectrum(torch.zeros(2, 3, 1, 1))
    with pytest.raises(ValueError, match="at least 2x2"):
        sp.esm_loss(x, torch.zeros(2, 4, 1, 1))
    with pytest.raises(ValueError, match="latents"):
        sp.esm_loss(x, torch.zeros(4, 16, 16))
    with pytest.raises(ValueError, match="images"):
        sp.esm_loss(torch.zeros(3, 64, 64), z)
    with pytest.raises(ValueError, match="batch sizes differ.*2.*3"):
        sp.esm_loss(x, torch.zeros(3, 4, 16, 16))
    with pytest.raises(ValueError, match="center must be.*'median'"):
        sp.spectrum_distribution(z, center="median")
    with pytest.raises(ValueError, match="center must be"):
        sp.band_energies(z, center="Mean")
    with pytest.raises(ValueError, match="blur must be.*'yes'"):
        sp.esm_loss(x, z, blur="yes")
    with pytest.raises(ValueError, match="blur must be"):
        sp.image_to_latent_grid(x, (16, 16), blur="true")
    with pytest.raises(ValueError, match="odd.*6"):
        sp.esm_loss(x, z, blur="on", blur_kernel=6)
    with pytest.raises(ValueError, match="odd.*4"):
        sp.esm_loss(x, z, blur="auto", blur_kernel=4)
    with pytest.raises(ValueError, match="odd"):
        sp.image_to_latent_grid(x, (16, 16), blur="on", blur_kernel=8)
    with pytest.raises(ValueError, match="sigma"):
        sp.esm_loss(x, z, blur="on", blur_sigma=0.0)
    with pytest.raises(ValueError, match="k must be >= 0"):
        sp.block_lowpass(x, -1)
