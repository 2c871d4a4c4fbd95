"""Fréchet distance, Inception Score and precision/recall from features, by the ADM evaluator's
definitions (openai/guided-diffusion `evaluations/evaluator.py`; docs/metrics.md).

Images are uint8 (N, H, W, 3), held in memory or read from npz shards: no PNG/JPEG round trip,
which is where pytorch-fid's folder path spends much of its time. Two ways through the images:
- `embed`: one streaming pass for the stages (`fid ref`, `fid calc`): float64 moments of the
  features (`streaming.Moments`, no N x D array), the sha256 of exactly the images seen, and,
  on request, the features of every image (a sample set, for precision/recall and the bootstrap)
  or of a fixed subset (the precision/recall reference of a large dataset).
- `extract`: every feature in memory, for small sets (reconstruction metrics); under
  torch.distributed every rank embeds a contiguous part and all ranks get the features in order.
The statistics equal pytorch-fid's (`calculate_activation_statistics`: float64 mean, `np.cov`)
and the ADM evaluator's to rounding.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch
from scipy import linalg
from tqdm import tqdm

from ..errors import SpecmatchError
from ..runtime.hashing import ImageStreamHash
from .features import LoadedNet
from .streaming import Moments, Statistics, statistics

__all__ = ["Statistics", "statistics", "Features", "Embedding", "extract", "embed", "feature_statistics",
           "frechet_distance", "inception_score", "precision_recall", "check_images", "rank_slice"]

log = logging.getLogger(__name__)

# ADM's split rule of the Inception Score: consecutive parts of 5000 samples (the last one may be
# shorter), the score the mean over parts.
IS_SPLIT_SIZE = 5000


def check_images(images, where: str = "images") -> np.ndarray | torch.Tensor:
    """Validate one uint8 batch (N, H, W, 3)."""
    dtype = images.dtype
    if dtype not in (np.uint8, torch.uint8):
        raise SpecmatchError(f"{where}: expected uint8 images (N, H, W, 3), got dtype {dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise SpecmatchError(f"{where}: expected uint8 images of shape (N, H, W, 3), got {tuple(images.shape)}")
    return images


def _chunks(images) -> Iterable:
    """An array/tensor (N, H, W, 3) as one chunk, or an iterable of such chunks as they come."""
    return [images] if hasattr(images, "shape") else images


def _batches(images, batch_size: int, where: str = "images") -> Iterator[torch.Tensor]:
    """uint8 batches from an array/tensor (N, H, W, 3) or an iterable of such arrays."""
    for chunk in _chunks(images):
        check_images(chunk, where)
        t = torch.from_numpy(np.ascontiguousarray(chunk)) if isinstance(chunk, np.ndarray) else chunk
        for i in range(0, t.shape[0], batch_size):
            yield t[i:i + batch_size]


def _forward(images, net: LoadedNet, batch_size: int, device, progress: bool, where: str = "images"
             ) -> Iterator[dict[str, torch.Tensor]]:
    """The net's float32 outputs (pool, logits, spatial where it has them) batch by batch, on `device`."""
    if batch_size < 1:
        raise SpecmatchError(f"batch_size must be >= 1, got {batch_size}")
    for batch in tqdm(_batches(images, batch_size, where), desc=f"features ({net.spec.name})", unit="batch",
                      disable=not progress, leave=False):
        out = net.module(batch.to(device, non_blocking=True))
        yield {k: v.float() for k, v in out.items()}


@dataclass
class Features:
    pool: np.ndarray                       # (N, D) float32
    logits: np.ndarray | None = None       # (N, C) float32, for the Inception Score
    spatial: np.ndarray | None = None      # (N, S) float32, sFID (inception-adm only)
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
    outs: dict[str, list[torch.Tensor]] = {"pool": [], "logits": [], "spatial": []}
    for out in _forward(images, net, batch_size, device, progress):
        for k, v in out.items():
            outs[k].append(v)
    # A rank may hold no image (n < world size): it still takes part in every collective.
    dims = {"pool": net.spec.dim, "logits": net.spec.n_logits, "spatial": net.spec.spatial_dim}
    got = {k: _gather_rows(torch.cat(v) if v else torch.zeros((0, dims[k]), device=device))
           for k, v in outs.items() if k != "spatial" or net.spec.spatial_dim}
    if got["pool"].shape[0] == 0:
        raise SpecmatchError("no images to embed: the sample set is empty")
    return Features(*(got[k].cpu().numpy() if k in got else None for k in ("pool", "logits", "spatial")))


@dataclass
class Embedding:
    """What one pass over an image set keeps: its count and sha256, the float64 statistics of
    the pool (and spatial) features, and the features the caller asked to keep."""

    n: int
    images_sha256: str
    pool: Statistics
    spatial: Statistics | None
    features: np.ndarray | None   # (N, D) float32 pool features of every image (keep=True)
    logits: np.ndarray | None     # (N, C) float32 (keep=True)
    subset: np.ndarray | None     # (len(subset), D) float32 pool features of the rows `subset` names


@torch.inference_mode()
def embed(images, net: LoadedNet, batch_size: int = 200, device: str | torch.device = "cpu",
          where: str = "images", keep: bool = False, subset: np.ndarray | None = None,
          progress: bool = True) -> Embedding:
    """One streaming pass over uint8 images (an array (N, H, W, 3) or an iterable of such
    batches, e.g. read from shards): the sha256 of the images in order, float64 mean and
    covariance of the features, and the features themselves only as asked: all of them
    (`keep`, with the logits) or those of the sorted row indices `subset`. Memory does not
    grow with N otherwise."""
    hasher: list[ImageStreamHash] = []

    def hashed():
        for chunk in _chunks(images):
            check_images(chunk, where)
            if not hasher:
                hasher.append(ImageStreamHash(tuple(chunk.shape[1:])))
            try:
                hasher[0].update(chunk)
            except ValueError as e:
                raise SpecmatchError(f"{where}: images of different sizes in one set ({e})") from None
            yield chunk

    pool_m = Moments(f"{where}: pool features")
    spatial_m = Moments(f"{where}: spatial features") if net.spec.spatial_dim else None
    wanted = None if subset is None else torch.as_tensor(np.asarray(subset, np.int64))
    kept: dict[str, list[np.ndarray]] = {"pool": [], "logits": [], "subset": []}
    offset = 0
    for out in _forward(hashed(), net, batch_size, device, progress, where):
        pool = out["pool"]
        pool_m.update(pool)
        if spatial_m is not None:
            spatial_m.update(out["spatial"])
        if keep:
            kept["pool"].append(pool.cpu().numpy())
            kept["logits"].append(out["logits"].cpu().numpy())
        if wanted is not None:
            b = pool.shape[0]
            rows = wanted[(wanted >= offset) & (wanted < offset + b)] - offset
            if len(rows):
                kept["subset"].append(pool[rows.to(pool.device)].cpu().numpy())
        offset += pool.shape[0]
    if not hasher or offset == 0:
        raise SpecmatchError(f"{where}: no images to embed")
    sub = None
    if wanted is not None:
        sub = np.concatenate(kept["subset"]) if kept["subset"] else np.zeros((0, net.spec.dim), np.float32)
        if sub.shape[0] != len(wanted):
            raise SpecmatchError(f"{where}: {offset} images, but the subset names rows up to {int(wanted.max())}")
    return Embedding(
        n=offset, images_sha256=hasher[0].hexdigest(), pool=pool_m.statistics(),
        spatial=spatial_m.statistics() if spatial_m is not None else None,
        features=np.concatenate(kept["pool"]) if keep else None,
        logits=np.concatenate(kept["logits"]) if keep else None, subset=sub)


def feature_statistics(images, net: LoadedNet, batch_size: int = 200, device: str | torch.device = "cpu",
                       progress: bool = True) -> Statistics:
    """The statistics function: uint8 images (N, H, W, 3) -> float64 mean, covariance."""
    return embed(images, net, batch_size, device, progress=progress).pool


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), computed as pytorch-fid and the ADM
    evaluator do (both after TTUR): scipy's sqrtm, an eps * I offset on both covariances when the
    product is singular, and the imaginary part dropped when it is numerical noise (an error
    otherwise)."""
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


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> tuple[float, float | None]:
    """exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016) by the ADM evaluator's rule: the softmax
    of the logits (the Inception's without the classifier bias), consecutive parts of
    `split_size` samples in the given order (the last may be shorter), the score of each part;
    returns their mean (the reported number) and, over several parts, their standard deviation
    (None for one part). Computed in float64 (the evaluator: float32)."""
    lg = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if lg.ndim != 2 or lg.shape[0] < 1:
        raise SpecmatchError(f"inception_score: need (N >= 1, C) logits, got shape {tuple(lg.shape)}")
    if split_size < 1:
        raise SpecmatchError(f"inception_score: split_size must be >= 1, got {split_size}")
    logp = torch.log_softmax(lg, dim=1)
    scores = []
    for part in torch.split(logp, split_size):
        log_py = torch.logsumexp(part, dim=0) - np.log(part.shape[0])
        kl = (part.exp() * (part - log_py)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), (float(np.std(scores)) if len(scores) > 1 else None)


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances in float32, the evaluator's formula
    max(|a|^2 - 2 a.b + |b|^2, 0)."""
    na = (a * a).sum(1, keepdim=True)
    nb = (b * b).sum(1)[None, :]
    return (na - 2 * (a @ b.T) + nb).clamp_min_(0)


def _kth_nn_radii(x: torch.Tensor, k: int, block: int) -> torch.Tensor:
    radii = []
    for i in range(0, x.shape[0], block):
        d = _squared_distances(x[i:i + block], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
    return torch.cat(radii)


def _covered(query: torch.Tensor, ref: torch.Tensor, radii: torch.Tensor, block: int) -> torch.Tensor:
    hits = []
    for i in range(0, query.shape[0], block):
        d = _squared_distances(query[i:i + block], ref)
        hits.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(hits)


@torch.inference_mode()
def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, block: int = 1024,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) as the ADM evaluator computes
    them: the radius of each point is the squared distance to its k-th nearest neighbour within
    its own set; precision is the share of generated samples inside some real point's ball
    (d^2 <= r^2), recall the share of real points inside some generated sample's ball. Float32
    squared distances, in blocks of `block` rows on `device` (a GPU when there is one). The
    evaluator first tries float16 distances and falls back to float32 when they overflow; we
    compute float32 throughout (docs/metrics.md)."""
    dev = torch.device(device)
    r = torch.as_tensor(np.asarray(real, dtype=np.float32)).to(dev)
    f = torch.as_tensor(np.asarray(fake, dtype=np.float32)).to(dev)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise SpecmatchError(f"precision_recall: expected (N, D) features of one dimension, got {tuple(r.shape)} "
                             f"real and {tuple(f.shape)} generated")
    if min(r.shape[0], f.shape[0]) <= k:
        raise SpecmatchError(f"precision_recall: need more than k={k} samples on each side, got {r.shape[0]} "
                             f"real and {f.shape[0]} generated")
    precision = _covered(f, r, _kth_nn_radii(r, k, block), block).double().mean()
    recall = _covered(r, f, _kth_nn_radii(f, k, block), block).double().mean()
    return float(precision), float(recall)
