"""Uncertainty of a Fréchet distance over the sampled images: a half-sample bootstrap.

A distance between two finite sets of images varies with the draw of the images. Its bootstrap
redraws the images (seeded), recomputes the statistics and the distance, and reports the spread
of those distances as the standard error of the number, with a normal 95% interval around it.

The redraws are halves without replacement (n/2 of the n images, the delete-n/2 jackknife), not
the classic n draws with replacement: duplicated images shrink a covariance's effective rank, and
a Fréchet distance of features whose dimension exceeds the number of images (128 samples of
1280-dimensional features in the tiny preset) then moves far more between redraws than between
real draws of new images. Measured on Gaussian features against fixed reference statistics, the
with-replacement spread overestimated the real one 6x (n = 128, d = 256) and 2x (16, 24); the
half-sample spread, which for a smooth statistic has the variance of the full-size one (a
half-sample's variance ratio (n - m) / m is 1 at m = n/2), 1.4x and 1.4x, and 1.1x with n > d
(200, 24): a conservative error bar (tests/test_metrics_bootstrap.py checks its range). Two
cases:
- one side fixed (`fid calc`: samples against reference statistics of a large real set): only
  the samples are resampled;
- paired sides (`eval-ae`'s reconstruction and low-pass distances: image i and its
  reconstruction): the same indices are drawn on both sides, as the images come in pairs.

scipy's `sqrtm` (what the reported distance uses, as pytorch-fid does) takes seconds on a 2048
x 2048 product, too slow for tens of resamples. The bootstrap uses the same quantity computed
from symmetric eigendecompositions, exact for positive semi-definite covariances:
Tr sqrt(S1 S2) = sum_i sqrt(lambda_i(R S2 R)) with R = S1^(1/2), and, when a side has fewer
images n than dimensions, the n x n form Tr sqrt(S1 S2) = ||B A^T||_* / sqrt((n1-1)(n2-1)) for
centred feature matrices A, B (the nuclear norm: the nonzero eigenvalues of S1 S2 are the
squared singular values of B A^T scaled). Both agree with `fid.frechet_distance` to rounding
(tested); the bootstrap spread is of that distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SpecmatchError


@dataclass(frozen=True)
class Bootstrap:
    """The spread of a distance over `n` redraws: `std` (its standard error) and the normal 95%
    interval [low, high] = point -/+ 1.96 std around the distance of all the images."""

    n: int
    std: float
    low: float
    high: float
    seed: int
    method: str = "half-sample (n/2 without replacement)"

    def to_json(self) -> dict:
        return {"n": self.n, "std": self.std, "ci95": [self.low, self.high], "seed": self.seed, "method": self.method}

    @classmethod
    def from_json(cls, d: dict) -> "Bootstrap":
        return cls(int(d["n"]), float(d["std"]), float(d["ci95"][0]), float(d["ci95"][1]), int(d["seed"]),
                   str(d.get("method", cls.method)))


def _summary(point: float, values: np.ndarray, seed: int) -> Bootstrap:
    std = float(np.std(values, ddof=1))
    return Bootstrap(int(len(values)), std, float(point - 1.96 * std), float(point + 1.96 * std), int(seed))


def _halves(n: int, n_boot: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield np.sort(rng.permutation(n)[: n // 2])


def of_statistic(n: int, statistic, n_boot: int, seed: int) -> Bootstrap:
    """Half-sample bootstrap of any statistic of n paired items: `statistic(indices)` for all the
    items (the point) and for each redrawn half."""
    if n < 6 or n_boot < 2:
        raise SpecmatchError(f"bootstrap: need N >= 6 items and n_boot >= 2, got N={n}, n_boot={n_boot}")
    values = np.array([statistic(i) for i in _halves(n, n_boot, seed)], np.float64)
    return _summary(float(statistic(np.arange(n))), values, seed)


def psd_sqrt(s: np.ndarray) -> np.ndarray:
    """The symmetric square root of a positive semi-definite matrix (negative rounding clipped)."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _trace_sqrt_cov(root1: np.ndarray, s2: np.ndarray) -> float:
    """Tr sqrt(S1 S2) from R = S1^(1/2) and S2."""
    w = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def _trace_sqrt_data(a: np.ndarray, b: np.ndarray) -> float:
    """Tr sqrt(S1 S2) from centred feature matrices A (n1, d) and B (n2, d)."""
    s = np.linalg.svd(b @ a.T, compute_uv=False)
    return float(s.sum() / np.sqrt((a.shape[0] - 1) * (b.shape[0] - 1)))


def frechet_distance_eigh(x: np.ndarray, y: np.ndarray) -> float:
    """The Fréchet distance between the Gaussians fitted to feature sets x (n1, d) and y (n2, d)
    (float64 means, `np.cov` covariances), through symmetric eigendecompositions."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mx, my = x.mean(0), y.mean(0)
    a, b = x - mx, y - my
    tr1 = (a * a).sum() / (len(a) - 1)
    tr2 = (b * b).sum() / (len(b) - 1)
    if min(len(a), len(b)) <= x.shape[1]:
        cross = _trace_sqrt_data(a, b)
    else:
        cross = _trace_sqrt_cov(psd_sqrt(a.T @ a / (len(a) - 1)), b.T @ b / (len(b) - 1))
    d = mx - my
    return float(d @ d + tr1 + tr2 - 2 * cross)


def _check(features: np.ndarray, what: str) -> np.ndarray:
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 6:
        raise SpecmatchError(f"bootstrap: {what} must be (N, D) features with N >= 6, got shape {f.shape}")
    return f


def _fd_to_reference(x: np.ndarray, mu_r: np.ndarray, s_r: np.ndarray, root_r: np.ndarray, tr_r: float) -> float:
    n, d = x.shape
    mx = x.mean(0)
    a = x - mx
    if n <= d:
        # Tr sqrt(S_x S_r) = sum sqrt(eig(A S_r A^T)) / sqrt(n - 1), an n x n problem.
        w = np.linalg.eigvalsh(a @ s_r @ a.T) / (n - 1)
        cross = float(np.sqrt(np.clip(w, 0, None)).sum())
    else:
        cross = _trace_sqrt_cov(root_r, a.T @ a / (n - 1))
    diff = mx - mu_r
    return float(diff @ diff + (a * a).sum() / (n - 1) + tr_r - 2 * cross)


def against_reference(features: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, n_boot: int,
                      seed: int) -> Bootstrap:
    """Bootstrap of the distance between `features` (redrawn) and fixed reference statistics."""
    f = _check(features, "features")
    if n_boot < 2:
        raise SpecmatchError(f"bootstrap: n_boot must be >= 2, got {n_boot}")
    mu_r, s_r = np.asarray(ref_mu, np.float64), np.asarray(ref_sigma, np.float64)
    root_r, tr_r = psd_sqrt(s_r), float(np.trace(s_r))
    point = _fd_to_reference(f, mu_r, s_r, root_r, tr_r)
    values = np.array([_fd_to_reference(f[i], mu_r, s_r, root_r, tr_r) for i in _halves(len(f), n_boot, seed)])
    return _summary(point, values, seed)


def paired(x: np.ndarray, y: np.ndarray, n_boot: int, seed: int) -> Bootstrap:
    """Bootstrap of the distance between paired feature sets x[i] <-> y[i] (the same images are
    drawn on both sides)."""
    x, y = _check(x, "x"), _check(y, "y")
    if x.shape != y.shape:
        raise SpecmatchError(f"bootstrap: paired feature sets differ in shape: {x.shape} vs {y.shape}")
    if n_boot < 2:
        raise SpecmatchError(f"bootstrap: n_boot must be >= 2, got {n_boot}")
    values = np.array([frechet_distance_eigh(x[i], y[i]) for i in _halves(len(x), n_boot, seed)])
    return _summary(frechet_distance_eigh(x, y), values, seed)
