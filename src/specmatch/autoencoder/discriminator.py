"""PatchGAN discriminator and hinge losses for the autoencoder's GAN term (docs/method.md §5).

The pix2pix / taming-transformers "NLayerDiscriminator" layout: a stack of 4x4 convs (stride 2,
then one stride 1) with BatchNorm and LeakyReLU(0.2), ending in a 1-channel map of patch logits
(30x30 for a 256 px input with 3 layers). Each logit sees a 70x70 receptive field, so D judges
local texture, which is what the L1 + LPIPS reconstruction loss leaves blurry.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PatchDiscriminator", "hinge_d_loss", "generator_adv_loss", "sync_batchnorm"]

LEAK = 0.2
BN_INIT_STD = 0.02  # BN scales ~ N(1, 0.02): forever208/SpectrumMatching modules/discriminator.py, taming


class PatchDiscriminator(nn.Module):
    """Patch logits (B, 1, h, w) for images (B, in_channels, H, W).

    Convs followed by BatchNorm have no bias (BN's shift replaces it). `init_std` is the std of
    the conv weights, exposed because the authors' implementation initialises them with N(0, 0.2),
    most likely a typo for the standard 0.02 (docs/method.md §5); the default is 0.02. The BN
    scales are N(1, 0.02) whatever `init_std` (the authors' and taming's), their shifts 0. Only
    conv *weights* and BN affine parameters are re-initialised, as in the reference; the two
    biased convs keep torch's default bias init.

    Under several GPUs the trainer converts the BatchNorms to SyncBatchNorm (the authors'
    trainer does, `disc.sync_batchnorm`): batch statistics over the global batch, not 6 images.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, n_layers: int = 3, init_std: float = 0.02):
        super().__init__()
        if n_layers < 1 or channels < 1 or init_std <= 0:
            raise ValueError(
                f"PatchDiscriminator: need n_layers >= 1, channels >= 1, init_std > 0; "
                f"got {n_layers}, {channels}, {init_std}")
        self.init_std = float(init_std)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(LEAK, inplace=True),
        ]
        c_prev = channels
        for n in range(1, n_layers):
            c = channels * min(2 ** n, 8)
            layers += [
                nn.Conv2d(c_prev, c, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.LeakyReLU(LEAK, inplace=True),
            ]
            c_prev = c
        c = channels * min(2 ** n_layers, 8)
        layers += [
            nn.Conv2d(c_prev, c, 4, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.LeakyReLU(LEAK, inplace=True),
            nn.Conv2d(c, 1, 4, stride=1, padding=1),
        ]
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, self.init_std)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.normal_(m.weight, 1.0, BN_INIT_STD)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Discriminator hinge loss: scale * (E[relu(1 - D(x))] + E[relu(1 + D(x_hat))]). The
    authors' trainer (vae_trainer.py) uses scale 1; taming's / LDM's `hinge_d_loss` has 0.5. Adam
    is almost blind to the factor, the discriminator's gradient clipping (at 1.0) is not."""
    return scale * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def sync_batchnorm(disc: nn.Module, process_group=None) -> nn.Module:
    """`disc` with every BatchNorm replaced by a SyncBatchNorm over `process_group` (None: the
    whole job), weights and running statistics carried over (torch's own conversion). PyTorch's
    SyncBatchNorm computes on GPUs only; on a CPU process group its forward raises."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(disc, process_group)


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's side of the hinge GAN: -E[D(x_hat)]."""
    return -logits_fake.mean()
