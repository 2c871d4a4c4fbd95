"""Fréchet distance, Inception Score and precision/recall from feature statistics.

Images are uint8 (N, H, W, 3), held in memory or read from npz shards: no PNG/JPEG round trip,
which is where pytorch-fid's folder path spends much of its time. The statistics equal
pytorch-fid's (`calculate_activation_statistics`): the same network, resize and scaling
(`features.py`), float64 mean and `np.cov`. Under torch.distributed every rank embeds a
contiguous part of the images and rank 0 gathers the features in order.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from scipy import linalg
from tqdm import tqdm

from ..errors import SpecmatchError
from .features import LoadedNet

log = logging.getLogger(__name__)


def check_images(images, where: str = "images") -> np.ndarray | torch.Tensor:
    """Validate one uint8 batch (N, H, W, 3)."""
    dtype = images.dtype
    if dtype not in (np.uint8, torch.uint8):
        raise SpecmatchError(f"{where}: expected uint8 images (N, H, W, 3), got dtype {dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise SpecmatchError(f"{where}: expected uint8 images of shape (N, H, W, 3), got {tuple(images.shape)}")
    return images


def _batches(images, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 batches from an array/tensor (N, H, W, 3) or an iterable of such arrays."""
    chunks = [images] if hasattr(images, "shape") else images
    for chunk in chunks:
        check_images(chunk)
        t = torch.from_numpy(np.ascontiguousarray(chunk)) if isinstance(chunk, np.ndarray) else chunk
        for i in range(0, t.shape[0], batch_size):
            yield t[i:i + batch_size]


@dataclass
class Features:
    pool: np.ndarray                       # (N, D) float32
    logits: np.ndarray | None = None       # (N, C) float32, for the Inception Score
    warnings: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return int(self.pool.shape[0])


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's rows in rank order (ranks may hold different counts)."""
    rank, world = _dist_info()
    if world == 1:
        return local
    n = torch.tensor([local.shape[0]], device=local.device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(counts, n)
    m = int(max(c.item() for c in counts))
    padded = torch.zeros((m, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    parts = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)])


def rank_slice(n: int) -> slice:
    """The contiguous part of n items this rank embeds."""
    rank, world = _dist_info()
    per = -(-n // world)
    return slice(min(n, rank * per), min(n, (rank + 1) * per))


@torch.inference_mode()
def extract(images, net: LoadedNet, batch_size: int = 200, device: str | torch.device = "cpu",
            progress: bool = True) -> Features:
    """Features of uint8 images: an array/tensor (N, H, W, 3) or an iterable of such batches.
    Under torch.distributed, pass each rank its own part (see `rank_slice`); all ranks get the
    gathered features of every image, in rank order."""
    if batch_size < 1:
        raise SpecmatchError(f"batch_size must be >= 1, got {batch_size}")
    pools, logits = [], []
    for batch in tqdm(_batches(images, batch_size), desc=f"features ({net.spec.name})", unit="batch",
                      disable=not progress, leave=False):
        out = net.module(batch.to(device, non_blocking=True))
        pools.append(out["pool"].float())
        logits.append(out["logits"].float())
    # A rank may hold no image (n < world size): it still takes part in every collective.
    pool = _gather_rows(torch.cat(pools) if pools else torch.zeros((0, net.spec.dim), device=device))
    lg = _gather_rows(torch.cat(logits) if logits else torch.zeros((0, net.spec.n_logits), device=device))
    if pool.shape[0] == 0:
        raise SpecmatchError("no images to embed: the sample set is empty")
    return Features(pool.cpu().numpy(), lg.cpu().numpy())


@dataclass
class Statistics:
    mu: np.ndarray      # (D,) float64
    sigma: np.ndarray   # (D, D) float64
    n: int
    warnings: list[str] = field(default_factory=list)


def statistics(features: np.ndarray) -> Statistics:
    """Mean and covariance in float64, as pytorch-fid (np.mean, np.cov with N - 1)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] == 0:
        raise SpecmatchError(f"features: expected a non-empty (N, D) array, got shape {f.shape}")
    notes = []
    if f.shape[0] < 2:
        raise SpecmatchError(f"features: a covariance needs at least 2 samples, got {f.shape[0]}")
    if f.shape[0] < f.shape[1]:
        notes.append(f"{f.shape[0]} samples < {f.shape[1]} feature dimensions: the covariance is singular "
                     "and the distance is biased; use more samples for reportable numbers")
    return Statistics(np.mean(f, axis=0), np.cov(f, rowvar=False), f.shape[0], notes)


def feature_statistics(images, net: LoadedNet, batch_size: int = 200, device: str | torch.device = "cpu",
                       progress: bool = True) -> Statistics:
    """The statistics function: uint8 images (N, H, W, 3) -> float64 mean, covariance."""
    return statistics(extract(images, net, batch_size, device, progress).pool)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), computed as pytorch-fid does:
    scipy's sqrtm, an eps * I offset on both covariances when the product is singular, and
    the imaginary part dropped when it is numerical noise (an error otherwise)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape:
        raise SpecmatchError(f"frechet_distance: mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise SpecmatchError(f"frechet_distance: covariances {sigma1.shape}, {sigma2.shape} do not match "
                             f"means of dimension {mu1.size}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # singular products are handled below, as pytorch-fid does
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"frechet_distance: singular product; adding {eps} to the covariance diagonals")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise SpecmatchError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) over `splits` equal parts (Salimans et al. 2016): mean, std."""
    lg = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if lg.ndim != 2 or lg.shape[0] < splits:
        raise SpecmatchError(f"inception_score: need at least {splits} samples of logits, got shape {tuple(lg.shape)}")
    logp = torch.log_softmax(lg, dim=1)
    scores = []
    for part in torch.tensor_split(logp, splits):
        log_py = torch.logsumexp(part, dim=0) - np.log(part.shape[0])
        kl = (part.exp() * (part - log_py)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


def _kth_nn_radii(x: torch.Tensor, k: int, block: int) -> torch.Tensor:
    radii = []
    for i in range(0, x.shape[0], block):
        d = torch.cdist(x[i:i + block], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
    return torch.cat(radii)


def _covered(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, block: int) -> torch.Tensor:
    hits = []
    for i in range(0, query.shape[0], block):
        d = torch.cdist(query[i:i + block], ref)
        hits.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(hits)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): precision is the share of
    generated samples inside the union of k-NN balls of the real features, recall the share
    of real samples inside those of the generated ones."""
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if min(r.shape[0], f.shape[0]) <= k:
        raise SpecmatchError(f"precision_recall: need more than k={k} samples on each side, got {r.shape[0]} "
                             f"real and {f.shape[0]} generated")
    precision = _covered(f, r, _kth_nn_radii(r, k, block), block).double().mean()
    recall = _covered(r, f, _kth_nn_radii(f, k, block), block).double().mean()
    return float(precision), float(recall)
