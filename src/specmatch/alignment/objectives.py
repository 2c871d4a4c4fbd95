"""REPA, iREPA and DoG-REPA (docs/method.md §7): target transforms, projectors and the alignment loss.

A target is a token grid (B, D, h, w) of a frozen encoder on the clean image. The diffusion
network's hidden tokens (B, N, width) after block `depth` go through a projector to D channels
and are pulled to the target by negative cosine similarity, averaged over tokens:

- `repa`: the raw target, REPA's 3-layer MLP projector (Linear-SiLU-Linear-SiLU-Linear).
- `irepa`: the target normalised per channel over the tokens, (Y - gamma * mean) / std, and a
  3x3 convolution on the token grid as projector (iREPA).
- `dog`: a Difference-of-Gaussians band-pass on the token grid, per channel, divided by its
  spatial std (`spectral.dog_filter`, reflect padding); projector as chosen (`mlp` default).

The transforms are cheap on these grids, so a target cache stores the raw encoder output and
every kind is derived from it at training time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import spectral
from ..errors import SpecmatchError

KINDS = ("none", "repa", "irepa", "dog")
PROJECTORS = ("mlp", "conv")


def resize_grid(y: torch.Tensor, grid: int) -> torch.Tensor:
    """A target grid (B, D, h, w) brought to grid x grid tokens: area average when shrinking,
    bilinear when growing (REPA needs one target per diffusion token)."""
    h, w = y.shape[-2:]
    if (h, w) == (grid, grid):
        return y
    if h >= grid and w >= grid:
        return F.adaptive_avg_pool2d(y, grid)
    return F.interpolate(y, size=(grid, grid), mode="bilinear", align_corners=False)


def spatial_normalize(y: torch.Tensor, gamma: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """iREPA's spatial normalisation, per sample and channel over the tokens of (B, D, h, w):
    (Y - gamma * mean) / std (population std). With gamma = 1 every channel has zero spatial mean."""
    y = y.float()
    mean = y.mean(dim=(-2, -1), keepdim=True)
    std = y.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (y - gamma * mean) / (std + eps)


def transform(y: torch.Tensor, kind: str, p: dict[str, Any]) -> torch.Tensor:
    """The alignment target of `kind` from a raw token grid (B, D, h, w); `p` holds `irepa_gamma`
    and `dog: {sigma1, sigma2}`."""
    if kind == "repa":
        return y.float()
    if kind == "irepa":
        return spatial_normalize(y, float(p.get("irepa_gamma", 1.0)))
    if kind == "dog":
        dog = p.get("dog") or {}
        return spectral.dog_filter(y.float(), float(dog.get("sigma1", 0.8)), float(dog.get("sigma2", 2.0)))
    raise SpecmatchError(f"alignment kind {kind!r}: expected one of {list(KINDS[1:])}")


class MLPProjector(nn.Module):
    """REPA's per-token projector: Linear-SiLU-Linear-SiLU-Linear, (B, N, width) -> (B, N, out)."""

    def __init__(self, width: int, out: int, hidden: int = 2048):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, out))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)


class ConvProjector(nn.Module):
    """iREPA's projector: one 3x3 convolution on the token grid, (B, N, width) -> (B, N, out)."""

    def __init__(self, width: int, out: int, grid: tuple[int, int]):
        super().__init__()
        self.grid = tuple(grid)
        self.conv = nn.Conv2d(width, out, kernel_size=3, padding=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape
        h, w = self.grid
        if n != h * w:
            raise SpecmatchError(f"conv projector: {n} tokens do not form the {h}x{w} grid")
        x = tokens.transpose(1, 2).reshape(b, c, h, w)
        return self.conv(x).flatten(2).transpose(1, 2)


def build_projector(kind: str, width: int, out: int, grid: tuple[int, int], hidden: int = 2048) -> nn.Module:
    if kind == "mlp":
        return MLPProjector(width, out, hidden)
    if kind == "conv":
        return ConvProjector(width, out, grid)
    raise SpecmatchError(f"projector {kind!r}: expected one of {list(PROJECTORS)}")


def alignment_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-mean over tokens and batch of cos(pred_t, target_t); pred (B, N, D), target (B, D, h, w)
    with N = h * w (row-major, as the networks order their tokens). Computed in float32."""
    b, d, h, w = target.shape
    if pred.shape != (b, h * w, d):
        raise SpecmatchError(f"alignment: projected tokens {tuple(pred.shape)} do not match the target grid "
                             f"{(b, h * w, d)}")
    tgt = target.float().flatten(2).transpose(1, 2)
    return -F.cosine_similarity(pred.float(), tgt, dim=-1).mean()


def target_spectrum(y: torch.Tensor, n_bins: int = 16) -> dict[str, torch.Tensor]:
    """Spectral diagnostics of target grids (B, D, h, w): the directional spectral energy RMSC^2
    per sample (docs/method.md §7) and the spectrum distribution of the field (docs/method.md §2, analysis setting:
    no centring, DC kept), with the mask of non-empty bins."""
    tokens = y.float().flatten(2).transpose(1, 2)
    e = spectral.band_energies(y.float(), n_bins=n_bins, center="none", remove_dc=False)
    valid = spectral.bin_counts(y.shape[-2], y.shape[-1], n_bins) > 0
    return {"rmsc2": spectral.rmsc2(tokens), "energies": e, "valid": valid}
