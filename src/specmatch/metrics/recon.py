"""Reconstruction metrics of an autoencoder on a held-out split, computed in one pass:
PSNR (on uint8), SSIM, LPIPS (VGG, v0.1) and rFID (features of originals vs reconstructions).

Conventions, where papers differ:
- PSNR per image on the uint8 images (data range 255, MSE over pixels and channels), averaged
  over images; an exact reconstruction gives +inf for that image.
- SSIM as Wang et al. (2004) and skimage's `structural_similarity(gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=255)`: 11x11 Gaussian window, K1 = 0.01,
  K2 = 0.03, borders where the window does not fit are excluded, channels averaged.
- LPIPS: the `lpips` package's model with its v0.1 linear heads, the VGG16 backbone loaded from
  the checksum-verified torchvision file in resources/ (never downloaded); inputs in [-1, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import resources
from ..errors import SpecmatchError
from ..runtime.hashing import sha256_file
from ..runtime.weights import load_torch_weights


def _as_float(images, device=None) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise SpecmatchError(f"expected uint8 images (N, H, W, 3), got {t.dtype} {tuple(t.shape)}")
    return t.to(device).permute(0, 3, 1, 2).double()


def _pair(a, b, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _as_float(a, device), _as_float(b, device)
    if x.shape != y.shape:
        raise SpecmatchError(f"originals {tuple(x.shape)} and reconstructions {tuple(y.shape)} differ in shape")
    return x, y


def psnr(originals, reconstructions) -> torch.Tensor:
    """Per-image PSNR (dB) of uint8 images (N, H, W, 3)."""
    x, y = _pair(originals, reconstructions)
    mse = ((x - y) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(originals, reconstructions, win: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM of uint8 images (N, H, W, 3), channels averaged."""
    x, y = _pair(originals, reconstructions)
    if min(x.shape[-2:]) < win:
        raise SpecmatchError(f"SSIM needs images of at least {win}x{win} pixels, got {tuple(x.shape[-2:])}")
    c = x.shape[1]
    g = _gaussian_window(win, sigma)
    kh = g.view(1, 1, win, 1).repeat(c, 1, 1, 1)
    kw = g.view(1, 1, 1, win).repeat(c, 1, 1, 1)

    def filt(t):  # separable valid Gaussian filter, per channel
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


# torchvision VGG16 `features` indices -> lpips's slices (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)
_LPIPS_SLICES = ((1, range(0, 4)), (2, range(4, 9)), (3, range(9, 16)), (4, range(16, 23)), (5, range(23, 30)))


def lpips_state_from_vgg16(vgg_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torchvision's `features.<i>.<p>` keys to lpips's `net.slice<k>.<i>.<p>`."""
    out = {}
    for key, value in vgg_state.items():
        if not key.startswith("features."):
            continue
        _, idx, param = key.split(".")
        k = next((k for k, r in _LPIPS_SLICES if int(idx) in r), None)
        if k is not None:
            out[f"net.slice{k}.{idx}.{param}"] = value
    if len(out) != 26:
        raise SpecmatchError(f"VGG16 weights: expected the 13 conv layers (26 tensors) of torchvision's vgg16, found {len(out)}")
    return out


@dataclass
class LPIPS:
    model: torch.nn.Module
    vgg_sha256: str
    heads_sha256: str

    @torch.inference_mode()
    def __call__(self, originals, reconstructions, device=None) -> torch.Tensor:
        x, y = _pair(originals, reconstructions, device)
        d = self.model(x.float() / 127.5 - 1, y.float() / 127.5 - 1)
        return d.flatten().double().cpu()


def load_lpips(device="cpu", resources_dir=None, vgg_weights: str | Path | None = None) -> LPIPS:
    """LPIPS-VGG v0.1: heads from the lpips package, backbone from resources (or an explicit
    file, for tests), both checksum-checked when they come from the resources."""
    import lpips

    heads, heads_sha = resources.require("lpips-vgg-v0.1", resources_dir)
    if vgg_weights is None:
        vgg_path, vgg_sha = resources.require("vgg16", resources_dir)
    else:
        vgg_path, vgg_sha = Path(vgg_weights), sha256_file(vgg_weights)
    # pnet_rand=True: lpips would otherwise ask torchvision to download the backbone.
    model = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, model_path=str(heads),
                        verbose=False)
    missing, unexpected = model.load_state_dict(
        lpips_state_from_vgg16(load_torch_weights(vgg_path)), strict=False)
    backbone_missing = [k for k in missing if k.startswith("net.")]
    if backbone_missing or unexpected:
        raise SpecmatchError(f"{vgg_path}: VGG16 weights do not fit LPIPS (missing {backbone_missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return LPIPS(model, vgg_sha, heads_sha)


@dataclass
class ReconAccumulator:
    """One pass over (original, reconstruction) batches: per-image PSNR, SSIM, LPIPS, and
    the feature-net features of both sides for rFID."""

    lpips: LPIPS | None = None
    feature_net: object | None = None       # a features.LoadedNet
    device: str | torch.device = "cpu"
    values: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {"psnr": [], "ssim": [], "lpips": []})
    feats: dict[str, list[np.ndarray]] = field(default_factory=lambda: {"real": [], "recon": []})

    def add(self, originals, reconstructions) -> None:
        self.values["psnr"].append(psnr(originals, reconstructions))
        self.values["ssim"].append(ssim(originals, reconstructions))
        if self.lpips is not None:
            self.values["lpips"].append(self.lpips(originals, reconstructions, self.device))
        if self.feature_net is not None:
            from .fid import extract

            for key, imgs in (("real", originals), ("recon", reconstructions)):
                self.feats[key].append(extract(imgs, self.feature_net, len(imgs), self.device, progress=False).pool)

    def summary(self) -> dict[str, float | int | str]:
        from .fid import frechet_distance, statistics

        if not self.values["psnr"]:
            raise SpecmatchError("no images were evaluated")
        out: dict[str, float | int | str] = {"n": int(torch.cat(self.values["psnr"]).numel())}
        for k, v in self.values.items():
            if v:
                t = torch.cat(v)
                out[k] = float(t.mean()) if torch.isfinite(t).all() else math.inf
        if self.feature_net is not None:
            a, b = (statistics(np.concatenate(self.feats[k])) for k in ("real", "recon"))
            # "rFID" with the standard Inception, "rFD-<net>" otherwise (eval-ae's record reads it so).
            out["r" + self.feature_net.spec.metric] = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
        return out
