"""An offline stand-in for pytorch-fid's Inception weights, shared by tests and benchmarks.

The real `pt_inception-2015-12-05-6726825d.pth` cannot be downloaded here. We build the same
architecture as pytorch-fid's `fid_inception_v3` (its own blocks) with a seeded random init and
recalibrate BatchNorm (as measured on the offline weights): with untouched running statistics the pool features
vanish (~1e-8, every FID 0). Calibrated on the kind of images that will be compared (pass them),
the features have a spread like the real network's and distances land in the usual range (tens
to hundreds), where an absolute tolerance of 1e-3 is meaningful for float32 features; calibrated
on noise and then fed natural images they blow up (FIDs ~1e5). The file has the
real one's name and keys (fc included), so pytorch-fid's own loader accepts it.
"""

from __future__ import annotations

from pathlib import Path

import torch

FILE_NAME = "pt_inception-2015-12-05-6726825d.pth"


def build_fid_inception_weights(path: str | Path, seed: int = 0, calib_images=8) -> Path:
    """`calib_images`: uint8 images (N, H, W, 3) to recalibrate BatchNorm on, resized and scaled
    as pytorch-fid feeds them, or a number of uniform-noise images."""
    from pytorch_fid import inception as pfi

    torch.manual_seed(seed)
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=True)
    net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = pfi.FIDInceptionE_1(1280)
    net.Mixed_7c = pfi.FIDInceptionE_2(2048)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
    net.train()
    if isinstance(calib_images, int):
        calib = torch.rand(calib_images, 3, 299, 299) * 2 - 1
    else:
        x = torch.as_tensor(calib_images).permute(0, 3, 1, 2).float() / 255
        calib = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    with torch.no_grad():
        net(calib)
    net.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path
