"""Feature statistics in one pass over batches: float64 mean and covariance without the N x D array.

Reference statistics of ImageNet (1.28M images x 2048 features: 10 GB in float32) must not hold
every feature in memory, nor store them. `Moments` keeps the running float64 mean and the sum of
centred outer products (M2) and merges each batch into them with the pairwise update of Chan,
Golub and LeVeque (1979):

    n = na + nb,  delta = mean_b - mean_a,  mean = mean_a + delta nb / n,
    M2 = M2_a + M2_b + delta delta^T na nb / n,   covariance = M2 / (n - 1)

where each batch's own mean and M2 are computed centred on its mean. Unlike the textbook one-pass
sums (sum x, sum x x^T), this loses no precision when the mean is large against the spread, and
agrees with the two-pass float64 `np.mean` / `np.cov` (what pytorch-fid and the ADM evaluator
compute) to rounding (tests/test_metrics_adm.py checks 1e-10 on 200k vectors). Memory is D x D
float64 whatever N is. The accumulation runs in torch on the device the features come from (a
GPU's matrix product when there is one), in float64 there too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import SpecmatchError


@dataclass
class Statistics:
    mu: np.ndarray      # (D,) float64
    sigma: np.ndarray   # (D, D) float64
    n: int
    warnings: list[str] = field(default_factory=list)


class Moments:
    """Running float64 mean and covariance of (B, D) feature batches (tensors or arrays)."""

    def __init__(self, what: str = "features"):
        self.what = what
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, batch) -> None:
        x = torch.as_tensor(batch).to(torch.float64)
        if x.ndim != 2:
            raise SpecmatchError(f"{self.what}: expected (N, D) feature batches, got shape {tuple(x.shape)}")
        nb = int(x.shape[0])
        if nb == 0:
            return
        if self.mean is not None and x.shape[1] != self.mean.shape[0]:
            raise SpecmatchError(f"{self.what}: batch of dimension {x.shape[1]} after batches of {self.mean.shape[0]}")
        mb = x.mean(0)
        xc = x - mb
        m2b = xc.T @ xc
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        if self.mean.device != mb.device:
            mb, m2b = mb.to(self.mean.device), m2b.to(self.mean.device)
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + torch.outer(delta, delta) * (self.n * nb / n)
        self.n = n

    def statistics(self) -> Statistics:
        """Mean and covariance (N - 1 normalisation, as np.cov), with a warning when N < D."""
        if self.mean is None:
            raise SpecmatchError(f"{self.what}: expected a non-empty (N, D) array, got no rows")
        d = int(self.mean.shape[0])
        if self.n < 2:
            raise SpecmatchError(f"{self.what}: a covariance needs at least 2 samples, got {self.n}")
        notes = []
        if self.n < d:
            notes.append(f"{self.n} samples < {d} feature dimensions: the covariance is singular and the distance "
                         "is biased; use more samples for reportable numbers")
        sigma = (self.m2 / (self.n - 1)).cpu().numpy()
        # M2 is symmetric in exact arithmetic; make it so in floating point as np.cov's product is.
        sigma = (sigma + sigma.T) / 2
        return Statistics(self.mean.cpu().numpy(), sigma, self.n, notes)


def statistics(features, chunk: int = 65536) -> Statistics:
    """Mean and covariance in float64 of an in-memory (N, D) array, through `Moments`."""
    f = np.asarray(features) if not isinstance(features, torch.Tensor) else features
    if f.ndim != 2 or f.shape[0] == 0:
        raise SpecmatchError(f"features: expected a non-empty (N, D) array, got shape {tuple(f.shape)}")
    m = Moments()
    for i in range(0, f.shape[0], chunk):
        m.update(f[i:i + chunk])
    return m.statistics()
