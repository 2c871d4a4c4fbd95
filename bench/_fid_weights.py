"""An offline stand-in for pytorch-fid's Inception weights, shared by tests and benchmarks.

The real `pt_inception-2015-12-05-6726825d.pth` cannot be downloaded here. We build the same
architecture as pytorch-fid's `fid_inception_v3` (its own blocks) with a seeded random init and
recalibrate BatchNorm on random images (ENVIRONMENT.md): with untouched running statistics the
pool features vanish (~1e-8, every FID 0); after recalibration they have a spread of about 0.45,
so distances are informative and two implementations can be compared on them. The file has the
real one's name and keys (fc included), so pytorch-fid's own loader accepts it.
"""

from __future__ import annotations

from pathlib import Path

import torch

FILE_NAME = "pt_inception-2015-12-05-6726825d.pth"


def build_fid_inception_weights(path: str | Path, seed: int = 0, calib_images: int = 8) -> Path:
    from specmatch.compat import import_torchvision

    import_torchvision()
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
    with torch.no_grad():
        net(torch.rand(calib_images, 3, 299, 299) * 2 - 1)
    net.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path
