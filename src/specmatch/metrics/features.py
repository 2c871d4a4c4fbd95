"""Feature networks for Fréchet distances, a registry keyed by name.

`inception-fid` is the standard: pytorch-fid's `InceptionV3` (2048-d pool3, its bilinear
resize to 299 and [0, 1] -> [-1, 1] scaling) with the TF-ported weights; distances with it are
named "FID". `efficientnet-lite0` (weights ship in a PyPI package, 224 px inputs) and
`efficientnet-lite0-128` (the same on 128 px inputs, the tiny preset's) serve the embedded
default; their distances are named "FD-EffNetLite0" and "FD-EffNetLite0-128", so that none is
ever mixed up with another in a table.

Every net takes uint8 images (N, H, W, 3) as a tensor and returns a dict of float32 features:
`pool` (what the distance uses) and, where the net has a classifier, `logits` (Inception Score).
"""

from __future__ import annotations

import unittest.mock
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import resources
from ..runtime.hashing import sha256_file
from ..runtime.weights import load_torch_weights


@dataclass(frozen=True)
class FeatureNetSpec:
    name: str
    metric: str          # the name of a Fréchet distance with this net, as tables print it
    resource: str        # key in the resources manifest
    dim: int             # feature dimension of `pool`
    n_logits: int        # classifier outputs (`logits`)
    build: Callable[[Path], nn.Module]


class _InceptionFID(nn.Module):
    def __init__(self, weights: Path):
        super().__init__()
        from pytorch_fid import inception as pfi

        state = load_torch_weights(weights)
        # pytorch-fid builds its network with `load_state_dict_from_url`, which would download;
        # we hand it the state dict of our checksum-verified file instead (weights_only load),
        # so the architecture, resize and scaling are exactly pytorch-fid's.
        with unittest.mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: state):
            self.net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                       normalize_input=True, use_fid_inception=True)
        # The 1008-way TF classifier (not kept by pytorch-fid) gives the Inception Score logits.
        self.fc = nn.Linear(2048, 1008)
        self.fc.load_state_dict({"weight": state["fc.weight"], "bias": state["fc.bias"]})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        # As pytorch-fid's ToTensor(): contiguous NCHW, not a channels-last view (oneDNN takes
        # another convolution path for that layout and the features differ in the last bits).
        x = images.permute(0, 3, 1, 2).contiguous().float() / 255.0
        pool = self.net(x)[0].flatten(1)
        return {"pool": pool, "logits": self.fc(pool)}


class _EfficientNetLite0(nn.Module):
    SIZE = 224

    def __init__(self, weights: Path, size: int = SIZE):
        super().__init__()
        self.SIZE = size
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name("efficientnet-lite0")
        self.net.load_state_dict(load_torch_weights(weights))
        # Channels-last: oneDNN's depthwise convolutions run ~1.5x faster on the CPU in that
        # layout (measured on our 2-core machines). Features move by ~1e-5, the same for every
        # call, so reference and sample statistics stay comparable; this net has no external
        # implementation whose numbers we must reproduce bit for bit (unlike inception-fid).
        self.net = self.net.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).contiguous().float() / 255.0
        if x.shape[-2:] != (self.SIZE, self.SIZE):
            x = F.interpolate(x, size=(self.SIZE, self.SIZE), mode="bilinear", align_corners=False)
        fmap = self.net.extract_features(((x - 0.5) / 0.5).contiguous(memory_format=torch.channels_last))
        pool = fmap.mean(dim=(2, 3))
        return {"pool": pool, "logits": self.net._fc(pool)}


REGISTRY: dict[str, FeatureNetSpec] = {
    "inception-fid": FeatureNetSpec("inception-fid", "FID", "inception-fid", 2048, 1008, _InceptionFID),
    "efficientnet-lite0": FeatureNetSpec("efficientnet-lite0", "FD-EffNetLite0", "efficientnet-lite0", 1280,
                                         1000, _EfficientNetLite0),
    # The same net on 128 px inputs: ~4x cheaper on the CPU (24 vs 105 ms per image on one
    # thread), for the tiny preset's 64 px images. Another metric, hence another name.
    "efficientnet-lite0-128": FeatureNetSpec("efficientnet-lite0-128", "FD-EffNetLite0-128", "efficientnet-lite0",
                                             1280, 1000, lambda w: _EfficientNetLite0(w, 128)),
}


def spec(name: str) -> FeatureNetSpec:
    if name not in REGISTRY:
        from ..errors import SpecmatchError

        raise SpecmatchError(f"unknown feature net {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name]


@dataclass
class LoadedNet:
    spec: FeatureNetSpec
    module: nn.Module
    weights_path: Path
    weights_sha256: str


def build(name: str, weights: str | Path, device: str | torch.device = "cpu", sha256: str | None = None) -> LoadedNet:
    """A registered net with the weights of an explicit file (no manifest check: tests and
    people calibrating their own nets use this), in eval mode on `device`."""
    s = spec(name)
    module = s.build(Path(weights)).eval().to(device)
    for p in module.parameters():
        p.requires_grad_(False)
    return LoadedNet(s, module, Path(weights), sha256 or sha256_file(weights))


def load(name: str, device: str | torch.device = "cpu", resources_dir=None) -> LoadedNet:
    """A registered net with its checksum-verified weights from the resources (the stages' way)."""
    path, digest = resources.require(spec(name).resource, resources_dir)
    return build(name, path, device, digest)
