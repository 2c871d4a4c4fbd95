"""The frequency bias of the diffusion loss, measured per radial DCT band (docs/band-error.md).

For a trained diffusion model on held-out clean data x0 (N, C, h, w) (pixels, or latents scaled
as the model sees them), this module measures, per noise level t of a grid and per radial DCT
band k (the bins of docs/method.md §2.4, from `specmatch.spectral`):

- the **relative error** of the model's clean-data estimate x0_hat(x_t, t) = path.to_x0(...):

      rel_err[t, k] = sum_{n, c, (u,v) in B_k} DCT(x0_hat_n - x0_n)[c, u, v]^2
                      / sum_{n, c, (u,v) in B_k} (DCT(x0_n)[c, u, v] - M[c, u, v])^2

  a ratio of sums over images n, channels c and the cells of band k (channels pooled, not
  averaged separately), with M = mean over the N images of DCT(x0) per channel and cell. The
  denominator is the band's *centred* power: rel_err = 1 is "no better than the data mean",
  which is what E[x0 | x_t] tends to as t -> 1; rel_err = 0 is a perfect estimate;
- the same for the **Wiener denoiser**, in closed form from the data's own per-coefficient
  powers P[c, u, v] = mean_n (DCT(x0_n)[c, u, v] - M[c, u, v])^2 (population variance). For
  x_t = a x0 + s eps and independent Gaussian coefficients, the MMSE estimate of one coefficient
  is M + a P / (a^2 P + s^2) (X_t - a M), with expected squared error P s^2 / (a^2 P + s^2);
  its band relative error is the band sum of that over the band sum of P (`wiener_rel_err`);
- the **training loss each band carries**, under the training's own distribution of t. The
  trainer (`diffusion.train`: `path.sample_t`, `path.interpolate`, `Path.loss`) draws
  t ~ U[path.t_min, path.t_max] (VPLinear: U[t_eps, 1], t_eps = 1e-3 by default; Linear:
  U[t_eps_train, 1 - t_eps_train], U[0, 1] as the runs build it) and minimises the unweighted
  mean over all C h w elements of (prediction - target)^2 (target eps for VPLinear, velocity
  d_alpha x0 + d_sigma eps for Linear), averaged over the batch. The orthonormal DCT preserves
  sums of squares (Parseval), so that mean splits exactly into per-band parts:

      loss[k] = E_t E_{x0, eps} sum_{c, (u,v) in B_k} DCT(pred - target)[c, u, v]^2 / (C h w),

  which sum over k to the training loss. For the model, `measure` estimates loss[k] by Monte
  Carlo, with t drawn by the path's own `sample_t` (`loss_draws` draws per image) and the error
  taken directly in the target space. For the Wiener denoiser the error of one coefficient in
  target space is kappa(t)^2 P / (a^2 P + s^2), with kappa = a for eps prediction and
  kappa = a d_sigma - s d_alpha for velocity prediction (the affine conversion of the x0 error,
  written so that it stays finite at s = 0), and `wiener_band_loss` integrates it over t by
  composite Gauss-Legendre quadrature. loss_share[k] = loss[k] / sum_j loss[j].

Every mean is in float64 (the DCT matrices of `spectral.dct_matrix` applied in float64:
`spectral.dct2` works in float32, whose rounding would show in the closed-form comparisons).
Uncertainty: a half-sample bootstrap over images (`metrics.bootstrap.of_statistic`, the same
redraws for every number of one measurement).

A model is what the samplers take: ``model_fn(x_t[B, C, h, w], t[B]) -> prediction`` in the
path's parameterisation (``path.prediction``), t in x_t's dtype. For an unconditional network
``lambda x, t: net(x, t, None)``; for a class-conditional one pass ``labels`` and a
``model_fn(x_t, t, y)`` (the network's own signature, ``net``), called with each image's label
(no guidance, no label dropout). A stage wraps `measure_snapshots` with the networks that
`diffusion.artifact.load(folder, snapshot=step)` returns, one per EMA snapshot (and the final
weights), and the path `transport.from_params(summary["process"])` of the run's diffusion.json.

The half-sample bootstrap holds the mean M fixed at the full set's: where rel_err ~ 1 its spread
is an O(1/N) centring term, which that overestimates (up to 2x on Gaussian data; conservative).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import spectral
from ..errors import SpecmatchError
from ..metrics import bootstrap
from ..runtime import seeding
from .transport import Path

ModelFn = Callable[..., torch.Tensor]

__all__ = [
    "BandError", "band_table", "coefficient_power", "wiener_gain", "wiener_mse", "wiener_band_error",
    "wiener_rel_err", "wiener_band_loss", "wiener_loss_share", "wiener_model_fn", "prediction_from_x0",
    "measure", "measure_snapshots", "pooled_ratio", "improvement_step", "band_groups",
]

NOISE_STREAM = "band-error"
# Composite Gauss-Legendre: nodes per panel, and the panels, uniform and geometric in t. The
# integrands switch from one regime to the other where s(t)^2 ~ a(t)^2 P, i.e. at t ~ P / beta_min
# for VP (s^2 ~ beta_min t) and t ~ sqrt(P) for the linear path; with P spanning decades those
# switches crowd at small t, spaced on a log scale, which uniform panels alone would not resolve.
_GL_NODES = 8
_PANELS = 96


# --------------------------------------------------------------------------- checks


def _check_maps(x0: Any, what: str = "x0", min_n: int = 1) -> torch.Tensor:
    if not torch.is_tensor(x0) or not x0.is_floating_point():
        raise SpecmatchError(f"{what}: expected a floating-point tensor (N, C, h, w), got {type(x0).__name__}"
                             + (f" of {x0.dtype}" if torch.is_tensor(x0) else ""))
    if x0.dim() != 4:
        raise SpecmatchError(f"{what}: expected shape (N, C, h, w), got {tuple(x0.shape)}")
    n, _, h, w = x0.shape
    if h != w:
        raise SpecmatchError(f"{what}: maps must be square (the radial bins of docs/method.md §2.4 are measured "
                             f"on h x h maps), got {h}x{w}")
    if h < 2:
        raise SpecmatchError(f"{what}: maps must be at least 2x2, got {h}x{w}")
    if n < min_n:
        raise SpecmatchError(f"{what}: need at least {min_n} images, got {n}")
    if not bool(torch.isfinite(x0).all()):
        raise SpecmatchError(f"{what}: contains NaN or infinite values")
    return x0


def _check_bins(h: int, w: int, n_bins: Any) -> torch.Tensor:
    """The bin index of every cell; refuses an n_bins that leaves a band without any cell (its
    relative error would be 0/0)."""
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise SpecmatchError(f"n_bins: expected an integer >= 1, got {n_bins!r}")
    counts = spectral.bin_counts(h, w, n_bins)
    empty = [k for k in range(n_bins) if int(counts[k]) == 0]
    if empty:
        most = 1
        while most < h * w and bool((spectral.bin_counts(h, w, most + 1) > 0).all()):
            most += 1
        raise SpecmatchError(f"n_bins: {n_bins} radial bands leave bands {empty} of a {h}x{w} map without any DCT "
                             f"cell; expected n_bins <= {most} for this map size")
    return spectral.radial_bins(h, w, n_bins)


def _check_t(t: Any, what: str = "t") -> np.ndarray:
    try:
        arr = np.asarray(t.detach().cpu() if torch.is_tensor(t) else t, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise SpecmatchError(f"{what}: expected a sequence of noise levels in (0, 1), got {t!r}") from e
    if arr.size == 0:
        raise SpecmatchError(f"{what}: expected at least one noise level in (0, 1), got none")
    bad = [float(v) for v in arr if not (math.isfinite(v) and 0.0 < v < 1.0)]
    if bad:
        raise SpecmatchError(f"{what}: every noise level must lie in the open interval (0, 1) (t = 0 is the data, "
                             f"t = 1 pure noise), got {bad}")
    if arr.size > 1 and not bool((np.diff(arr) > 0).all()):
        raise SpecmatchError(f"{what}: noise levels must be strictly increasing, got {arr.tolist()}")
    return arr


def _check_power(P: Any, what: str = "P") -> torch.Tensor:
    if not torch.is_tensor(P) or not P.is_floating_point() or P.dim() != 3:
        raise SpecmatchError(f"{what}: expected per-coefficient powers as a floating tensor (C, h, w), got "
                             f"{tuple(P.shape) if torch.is_tensor(P) else type(P).__name__}")
    if P.shape[-1] != P.shape[-2]:
        raise SpecmatchError(f"{what}: maps must be square, got {P.shape[-2]}x{P.shape[-1]}")
    if not bool(torch.isfinite(P).all()) or bool((P < 0).any()):
        raise SpecmatchError(f"{what}: powers must be finite and >= 0")
    return P.to(torch.float64)


# --------------------------------------------------------------------------- bands


def _dct64(x: torch.Tensor) -> torch.Tensor:
    d = spectral.dct_matrix(x.shape[-1], x.device, torch.float64)
    return d @ x.to(torch.float64) @ d.T


def _idct64(X: torch.Tensor) -> torch.Tensor:
    d = spectral.dct_matrix(X.shape[-1], X.device, torch.float64)
    return d.T @ X.to(torch.float64) @ d


def _one_hot(bins: torch.Tensor, n_bins: int, device) -> torch.Tensor:
    """(h*w, n_bins) float64: a matmul with it sums a flattened map over each band."""
    flat = bins.flatten()
    m = torch.zeros(flat.numel(), n_bins, dtype=torch.float64)
    m[torch.arange(flat.numel()), flat] = 1.0
    return m.to(device)


def _band_sums(sq: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """(..., C, h, w) squares -> (..., K): summed over channels and the cells of each band."""
    return sq.sum(dim=-3).flatten(-2) @ onehot


def band_table(h: int, n_bins: int = 16) -> list[dict[str, float]]:
    """The bands of an h x h map: index, number of DCT cells, radial range [r_lo, r_hi) in DCT
    index units (r = sqrt(u^2 + v^2), docs/method.md §2.4; the last band includes r_max) and the
    same range in cycles per map sample (DCT index u is u / (2 h) cycles per sample)."""
    _check_bins(h, h, n_bins)
    counts = spectral.bin_counts(h, h, n_bins)
    r_max = math.sqrt(2.0) * (h - 1)
    return [{"k": k, "cells": int(counts[k]), "r_lo": k * r_max / n_bins, "r_hi": (k + 1) * r_max / n_bins,
             "f_lo": k * r_max / n_bins / (2 * h), "f_hi": (k + 1) * r_max / n_bins / (2 * h)}
            for k in range(n_bins)]


def band_groups(n_bins: int = 16) -> dict[str, list[int]]:
    """Low, mid and high bands: thirds of the radial range (for 16 bins: 0-5, 6-10, 11-15; the high
    third lies beyond r = 0.69 r_max, the cells past the axes' Nyquist, diagonal detail only)."""
    lo, hi = math.ceil(n_bins / 3), math.ceil(2 * n_bins / 3)
    return {"low": list(range(lo)), "mid": list(range(lo, hi)), "high": list(range(hi, n_bins))}


# --------------------------------------------------------------------------- closed form


def coefficient_power(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, M), both (C, h, w) float64: per channel and DCT cell, the mean M of DCT(x0) over the N
    images and its unbiased variance P = sum_n (DCT(x0_n) - M)^2 / (N - 1) (unbiased, so that a
    model that returns the true mean scores rel_err = 1 in expectation, not N / (N - 1))."""
    x0 = _check_maps(x0, "x0", min_n=2)
    n = x0.shape[0]
    s1 = torch.zeros(x0.shape[1:], dtype=torch.float64)
    s2 = torch.zeros_like(s1)
    for b in range(0, n, 256):  # bounded memory on large pixel maps
        X = _dct64(x0[b:b + 256]).cpu()
        s1 += X.sum(0)
        s2 += X.square().sum(0)
    m = s1 / n
    # The shifted form cancels when |M| >> sqrt(P); recompute the deviations exactly then.
    p = torch.zeros_like(s1)
    for b in range(0, n, 256):
        p += (_dct64(x0[b:b + 256]).cpu() - m).square().sum(0)
    return p / (n - 1), m


def _schedule(path: Path, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    t = t.to(torch.float64)
    return path.alpha(t), path.sigma(t), path.d_alpha(t), path.d_sigma(t)


def wiener_gain(P: torch.Tensor, a, s) -> torch.Tensor:
    """The MMSE gain of one centred Gaussian coefficient of variance P seen as a X + s eps:
    a P / (a^2 P + s^2)."""
    return a * P / (a * a * P + s * s)


def wiener_mse(P: torch.Tensor, a, s) -> torch.Tensor:
    """Its expected squared error P s^2 / (a^2 P + s^2)."""
    return P * s * s / (a * a * P + s * s)


def wiener_band_error(P: torch.Tensor, path: Path, t: Any, n_bins: int = 16) -> torch.Tensor:
    """(T, K) float64: sum over channels and the cells of band k of the Wiener x0 error
    P s^2 / (a^2 P + s^2), at each t of the grid."""
    P = _check_power(P)
    tt = torch.from_numpy(_check_t(t))
    onehot = _one_hot(_check_bins(P.shape[-2], P.shape[-1], n_bins), n_bins, "cpu")
    a, s, _, _ = _schedule(path, tt)
    err = wiener_mse(P[None], a[:, None, None, None], s[:, None, None, None])
    return _band_sums(err, onehot)


def wiener_rel_err(P: torch.Tensor, path: Path, t: Any, n_bins: int = 16) -> torch.Tensor:
    """(T, K) float64: the Wiener denoiser's band relative error, band sum of P s^2 / (a^2 P + s^2)
    over band sum of P (channels pooled), at each t of the grid."""
    P = _check_power(P)
    onehot = _one_hot(_check_bins(P.shape[-2], P.shape[-1], n_bins), n_bins, "cpu")
    power = _band_sums(P, onehot)
    dead = [k for k in range(n_bins) if float(power[k]) <= 0]
    if dead:
        raise SpecmatchError(f"P: bands {dead} have no power, so their relative error is undefined")
    return wiener_band_error(P, path, t, n_bins) / power


def _quadrature(t_lo: float, t_hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of the mean over U[t_lo, t_hi] (weights sum to 1)."""
    edges = np.linspace(t_lo, t_hi, _PANELS // 2 + 1)
    geo_lo = max(t_lo, 1e-9 * (t_hi - t_lo))
    geo = np.geomspace(geo_lo, t_hi, _PANELS // 2 + 1)
    edges = np.unique(np.concatenate([edges, geo, [t_lo]]))
    x, w = np.polynomial.legendre.leggauss(_GL_NODES)
    lo, hi = edges[:-1, None], edges[1:, None]
    nodes = (lo + hi) / 2 + (hi - lo) / 2 * x[None]
    weights = (hi - lo) / 2 * w[None] / (t_hi - t_lo)
    return torch.from_numpy(nodes.reshape(-1)), torch.from_numpy(weights.reshape(-1))


def _kappa(path: Path, a, s, da, ds):
    """Target-space error = kappa / s times the x0 error (the affine conversion at t): eps_hat - eps
    = -(a / s)(x0_hat - x0); v_hat - v = (d_alpha - d_sigma a / s)(x0_hat - x0)."""
    return a if path.prediction == "eps" else a * ds - s * da


def wiener_band_loss(P: torch.Tensor, path: Path, n_bins: int = 16) -> torch.Tensor:
    """(K,) float64: the Wiener denoiser's training loss per band, in the trainer's units (mean
    over the C h w elements; the bands sum to the loss), averaged over t ~ U[path.t_min,
    path.t_max] by composite Gauss-Legendre quadrature of kappa(t)^2 P / (a^2 P + s^2)."""
    P = _check_power(P)
    onehot = _one_hot(_check_bins(P.shape[-2], P.shape[-1], n_bins), n_bins, "cpu")
    nodes, weights = _quadrature(float(path.t_min), float(path.t_max))
    total = torch.zeros(n_bins, dtype=torch.float64)
    flat = P.reshape(P.shape[0], -1)
    for b in range(0, nodes.numel(), 32):
        a, s, da, ds = (c[:, None, None] for c in _schedule(path, nodes[b:b + 32]))
        k2 = _kappa(path, a, s, da, ds) ** 2
        dens = k2 * flat[None] / (a * a * flat[None] + s * s).clamp_min(1e-300)
        total += (weights[b:b + 32, None] * (dens.sum(1) @ onehot)).sum(0)
    return total / P.numel()


def wiener_loss_share(P: torch.Tensor, path: Path, n_bins: int = 16) -> torch.Tensor:
    """(K,) float64: `wiener_band_loss` normalised to sum 1."""
    loss = wiener_band_loss(P, path, n_bins)
    return loss / loss.sum()


def prediction_from_x0(path: Path, x0_hat: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
    """The path's prediction (eps, or velocity d_alpha x0_hat + d_sigma eps_hat) that `path.to_x0`
    maps back to x0_hat at (x_t, t), with eps_hat = (x_t - a x0_hat) / s (s > 0)."""
    a, s, da, ds = _coeffs(path, x_t, t)
    eps_hat = (x_t - a * x0_hat) / s
    return eps_hat if path.prediction == "eps" else da * x0_hat + ds * eps_hat


def _coeffs(path: Path, x: torch.Tensor, t) -> tuple[torch.Tensor, ...]:
    """alpha, sigma, d_alpha, d_sigma at t (a number, 0-dim or [B]) in float64, shaped to
    multiply x."""
    tt = torch.as_tensor(t, dtype=torch.float64).to(x.device)
    shape = (-1,) + (1,) * (x.dim() - 1) if tt.dim() == 1 else ()
    return tuple(c.reshape(shape) if shape else c for c in _schedule(path, tt))


def wiener_model_fn(P: torch.Tensor, path: Path, mean: torch.Tensor | None = None) -> ModelFn:
    """The Wiener denoiser as a sampler's model: ``model_fn(x_t, t) -> prediction`` of ``path``.

    Per channel and DCT cell, x0_hat = M + g (X_t - a M) with g = a P / (a^2 P + s^2) and
    eps_hat = s (X_t - a M) / (a^2 P + s^2) (so that a x0_hat + s eps_hat = X_t exactly, also at
    s = 0); the prediction is eps_hat, or d_alpha x0_hat + d_sigma eps_hat for a velocity path,
    returned in x_t's dtype. ``mean``: M in the DCT domain (`coefficient_power`'s second value),
    None for centred data.
    """
    P = _check_power(P)
    M = None
    if mean is not None:
        if not torch.is_tensor(mean) or tuple(mean.shape) != tuple(P.shape) or not bool(torch.isfinite(mean).all()):
            got = tuple(mean.shape) if torch.is_tensor(mean) else type(mean).__name__
            raise SpecmatchError(f"mean: expected finite DCT-domain means shaped like P {tuple(P.shape)}, got {got}")
        M = mean.to(torch.float64)

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x_t.dim() != 4 or tuple(x_t.shape[1:]) != tuple(P.shape):
            raise SpecmatchError(f"wiener model: x_t must be (B, {', '.join(map(str, P.shape))}) like P, "
                                 f"got {tuple(x_t.shape)}")
        a, s, da, ds = _coeffs(path, x_t, t)
        p = P.to(x_t.device)
        X = _dct64(x_t)
        if M is not None:
            X = X - a * M.to(x_t.device)
        denom = (a * a * p + s * s).clamp_min(1e-300)
        x0_hat = a * p * X / denom + (M.to(x_t.device) if M is not None else 0.0)
        eps_hat = s * X / denom
        pred = eps_hat if path.prediction == "eps" else da * x0_hat + ds * eps_hat
        return _idct64(pred).to(x_t.dtype)

    return model_fn


# --------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class PerImage:
    """Per-image sums behind one measurement (kept in memory for further bootstraps, never
    written): err (N, T, K) band sums of DCT(x0_hat - x0)^2; power (N, K) band sums of the centred
    DCT(x0)^2; loss (N, K) band parts of the training loss, averaged over the image's draws."""

    err: np.ndarray
    power: np.ndarray
    loss: np.ndarray


@dataclass(eq=False)
class BandError:
    """One measurement (module docstring and docs/band-error.md define every quantity).

    Arrays are float64 numpy: t (T,), band_power (K,) the centred power per DCT cell of each band
    (mean over channels and cells, `spectral.band_energies` of x0 minus its mean image),
    rel_err / rel_err_se / rel_err_wiener (T, K), loss_* and loss_share_* (K,). ``*_se`` is None
    when no bootstrap was asked for (n_boot = 0).
    """

    label: str
    path: dict[str, Any]
    shape: tuple[int, int, int]
    n_images: int
    seed: int
    n_bins: int
    t: np.ndarray
    bands: list[dict[str, float]]
    band_power: np.ndarray
    rel_err: np.ndarray
    rel_err_se: np.ndarray | None
    rel_err_wiener: np.ndarray
    loss_model: np.ndarray
    loss_model_se: np.ndarray | None
    loss_wiener: np.ndarray
    loss_share_model: np.ndarray
    loss_share_model_se: np.ndarray | None
    loss_share_wiener: np.ndarray
    loss_draws: int
    n_boot: int
    measured: str = ""
    per_image: PerImage | None = field(default=None, repr=False)

    ARRAYS = ("t", "band_power", "rel_err", "rel_err_se", "rel_err_wiener", "loss_model", "loss_model_se",
              "loss_wiener", "loss_share_model", "loss_share_model_se", "loss_share_wiener")

    def excess_ratio(self) -> np.ndarray:
        """(K,) loss_model / loss_wiener: the loss-weighted error relative to the Gaussian optimum."""
        return self.loss_model / self.loss_wiener

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "path": self.path, "shape": list(self.shape),
                               "n_images": self.n_images, "seed": self.seed, "n_bins": self.n_bins,
                               "bands": self.bands, "loss_draws": self.loss_draws, "n_boot": self.n_boot,
                               "measured": self.measured}
        for k in self.ARRAYS:
            v = getattr(self, k)
            out[k] = None if v is None else np.asarray(v, np.float64).tolist()
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "BandError":
        missing = [k for k in ("label", "path", "shape", "n_images", "seed", "n_bins", "bands", "loss_draws",
                               "n_boot", *cls.ARRAYS) if k not in d]
        if missing:
            raise SpecmatchError(f"band error record: missing keys {missing}")
        arrays = {k: None if d[k] is None else np.asarray(d[k], np.float64) for k in cls.ARRAYS}
        return cls(label=str(d["label"]), path=dict(d["path"]), shape=tuple(int(v) for v in d["shape"]),
                   n_images=int(d["n_images"]), seed=int(d["seed"]), n_bins=int(d["n_bins"]),
                   bands=[dict(b) for b in d["bands"]], loss_draws=int(d["loss_draws"]), n_boot=int(d["n_boot"]),
                   measured=str(d.get("measured", "")), **arrays)


MEASURED = ("rel_err[t,k] = sum over images, channels and band-k cells of DCT(x0_hat - x0)^2 / the same sum of "
            "(DCT(x0) - M)^2, M the mean over images per channel and cell; rel_err_wiener: the closed-form Wiener "
            "denoiser from the per-coefficient variances P of the same images; loss_model[k]: band k's part of the "
            "training loss (mean over C*h*w elements of (prediction - target)^2), Monte Carlo over t drawn by "
            "path.sample_t; loss_wiener[k]: the same for the Wiener denoiser, Gauss-Legendre quadrature over "
            "t ~ U[t_min, t_max]; loss_share = loss / sum over bands; *_se: half-sample bootstrap over images")


def _path_record(path: Path) -> dict[str, Any]:
    return {"name": path.name, "prediction": path.prediction, "repr": repr(path),
            "train_t": [float(path.t_min), float(path.t_max)]}


def _call(model_fn: ModelFn, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, what: str) -> torch.Tensor:
    pred = model_fn(x_t, t) if y is None else model_fn(x_t, t, y)
    if not torch.is_tensor(pred) or tuple(pred.shape) != tuple(x_t.shape):
        got = tuple(pred.shape) if torch.is_tensor(pred) else type(pred).__name__
        raise SpecmatchError(f"model_fn: must return a prediction shaped like x_t {tuple(x_t.shape)}, got {got} "
                             f"({what})")
    if not bool(torch.isfinite(pred).all()):
        raise SpecmatchError(f"model_fn: returned NaN or infinite values ({what})")
    return pred


def _noise(gens: list[torch.Generator], shape, dtype, device) -> torch.Tensor:
    # Drawn in float64 whatever x0's dtype, so that a float32 and a float64 measurement of the
    # same seed see the same noise (rounded).
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float64) for g in gens]).to(device, dtype)


def _per_image(model_fn: ModelFn, path: Path, x0: torch.Tensor, t: np.ndarray, n_bins: int, seed: int,
               labels: torch.Tensor | None, batch_size: int, loss_draws: int, device, M: torch.Tensor) -> PerImage:
    n, c, h, w = x0.shape
    onehot = _one_hot(spectral.radial_bins(h, w, n_bins), n_bins, device)
    dtype = x0.dtype
    shape = (c, h, w)
    err = np.zeros((n, len(t), n_bins))
    power = np.zeros((n, n_bins))
    loss = np.zeros((n, n_bins))
    Md = M.to(device)
    for b0 in range(0, n, batch_size):
        rows = range(b0, min(n, b0 + batch_size))
        # One generator per image, seeded by (seed, image index): the draws of an image do not
        # depend on the batch size, and every snapshot of a series sees the same ones.
        gens = [torch.Generator().manual_seed(seeding.step_seed(seed, i, NOISE_STREAM)) for i in rows]
        t_draw = torch.stack([path.sample_t(loss_draws, g) for g in gens])  # (B, D), float32 as in training
        xb = x0[b0:b0 + len(gens)].to(device)
        yb = None if labels is None else labels[b0:b0 + len(gens)].to(device)
        # Scaled by N / (N - 1): the mean over images of `power` is then the band sum of the
        # unbiased P of `coefficient_power`, the Wiener closed form's denominator.
        power[b0:b0 + len(gens)] = _band_sums((_dct64(xb) - Md).square(), onehot).cpu().numpy() * (n / (n - 1))
        for j, tj in enumerate(t.tolist()):
            eps = _noise(gens, shape, dtype, device)
            a, s = (float(v) for v in _schedule(path, torch.tensor(tj, dtype=torch.float64))[:2])
            x_t = a * xb + s * eps
            pred = _call(model_fn, x_t, torch.full((len(gens),), tj, dtype=dtype, device=device), yb, f"t={tj:g}")
            x0_hat = path.to_x0(pred, x_t, tj)
            err[b0:b0 + len(gens), j] = _band_sums(_dct64(x0_hat - xb).square(), onehot).cpu().numpy()
        acc = torch.zeros(len(gens), n_bins, dtype=torch.float64, device=device)
        for d in range(loss_draws):
            eps = _noise(gens, shape, dtype, device)
            tt = t_draw[:, d].to(device)
            x_t, target = path.interpolate(xb, eps, tt)
            pred = _call(model_fn, x_t, tt.to(dtype), yb, "training-time draw")
            acc += _band_sums(_dct64(pred - target).square(), onehot)
        loss[b0:b0 + len(gens)] = (acc / (loss_draws * c * h * w)).cpu().numpy()
    return PerImage(err, power, loss)


def _halves(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) 0/1 weights of the redrawn halves that `bootstrap.of_statistic` uses with this
    seed, recorded through it (its last call is the full set, the point estimate), so that the
    hundreds of ratios of one measurement are bootstrapped by matrix products on the very same
    redraws."""
    drawn: list[np.ndarray] = []
    bootstrap.of_statistic(n, lambda i: drawn.append(np.asarray(i)) or float(len(drawn)), n_boot, seed)
    if len(drawn) != n_boot + 1 or len(drawn[-1]) != n:
        raise RuntimeError("metrics.bootstrap.of_statistic no longer evaluates the halves, then the full set")
    w = np.zeros((n_boot, n))
    for b, idx in enumerate(drawn[:n_boot]):
        w[b, idx] = 1.0
    return w


def _ratio_se(w: np.ndarray, num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Bootstrap SE (std over the halves, ddof 1, as `bootstrap.of_statistic`) of sum(num) / sum(den)
    over images, for num (N, ...) and den broadcastable to it."""
    nums = np.tensordot(w, num, axes=(1, 0))
    dens = np.tensordot(w, den, axes=(1, 0))
    return np.std(nums / dens, axis=0, ddof=1)


def _summarise(per: PerImage, P: torch.Tensor, band_power: np.ndarray, path: Path, t: np.ndarray, n_bins: int,
               n_boot: int, seed: int, label: str, shape, loss_draws: int, bands) -> BandError:
    n = per.err.shape[0]
    den = per.power.sum(0)
    dead = [k for k in range(n_bins) if den[k] <= 0]
    if dead:
        raise SpecmatchError(f"x0: bands {dead} have no power across the images (constant maps?), so their relative "
                             "error is undefined")
    rel = per.err.sum(0) / den[None]
    loss = per.loss.mean(0)
    share = loss / loss.sum()
    rel_se = loss_se = share_se = None
    if n_boot:
        w = _halves(n, n_boot, _boot_seed(seed))
        rel_se = _ratio_se(w, per.err, per.power[:, None, :])
        loss_se = _ratio_se(w, per.loss, np.ones((n, 1)))
        share_se = _ratio_se(w, per.loss, per.loss.sum(1, keepdims=True))
    lw = wiener_band_loss(P, path, n_bins).numpy()
    return BandError(label=label, path=_path_record(path), shape=tuple(int(v) for v in shape), n_images=n,
                     seed=seed, n_bins=n_bins, t=t.copy(), bands=bands, band_power=band_power, rel_err=rel,
                     rel_err_se=rel_se, rel_err_wiener=wiener_rel_err(P, path, t, n_bins).numpy(), loss_model=loss,
                     loss_model_se=loss_se, loss_wiener=lw, loss_share_model=share, loss_share_model_se=share_se,
                     loss_share_wiener=lw / lw.sum(), loss_draws=loss_draws, n_boot=n_boot, measured=MEASURED,
                     per_image=per)


def _boot_seed(seed: int) -> int:
    return seeding.step_seed(seed, 0, "band-error-bootstrap")


def _check_run(path, x0, t, n_bins, seed, labels, batch_size, n_boot, loss_draws):
    if not isinstance(path, Path):
        raise SpecmatchError(f"path: expected a diffusion path (transport.VPLinear or Linear), got {path!r}")
    x0 = _check_maps(x0, "x0", min_n=6 if n_boot else 2)
    tt = _check_t(t)
    _check_bins(x0.shape[-2], x0.shape[-1], n_bins)
    for key, val, lo in (("seed", seed, 0), ("batch_size", batch_size, 1), ("loss_draws", loss_draws, 1),
                         ("n_boot", n_boot, 0)):
        if not isinstance(val, int) or isinstance(val, bool) or val < lo:
            raise SpecmatchError(f"{key}: expected an integer >= {lo}, got {val!r}")
    if n_boot == 1:
        raise SpecmatchError("n_boot: expected 0 (no bootstrap) or >= 2 redraws, got 1")
    if labels is not None and (not torch.is_tensor(labels) or labels.dim() != 1 or len(labels) != len(x0)):
        got = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
        raise SpecmatchError(f"labels: expected one label per image of x0, shape ({len(x0)},), got {got}")
    return x0, tt


def measure(model_fn: ModelFn, path: Path, x0: torch.Tensor, t: Sequence[float], n_bins: int = 16, seed: int = 0,
            *, labels: torch.Tensor | None = None, batch_size: int = 64, n_boot: int = 100, loss_draws: int = 1,
            device: torch.device | str | None = None, label: str = "") -> BandError:
    """Band errors of one model on held-out x0 (N, C, h, h): `rel_err` on the t grid, the Wiener
    closed form from x0's own powers, and the training loss per band (module docstring).

    Noise and training-time draws come from one generator per image seeded by (seed, image
    index): they do not depend on ``batch_size`` and are the same for every model measured with
    the same seed. ``device``: where the model runs (default: x0's device).
    """
    x0, tt = _check_run(path, x0, t, n_bins, seed, labels, batch_size, n_boot, loss_draws)
    P, M = coefficient_power(x0)
    dev = torch.device(device) if device is not None else x0.device
    with torch.no_grad():
        per = _per_image(model_fn, path, x0, tt, n_bins, seed, labels, batch_size, loss_draws, dev, M)
    return _summarise(per, P, _band_power(x0, M, n_bins), path, tt, n_bins, n_boot, seed, label, x0.shape[1:],
                      loss_draws, band_table(x0.shape[-1], n_bins))


def _band_power(x0: torch.Tensor, M: torch.Tensor, n_bins: int) -> np.ndarray:
    """Mean over images of the band energies E_k (docs/method.md §2.4, `spectral.band_energies`) of
    x0 minus its mean image: the centred power per DCT cell, channels averaged."""
    mean_image = _idct64(M).to(x0.dtype)
    acc = torch.zeros(n_bins, dtype=torch.float64)
    for b in range(0, len(x0), 256):
        acc += spectral.band_energies(x0[b:b + 256].cpu() - mean_image, n_bins).double().sum(0)
    return (acc / (len(x0) - 1)).numpy()


def measure_snapshots(snapshots: Sequence[tuple[str, ModelFn]], path: Path, x0: torch.Tensor, t: Sequence[float],
                      n_bins: int = 16, seed: int = 0, **kw) -> list[BandError]:
    """`measure` for each (label, model_fn) of a training run's snapshots, in order, on the same
    images, noise and training-time draws (the same seed): the differences are the weights'."""
    if not snapshots:
        raise SpecmatchError("snapshots: expected at least one (label, model_fn) pair, got none")
    labels_seen = [lab for lab, _ in snapshots]
    if len(set(labels_seen)) != len(labels_seen):
        raise SpecmatchError(f"snapshots: labels must be distinct, got {labels_seen}")
    return [measure(fn, path, x0, t, n_bins, seed, label=str(lab), **kw) for lab, fn in snapshots]


# --------------------------------------------------------------------------- claim C0 summaries


def pooled_ratio(result: BandError, bands: Sequence[int], versus: Sequence[int] | None = None,
                 n_boot: int | None = None) -> tuple[float, float]:
    """(value, bootstrap SE) of the loss-weighted error relative to the optimum pooled over
    ``bands``, rho_G = sum_{k in G} loss_model[k] / sum_{k in G} loss_wiener[k]; with ``versus``,
    of the difference rho_versus - rho_bands (the same image halves on both sides). Needs the
    in-memory per-image sums of a fresh `measure`."""
    if result.per_image is None:
        raise SpecmatchError(f"{result.label or 'result'}: no per-image sums (read back from JSON?); measure again")
    lw = result.loss_wiener
    loss = result.per_image.loss
    g = list(bands)
    v = list(versus) if versus is not None else None

    def stat(i: np.ndarray) -> float:
        rho = loss[i][:, g].sum(1).mean() / lw[g].sum()
        return rho if v is None else loss[i][:, v].sum(1).mean() / lw[v].sum() - rho

    nb = n_boot or result.n_boot
    value = stat(np.arange(len(loss)))
    if not nb:
        return float(value), float("nan")
    return float(value), bootstrap.of_statistic(len(loss), stat, nb, _boot_seed(result.seed)).std


def improvement_step(steps: Sequence[float], values: np.ndarray, fraction: float = 0.5) -> np.ndarray:
    """For a series values[s, k] over training steps (e.g. each snapshot's excess_ratio()), the
    step at which each band first reaches ``fraction`` of its improvement from the first to the
    last snapshot, linearly interpolated between snapshots (NaN where a band did not improve)."""
    steps = np.asarray(steps, np.float64)
    v = np.asarray(values, np.float64)
    if v.ndim != 2 or len(steps) != v.shape[0] or len(steps) < 2:
        raise SpecmatchError(f"improvement_step: expected values (S, K) for S >= 2 steps, got {v.shape} for "
                             f"{len(steps)} steps")
    if not 0.0 < fraction <= 1.0:
        raise SpecmatchError(f"fraction: expected a number in (0, 1], got {fraction}")
    out = np.full(v.shape[1], np.nan)
    for k in range(v.shape[1]):
        total = v[0, k] - v[-1, k]
        if not total > 0:
            continue
        phi = (v[0, k] - v[:, k]) / total
        hit = np.nonzero(phi >= fraction)[0][0]
        if hit == 0:
            out[k] = steps[0]
        else:
            f0, f1 = phi[hit - 1], phi[hit]
            out[k] = steps[hit - 1] + (fraction - f0) / (f1 - f0) * (steps[hit] - steps[hit - 1])
    return out
