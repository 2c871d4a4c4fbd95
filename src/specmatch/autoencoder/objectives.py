"""Autoencoder objectives as named variants (docs/method.md §3-5).

One generator step of every variant is the same computation with different switches:

    L_G = l1 * |x' - x^|_1 + lpips * LPIPS(x^, x') + kl * KL + esm * L_ESM
          + [from gan_start] gan * lambda * (-mean D(x^))

where x' is the step's image target and x^ the decoded latent. The variants differ in how a
step picks its "shared mask" (the spectral view of the paper, docs/method.md §4):
- `sdvae`: none (x' = x, decode z), KL 1e-6.
- `ae`: the control of the spectral variants: SD-VAE's objective without its KL term (KL 0, as
  ESM and DSM have), so that a comparison with it separates the spectral term from the posterior
  noise that the KL term keeps (the report's claim C4c).
- `esm`: none; ESM loss on the sampled latent against the image's delta-tilted spectrum, KL 0.
- `dsm`: k drawn per step from `dsm_ks`; k > 0 low-passes image and latent with the same block
  DCT mask (x' = LP_k(x), decode LP_k(z)); the discriminator's real input is x' too. KL 0.
- `scale_eq`: a factor drawn per step from `scale_factors`; image and latent are down-sampled by
  it (x' = down(x), decode down(z)): EQ-VAE's scale equivariance as a special case.
- `esm_dsm`: both.
- `pixels`: no objective at all: the identity "autoencoder" of pixel-space diffusion (config
  `pixels`, model.PixelIdentity), which `train-ae` writes without training.
The per-step draw depends only on (seed, step), so every rank draws the same k without
communication and a resumed run draws what the uninterrupted one drew (`mask_draw: shared`).
The authors' trainer draws k with Python's unseeded `random` in every process, so the GPUs of
one step generally use different k; `mask_draw: per-rank` reproduces that (seeded by (seed,
step, rank): resumable, but the run then depends on the number of processes).

`gan_start` counts trainer iterations (the authors' `global_step`, which a discriminator update
advances too; see train.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from .. import spectral
from ..errors import SpecmatchError
from ..runtime.seeding import step_rng

MASK_DRAWS = ("shared", "per-rank")

VARIANTS: dict[str, dict[str, Any]] = {
    "sdvae": {"kl_weight": 1e-6},
    "ae": {"kl_weight": 0.0},
    "esm": {"kl_weight": 0.0, "esm_weight": 0.01},
    "dsm": {"kl_weight": 0.0, "dsm_ks": [0, 8, 10, 12]},
    "scale_eq": {"kl_weight": 1e-6, "scale_factors": [1, 2]},
    "esm_dsm": {"kl_weight": 0.0, "esm_weight": 0.01, "dsm_ks": [0, 8, 10, 12]},
    "pixels": {"l1_weight": 0.0, "lpips_weight": 0.0, "kl_weight": 0.0, "gan_weight": 0.0},
}


@dataclass(frozen=True)
class Objective:
    variant: str
    l1_weight: float = 1.0
    lpips_weight: float = 0.5
    kl_weight: float = 0.0
    esm_weight: float = 0.0
    esm_delta: float = 1.0
    esm_n_bins: int = 16
    esm_blur: str = "auto"
    dsm_ks: tuple[int, ...] = ()
    dsm_block: int = 8
    scale_factors: tuple[int, ...] = ()
    scale_mode: str = "area"
    gan_start: int = 50001  # iteration (G and D updates both count) from which the GAN is on
    gan_weight: float = 0.5
    adaptive_weight_max: float = 1e4
    mask_draw: str = "shared"  # "shared": one k per step on every rank; "per-rank": the authors'


def objective(variant: str, loss: dict[str, Any] | None = None) -> Objective:
    """The variant's defaults overlaid with the `loss` parameters of a run (any field)."""
    if variant not in VARIANTS:
        raise SpecmatchError(f"unknown autoencoder variant {variant!r}; known: {sorted(VARIANTS)}")
    fields = {**VARIANTS[variant], **copy.deepcopy(loss or {})}
    known = set(Objective.__dataclass_fields__) - {"variant"}
    bad = sorted(set(fields) - known)
    if bad:
        raise SpecmatchError(f"autoencoder loss: unknown key(s) {bad}; known: {sorted(known)}")
    for key in ("dsm_ks", "scale_factors"):
        fields[key] = tuple(int(v) for v in fields.get(key, ()))
    obj = Objective(variant=variant, **fields)
    if any(k < 0 for k in obj.dsm_ks) or any(f < 1 for f in obj.scale_factors):
        raise SpecmatchError(f"autoencoder loss: dsm_ks must be >= 0 and scale_factors >= 1, got "
                             f"{list(obj.dsm_ks)}, {list(obj.scale_factors)}")
    if obj.mask_draw not in MASK_DRAWS:
        raise SpecmatchError(f"autoencoder loss: mask_draw must be one of {list(MASK_DRAWS)}, got {obj.mask_draw!r}")
    return obj


@dataclass(frozen=True)
class Mask:
    """The shared mask of one step: block low-pass k (DSM) and a down-sampling factor."""
    k: int = 0
    factor: int = 1

    def apply(self, s: torch.Tensor, obj: Objective) -> torch.Tensor:
        if self.k:
            s = spectral.block_lowpass(s, self.k, obj.dsm_block)
        if self.factor > 1:
            s = spectral.scale_lowpass(s, self.factor, obj.scale_mode)
        return s

    @property
    def identity(self) -> bool:
        return self.k == 0 and self.factor == 1


def draw_mask(obj: Objective, seed: int, step: int, rank: int = 0) -> Mask:
    """This step's mask: a function of (seed, step) only, identical on every rank; with
    `mask_draw: per-rank`, of (seed, step, rank)."""
    rng = step_rng(seed, step, "autoencoder-mask" if obj.mask_draw == "shared" else f"autoencoder-mask-rank{rank}")
    k = int(rng.choice(obj.dsm_ks)) if obj.dsm_ks else 0
    factor = int(rng.choice(obj.scale_factors)) if obj.scale_factors else 1
    return Mask(k, factor)


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """lambda = ||d L_rec / d w|| / max(||d L_G / d w||, 1e-8) at the decoder's last layer w,
    clamped to [0, max_weight] and detached (taming-transformers' VQGAN/LDM rule)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    lam = g_rec.norm() / torch.clamp(g_gan.norm(), min=1e-8)
    return torch.clamp(lam, 0.0, max_weight).detach()
