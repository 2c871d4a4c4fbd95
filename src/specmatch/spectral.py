"""Spectral core of Spectrum Matching (docs/method.md §2-4 and 7).

Everything here is computed in float32, with autocast switched off, whatever the caller's
dtype: the quantities are logs of band energies that span many decades, which bf16 cannot
hold. Gradients flow into the inputs (the latent) wherever the formula allows it.

Transforms are explicit orthonormal DCT matrices applied on both axes: for the map sizes of
this method (4..256) a pair of small matmuls is exact and faster than FFT-based DCTs, and it
lets linear pre-processing (blur, resize) be folded into the same matrices.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F

Center = Literal["none", "mean"]
Blur = Literal["auto", "on", "off"]

__all__ = [
    "dct_matrix", "dct2", "idct2", "power_spectrum", "radial_bins", "bin_counts", "band_energies",
    "delta_tilt", "distribution_from_energies", "spectrum_distribution", "kl_divergence",
    "gaussian_kernel1d", "image_to_latent_grid", "image_band_energies", "esm_loss", "block_split", "block_merge",
    "dsm_keep_mask", "block_lowpass", "scale_lowpass", "direction_field", "rmsc2",
    "dog_filter", "psd_slope",
]

# Named settings of docs/method.md §2: what ESM trains with, and what the analysis figures show.
TRAINING = {"center": "mean", "remove_dc": True}
ANALYSIS = {"center": "none", "remove_dc": False}

POWER_FLOOR = 1e-12  # docs/method.md §2.3: P clamped at >= 1e-12 before the optional DC removal
KL_EPS = 1e-8  # docs/method.md §3.5: inside both logs


class _no_autocast:
    """Disable autocast for the device of `t` (bf16 cannot hold these spectra)."""

    def __init__(self, t: torch.Tensor):
        self.ctx = torch.autocast(device_type=t.device.type, enabled=False)

    def __enter__(self):
        self.ctx.__enter__()

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc)


def _key(device: torch.device) -> str:
    return str(torch.device(device))


# --------------------------------------------------------------------------- DCT


@functools.lru_cache(maxsize=128)
def _dct_matrix64(n: int) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    k = i[:, None]
    c = torch.cos(math.pi * (2 * i[None, :] + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c


@functools.lru_cache(maxsize=256)
def _dct_matrix_on(n: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    return _dct_matrix64(n).to(device=device, dtype=dtype)


def dct_matrix(n: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix `C` (n, n): `C @ x` is the DCT-II of x, `C.T @ X` its inverse."""
    if n < 1:
        raise ValueError(f"dct_matrix: size must be >= 1, got {n}")
    return _dct_matrix_on(int(n), _key(device or "cpu"), dtype)


def dct2(x: torch.Tensor) -> torch.Tensor:
    """2-D orthonormal DCT-II over the last two dims, in float32."""
    with _no_autocast(x):
        x = x.float()
        ch = dct_matrix(x.shape[-2], x.device)
        cw = dct_matrix(x.shape[-1], x.device)
        return ch @ x @ cw.T


def idct2(X: torch.Tensor) -> torch.Tensor:
    """Inverse of `dct2` (2-D orthonormal DCT-III), in float32."""
    with _no_autocast(X):
        X = X.float()
        ch = dct_matrix(X.shape[-2], X.device)
        cw = dct_matrix(X.shape[-1], X.device)
        return ch.T @ X @ cw


# --------------------------------------------------------------------------- radial spectra


def _check_maps(s: torch.Tensor, what: str) -> None:
    if s.dim() != 4:
        raise ValueError(f"{what}: expected maps of shape (B, C, h, w), got {tuple(s.shape)}")
    if s.shape[-1] < 2 or s.shape[-2] < 2:
        raise ValueError(f"{what}: maps must be at least 2x2, got {s.shape[-2]}x{s.shape[-1]}")


def _check_center(center: str) -> None:
    if center not in ("none", "mean"):
        raise ValueError(f"center must be 'none' or 'mean', got {center!r}")


def power_spectrum(s: torch.Tensor, center: Center = "none", remove_dc: bool = False) -> torch.Tensor:
    """Channel-aggregated DCT power `P(u, v) = mean_c DCT(s_c)(u, v)^2` (docs/method.md §2.1-2.3).

    (B, C, h, w) -> (B, h, w), clamped at >= 1e-12; `remove_dc` then sets P(0, 0) = 0.
    """
    _check_maps(s, "power_spectrum")
    _check_center(center)
    with _no_autocast(s):
        s = s.float()
        if center == "mean":
            s = s - s.mean(dim=(-2, -1), keepdim=True)
        p = dct2(s).pow(2).mean(dim=1).clamp_min(POWER_FLOOR)
        if remove_dc:
            p = p.clone()
            p[:, 0, 0] = 0.0
        return p


@functools.lru_cache(maxsize=128)
def _radial_bins_cpu(h: int, w: int, n_bins: int) -> torch.Tensor:
    u = torch.arange(h, dtype=torch.float64)[:, None]
    v = torch.arange(w, dtype=torch.float64)[None, :]
    r = torch.sqrt(u * u + v * v)
    r_max = math.sqrt((h - 1) ** 2 + (w - 1) ** 2)
    return torch.clamp(torch.floor(n_bins * r / r_max), max=n_bins - 1).long()


def radial_bins(h: int, w: int, n_bins: int = 16, device: torch.device | str | None = None) -> torch.Tensor:
    """Bin index of every DCT cell (docs/method.md §2.4): `min(floor(n_bins * r / r_max), n_bins - 1)`."""
    if h < 2 or w < 2:
        raise ValueError(f"radial_bins: maps must be at least 2x2, got {h}x{w}")
    if n_bins < 1:
        raise ValueError(f"radial_bins: n_bins must be >= 1, got {n_bins}")
    return _radial_bins_cpu(int(h), int(w), int(n_bins)).to(device or "cpu")


def bin_counts(h: int, w: int, n_bins: int = 16) -> torch.Tensor:
    """Number of DCT cells in each radial bin (0 for the empty bins of small maps)."""
    return torch.bincount(radial_bins(h, w, n_bins).flatten(), minlength=n_bins)


@functools.lru_cache(maxsize=128)
def _bin_average_matrix(h: int, w: int, n_bins: int, device: str) -> torch.Tensor:
    # (h*w, n_bins) with 1/count in a cell's bin: one matmul averages P over every bin.
    bins = radial_bins(h, w, n_bins).flatten()
    counts = torch.bincount(bins, minlength=n_bins).double()
    m = torch.zeros(h * w, n_bins, dtype=torch.float64)
    m[torch.arange(h * w), bins] = 1.0
    m = m / counts.clamp_min(1.0)
    return m.float().to(device)


def _band_energies_from_power(p: torch.Tensor, n_bins: int) -> torch.Tensor:
    h, w = p.shape[-2:]
    with _no_autocast(p):  # the averaging is a matmul, which autocast would run in bf16
        return p.float().flatten(-2) @ _bin_average_matrix(h, w, n_bins, _key(p.device))


def band_energies(s: torch.Tensor, n_bins: int = 16, center: Center = "none", remove_dc: bool = False) -> torch.Tensor:
    """Radial band energies `E_k` (B, n_bins): the mean of P over the cells of bin k (docs/method.md §2.4).

    The DC cell belongs to bin 0 (with `remove_dc` it counts as a zero). Empty bins are 0;
    `bin_counts` tells which they are.
    """
    return _band_energies_from_power(power_spectrum(s, center, remove_dc), n_bins)


def delta_tilt(e: torch.Tensor, delta: float) -> torch.Tensor:
    """Flatten an image power law: `E_k * (k + 1)^delta` (docs/method.md §3.3)."""
    if delta == 0:
        return e
    k = torch.arange(e.shape[-1], device=e.device, dtype=e.dtype)
    return e * (k + 1.0).pow(delta)


def distribution_from_energies(e: torch.Tensor) -> torch.Tensor:
    """`q_k = log(1 + E_k)`, `p_k = q_k / sum_j q_j` (docs/method.md §2.5). Empty bins (E = 0) get p = 0."""
    q = torch.log1p(e)
    return q / q.sum(dim=-1, keepdim=True)


def spectrum_distribution(s: torch.Tensor, n_bins: int = 16, center: Center = "none",
                          remove_dc: bool = False, delta: float = 0.0) -> torch.Tensor:
    """Spectrum distribution (B, n_bins) of maps (B, C, h, w), docs/method.md §2 step 5.

    `delta` applies the image-side tilt `(k+1)^delta` to the band energies before the log.
    Empty bins are 0; since they are 0 on both sides of any comparison on the same grid,
    they drop out of the KL (use `bin_counts(h, w) > 0` to exclude them from plots and fits).
    """
    e = band_energies(s, n_bins, center, remove_dc)
    return distribution_from_energies(delta_tilt(e, delta))


def kl_divergence(p: torch.Tensor, q: torch.Tensor, valid: torch.Tensor | None = None, eps: float = KL_EPS) -> torch.Tensor:
    """Per-sample `sum_k p_k (log(p_k + eps) - log(q_k + eps))` over the valid bins (docs/method.md §3.5)."""
    term = p * (torch.log(p + eps) - torch.log(q + eps))
    if valid is not None:
        term = term * valid.to(term.dtype)
    return term.sum(dim=-1)


# --------------------------------------------------------------------------- ESM


def gaussian_kernel1d(kernel: int, sigma: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalised 1-D Gaussian taps; the 2-D blur of docs/method.md §3.1 is their outer product."""
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"blur kernel must be a positive odd size, got {kernel}")
    if sigma <= 0:
        raise ValueError(f"blur sigma must be > 0, got {sigma}")
    x = torch.arange(kernel, dtype=torch.float64) - (kernel - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return (g / g.sum()).to(dtype)


def _use_blur(blur: str, latent_h: int) -> bool:
    if blur == "auto":
        return latent_h != 32  # [impl] the authors skip the blur for 32x32 latents (f8 at 256 px)
    if blur in ("on", "off"):
        return blur == "on"
    raise ValueError(f"blur must be 'auto', 'on' or 'off', got {blur!r}")


def image_to_latent_grid(x: torch.Tensor, size: tuple[int, int], blur: Blur = "auto",
                         blur_kernel: int = 7, blur_sigma: float = 1.2) -> torch.Tensor:
    """docs/method.md §3.1 done literally: depthwise Gaussian blur (zero padding) then bicubic resize
    (align_corners=False, no antialias) of images (B, 3, H, W) to the latent grid `size`."""
    _check_maps(x, "image_to_latent_grid")
    h, w = size
    with _no_autocast(x):
        x = x.float()
        if _use_blur(blur, h):
            g = gaussian_kernel1d(blur_kernel, blur_sigma, torch.float32).to(x.device)
            k2 = (g[:, None] * g[None, :]).expand(x.shape[1], 1, blur_kernel, blur_kernel)
            x = F.conv2d(x, k2, padding=blur_kernel // 2, groups=x.shape[1])
        return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=False)


@functools.lru_cache(maxsize=64)
def _image_dct_operator(n_in: int, n_out: int, use_blur: bool, kernel: int, sigma: float, device: str) -> torch.Tensor:
    """(n_out, n_in) matrix `C_out . R . G` along one axis: zero-padded Gaussian blur G,
    bicubic resize R, orthonormal DCT C. Blur and bicubic resize are separable linear maps,
    so `A_h x A_w^T` equals the DCT of `image_to_latent_grid(x)`: two matmuls per image
    instead of a 7x7 convolution, a resize and a DCT."""
    eye = torch.eye(n_in, dtype=torch.float64)
    m = eye
    if use_blur:
        g = gaussian_kernel1d(kernel, sigma)
        r = kernel // 2
        # Column j of the blur operator is the blurred unit impulse e_j (zero padding).
        m = F.conv1d(eye[:, None, :], g.view(1, 1, -1), padding=r)[:, 0, :].T
    # Column j of the resize operator is the bicubic resize of e_j (the 2-D bicubic kernel of
    # torch is the outer product of 1-D cubic weights, border clamping included, so a
    # (n_in x 1) -> (n_out x 1) resize gives the 1-D operator exactly).
    resize = F.interpolate(eye.view(n_in, 1, n_in, 1), size=(n_out, 1), mode="bicubic",
                           align_corners=False, antialias=False)[:, 0, :, 0].T
    return (_dct_matrix64(n_out) @ resize @ m).float().to(device)


def image_band_energies(x: torch.Tensor, size: tuple[int, int], n_bins: int = 16, blur: Blur = "auto",
                        blur_kernel: int = 7, blur_sigma: float = 1.2) -> torch.Tensor:
    """Band energies (B, n_bins) of images brought to the latent grid `size` (docs/method.md §3.1-3.2),
    with the training setting (centre = mean, remove DC): the ESM target before the tilt.

    Equal to `band_energies(image_to_latent_grid(x, size, ...), **TRAINING)`, computed with
    fused operators. Centring only changes the DC coefficient of an orthonormal DCT and
    removing DC zeroes that coefficient's power, so the fused path skips the centring."""
    _check_maps(x, "image_band_energies")
    h, w = size
    use = _use_blur(blur, h)
    with _no_autocast(x):
        x = x.float()
        if use:
            a_h = _image_dct_operator(x.shape[-2], h, True, blur_kernel, float(blur_sigma), _key(x.device))
            a_w = _image_dct_operator(x.shape[-1], w, True, blur_kernel, float(blur_sigma), _key(x.device))
            coeff = a_h @ x @ a_w.T
        else:
            # Without the blur, bicubic resize reads only 4 taps per output pixel: resizing
            # literally and then transforming the small map is cheaper than a dense operator.
            coeff = dct2(F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=False))
        p = coeff.pow(2).mean(dim=1).clamp_min(POWER_FLOOR)
        p = p.clone()
        p[:, 0, 0] = 0.0
        return _band_energies_from_power(p, n_bins)


def esm_loss(x: torch.Tensor, z: torch.Tensor, delta: float = 1.0, n_bins: int = 16,
             blur: Blur = "auto", blur_kernel: int = 7, blur_sigma: float = 1.2) -> torch.Tensor:
    """Encoding Spectrum Matching loss, docs/method.md §3 steps 1-5.

    x: images in [-1, 1] (B, 3, H, W); z: sampled latents (B, C, h, w). Returns the batch mean
    of KL(p^x || p^z), each image against its own latent. Gradients flow only into z. Bins
    that are empty on the (h, w) grid are excluded on both sides (they are 0 on both sides, so
    the value equals the authors' implementation, which keeps them as zeros).
    """
    _check_maps(x, "esm_loss (images)")
    _check_maps(z, "esm_loss (latents)")
    if x.shape[0] != z.shape[0]:
        raise ValueError(f"esm_loss: batch sizes differ: images {x.shape[0]}, latents {z.shape[0]}")
    h, w = z.shape[-2:]
    with _no_autocast(z):
        with torch.no_grad():
            e_x = image_band_energies(x.detach(), (h, w), n_bins, blur, blur_kernel, blur_sigma)
            p_x = distribution_from_energies(delta_tilt(e_x, delta))
        p_z = distribution_from_energies(band_energies(z.float(), n_bins, **TRAINING))
        valid = bin_counts(h, w, n_bins).to(z.device) > 0
        return kl_divergence(p_x, p_z, valid).mean()


# --------------------------------------------------------------------------- DSM


def block_split(s: torch.Tensor, blk: int = 8) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H/blk, W/blk, blk, blk) non-overlapping blocks."""
    if s.dim() != 4:
        raise ValueError(f"block_split: expected maps of shape (B, C, H, W), got {tuple(s.shape)}")
    b, c, hh, ww = s.shape
    if blk < 1 or hh % blk or ww % blk:
        raise ValueError(f"block_split: map size {hh}x{ww} is not divisible by the block size {blk}")
    return s.reshape(b, c, hh // blk, blk, ww // blk, blk).permute(0, 1, 2, 4, 3, 5)


def block_merge(blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of `block_split`."""
    if blocks.dim() != 6:
        raise ValueError(f"block_merge: expected (B, C, nh, nw, blk, blk), got {tuple(blocks.shape)}")
    b, c, nh, nw, bh, bw = blocks.shape
    return blocks.permute(0, 1, 2, 4, 3, 5).reshape(b, c, nh * bh, nw * bw)


def dsm_keep_mask(k: int, blk: int = 8) -> torch.Tensor:
    """Shared DSM mask (blk, blk): keep coefficient (u, v) iff `u + v < 2(blk-1) - (k-1)`.
    For blk 8, k = 8, 10, 12 keep 28, 15, 6 of 64; k = 0 keeps all."""
    if k < 0:
        raise ValueError(f"dsm_keep_mask: k must be >= 0, got {k}")
    u = torch.arange(blk)[:, None]
    v = torch.arange(blk)[None, :]
    if k == 0:
        return torch.ones(blk, blk, dtype=torch.bool)
    return (u + v) < (2 * (blk - 1) - (k - 1))


@functools.lru_cache(maxsize=64)
def _block_lowpass_operator(k: int, blk: int, device: str) -> torch.Tensor:
    # Per block, DCT -> mask -> inverse DCT is one linear map on the blk*blk pixels:
    # L = (C (x) C)^T diag(mask) (C (x) C). Applied as a single (blk^2 x blk^2) matmul.
    c = _dct_matrix64(blk)
    kron = torch.kron(c, c)
    mask = dsm_keep_mask(k, blk).flatten().double()
    return (kron.T @ (mask[:, None] * kron)).float().to(device)


def block_lowpass(s: torch.Tensor, k: int, blk: int = 8) -> torch.Tensor:
    """DSM low-pass LP_k (docs/method.md §4.1-4.2) of images or latents (B, C, H, W); k = 0 returns `s`.

    Blockwise orthonormal DCT, zero the coefficients outside `dsm_keep_mask(k, blk)`, inverse
    DCT, reassemble; no clamping. Returns float32 (gradients flow into `s`).
    """
    if k == 0:
        return s
    blocks = block_split(s, blk)
    with _no_autocast(s):
        lp = _block_lowpass_operator(int(k), int(blk), _key(s.device))
        flat = blocks.float().reshape(*blocks.shape[:4], blk * blk)
        out = (flat @ lp.T).reshape(blocks.shape)
        return block_merge(out)


def scale_lowpass(s: torch.Tensor, factor: int, mode: str = "area") -> torch.Tensor:
    """Scale-equivariance low-pass (the EQ-VAE-like special case of DSM): down-sample images
    and latents by the same integer factor. **[open]** the interpolation: `area` (block mean,
    default: the box filter is what an integer down-sampling without aliasing tricks is),
    `bilinear` or `bicubic` (both antialiased)."""
    if factor < 1:
        raise ValueError(f"scale_lowpass: factor must be >= 1, got {factor}")
    if factor == 1:
        return s
    h, w = s.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"scale_lowpass: map size {h}x{w} is not divisible by the factor {factor}")
    with _no_autocast(s):
        s = s.float()
        size = (h // factor, w // factor)
        if mode == "area":
            return F.avg_pool2d(s, factor)
        if mode in ("bilinear", "bicubic"):
            return F.interpolate(s, size=size, mode=mode, align_corners=False, antialias=True)
        raise ValueError(f"scale_lowpass: mode must be area, bilinear or bicubic, got {mode!r}")


# --------------------------------------------------------------------------- REPA family


def direction_field(tokens: torch.Tensor) -> torch.Tensor:
    """Unit-length tokens (B, N, D) in float32."""
    if tokens.dim() != 3:
        raise ValueError(f"expected tokens of shape (B, N, D), got {tuple(tokens.shape)}")
    with _no_autocast(tokens):
        return F.normalize(tokens.float(), dim=-1)


def rmsc2(tokens: torch.Tensor) -> torch.Tensor:
    """Directional spectral energy (docs/method.md §7): `mean_t ||u_t - mean(u)||^2` of the unit-length
    tokens u. By Parseval it equals the non-DC DCT energy of the direction field divided by
    the number of tokens. (B, N, D) -> (B,)."""
    u = direction_field(tokens)
    return (u - u.mean(dim=1, keepdim=True)).pow(2).sum(dim=-1).mean(dim=-1)


def _gaussian_blur_reflect(y: torch.Tensor, sigma: float, truncate: float) -> torch.Tensor:
    if sigma == 0:
        return y
    h, w = y.shape[-2:]
    # Reflect padding needs pad < size: on small grids the kernel is truncated to fit.
    radius = max(1, min(math.ceil(truncate * sigma), h - 1, w - 1))
    g = torch.exp(-(torch.arange(-radius, radius + 1, dtype=torch.float64) ** 2) / (2 * sigma * sigma))
    g = (g / g.sum()).float().to(y.device)
    c = y.shape[1]
    y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(y, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def dog_filter(y: torch.Tensor, sigma1: float = 0.8, sigma2: float = 2.0, truncate: float = 3.0,
               normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Difference-of-Gaussians band-pass on a token grid (B, D, h, w), per channel (docs/method.md §7):
    `G_sigma1 * Y - G_sigma2 * Y` with reflect padding, then divided by its spatial std
    (per sample and channel) when `normalize`. sigma in tokens; sigma1 = 0 means no blur."""
    if y.dim() != 4:
        raise ValueError(f"dog_filter: expected a token grid (B, D, h, w), got {tuple(y.shape)}")
    if not (0 <= sigma1 < sigma2):
        raise ValueError(f"dog_filter: need 0 <= sigma1 < sigma2, got sigma1={sigma1}, sigma2={sigma2}")
    if min(y.shape[-2:]) < 2:
        raise ValueError(f"dog_filter: grid must be at least 2x2, got {tuple(y.shape[-2:])}")
    with _no_autocast(y):
        y = y.float()
        d = _gaussian_blur_reflect(y, sigma1, truncate) - _gaussian_blur_reflect(y, sigma2, truncate)
        if normalize:
            d = d / (d.std(dim=(-2, -1), keepdim=True, unbiased=False) + eps)
        return d


# --------------------------------------------------------------------------- summaries


def psd_slope(e: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares slope of `log E_k` against `log(k + 1)` per row (B, n_bins) -> (B,), over
    the bins that are valid (non-empty) and positive: the one-number "PSD exponent"."""
    e = e.double()
    if e.dim() == 1:
        e = e[None]
    k = torch.log(torch.arange(1, e.shape[-1] + 1, dtype=torch.float64, device=e.device))
    mask = e > 0
    if valid is not None:
        mask = mask & valid.to(e.device).bool()
    wgt = mask.double()
    n = wgt.sum(-1)
    if (n < 2).any():
        raise ValueError("psd_slope: fewer than two positive bins to fit")
    y = torch.log(torch.where(mask, e, torch.ones_like(e)))
    kx = k.expand_as(e)
    mx = (wgt * kx).sum(-1) / n
    my = (wgt * y).sum(-1) / n
    cov = (wgt * (kx - mx[:, None]) * (y - my[:, None])).sum(-1)
    var = (wgt * (kx - mx[:, None]) ** 2).sum(-1)
    return cov / var
