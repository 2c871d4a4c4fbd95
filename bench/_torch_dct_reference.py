"""Reference spectral core written the way the authors' public code is written.

Used by tests/test_spectral.py (as the independent truth for `specmatch.spectral`) and by
bench/spectral.py (as the baseline that our fused matrix implementation is timed against).
One copy on purpose: the tests and the benchmark must compare against the same thing.

Deliberately naive, and deliberately sharing no code with `specmatch.spectral`: the DCT is
the FFT-based `torch_dct` package, the blur is an explicit 2-D Gaussian convolution, the
resize is a real `F.interpolate` call, centring is an explicit subtraction and the radial
bins are averaged in a python loop over boolean masks. It runs in whatever dtype it is
given (the tests feed float64 to get a more exact truth; the benchmark feeds float32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch_dct


def gaussian_kernel_2d(kernel_size: int, sigma: float, channels: int, device=None,
                       dtype=torch.float32) -> torch.Tensor:
    """Depthwise (channels, 1, k, k) Gaussian, normalised to sum 1."""
    ax = torch.arange(kernel_size, device=device, dtype=dtype) - (kernel_size - 1) / 2.0
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    k = torch.exp(-(xx ** 2 + yy ** 2) / (2.0 * sigma ** 2))
    k = k / k.sum()
    return k.view(1, 1, kernel_size, kernel_size).repeat(channels, 1, 1, 1)


def gaussian_blur(x: torch.Tensor, kernel_size: int = 7, sigma: float = 1.2) -> torch.Tensor:
    kern = gaussian_kernel_2d(kernel_size, sigma, x.shape[1], x.device, x.dtype)
    return F.conv2d(x, kern, padding=kernel_size // 2, groups=x.shape[1])


def blur_and_resize(x: torch.Tensor, size, blur: str = "auto", kernel_size: int = 7,
                    sigma: float = 1.2) -> torch.Tensor:
    """Images to the latent grid: Gaussian blur (zero padding) then bicubic resize.
    blur="auto" skips the blur for 32-pixel-high latents, as the authors do."""
    h, w = size
    use_blur = {"auto": h != 32, "on": True, "off": False}[blur]
    if use_blur:
        x = gaussian_blur(x, kernel_size, sigma)
    return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)


def radial_bin_index(h: int, w: int, n_bins: int = 16, device=None) -> torch.Tensor:
    u = torch.arange(h, device=device, dtype=torch.float64).view(-1, 1)
    v = torch.arange(w, device=device, dtype=torch.float64).view(1, -1)
    r = torch.sqrt(u ** 2 + v ** 2)
    r_max = math.sqrt((h - 1) ** 2 + (w - 1) ** 2)
    idx = torch.floor(n_bins * r / r_max).long()
    return torch.clamp(idx, max=n_bins - 1)


def power_map(s: torch.Tensor, center: str = "none", remove_dc: bool = False) -> torch.Tensor:
    if center == "mean":
        s = s - s.mean(dim=(-2, -1), keepdim=True)
    coeff = torch_dct.dct_2d(s, norm="ortho")
    p = (coeff ** 2).mean(dim=1)
    p = torch.clamp(p, min=1e-12)
    if remove_dc:
        p = p.clone()
        p[:, 0, 0] = 0.0
    return p


def band_energies(s: torch.Tensor, n_bins: int = 16, center: str = "none",
                  remove_dc: bool = False) -> torch.Tensor:
    p = power_map(s, center, remove_dc)
    h, w = p.shape[-2:]
    bins = radial_bin_index(h, w, n_bins, p.device)
    energies = []
    for k in range(n_bins):
        mask = bins == k
        if mask.any():
            energies.append(p[:, mask].mean(dim=-1))
        else:
            # Empty bin on a small map: 0 (where the authors' P[mask].mean() would give NaN).
            energies.append(torch.zeros(p.shape[0], device=p.device, dtype=p.dtype))
    return torch.stack(energies, dim=-1)


def spectrum_distribution(s: torch.Tensor, n_bins: int = 16, center: str = "none",
                          remove_dc: bool = False, delta: float = 0.0) -> torch.Tensor:
    e = band_energies(s, n_bins, center, remove_dc)
    k = torch.arange(n_bins, device=e.device, dtype=e.dtype)
    e = e * (k + 1) ** delta
    q = torch.log(1 + e)
    return q / q.sum(dim=-1, keepdim=True)


def esm_loss(x: torch.Tensor, z: torch.Tensor, delta: float = 1.0, n_bins: int = 16,
             blur: str = "auto", blur_kernel: int = 7, blur_sigma: float = 1.2) -> torch.Tensor:
    with torch.no_grad():
        x_lat = blur_and_resize(x.detach(), z.shape[-2:], blur, blur_kernel, blur_sigma)
    return esm_loss_on_grid(x_lat, z, delta, n_bins)


def esm_loss_on_grid(x_lat: torch.Tensor, z: torch.Tensor, delta: float = 1.0,
                     n_bins: int = 16) -> torch.Tensor:
    """The rest of the ESM loss, from images already on the latent grid (split out so that
    the tests can reuse one expensive float64 blur across many cases)."""
    with torch.no_grad():
        p_x = spectrum_distribution(x_lat.detach(), n_bins, center="mean", remove_dc=True, delta=delta)
    p_z = spectrum_distribution(z, n_bins, center="mean", remove_dc=True, delta=0.0)
    kl = (p_x * (torch.log(p_x + 1e-8) - torch.log(p_z + 1e-8))).sum(dim=-1)
    return kl.mean()


def block_lowpass(s: torch.Tensor, k: int, blk: int = 8) -> torch.Tensor:
    if k == 0:
        return s
    b, c, hh, ww = s.shape
    blocks = s.reshape(b, c, hh // blk, blk, ww // blk, blk).permute(0, 1, 2, 4, 3, 5)
    coeff = torch_dct.dct_2d(blocks, norm="ortho")
    u = torch.arange(blk, device=s.device).view(-1, 1)
    v = torch.arange(blk, device=s.device).view(1, -1)
    drop = (u + v) >= 2 * (blk - 1) - (k - 1)
    coeff = coeff.masked_fill(drop, 0.0)
    blocks = torch_dct.idct_2d(coeff, norm="ortho")
    return blocks.permute(0, 1, 2, 4, 3, 5).reshape(b, c, hh, ww)
