"""Feature networks for Fréchet distances, a registry keyed by name.

Two front ends of the same Inception network (the 2015-12-05 TF graph's weights as pytorch-fid
ports them, one weights file), one per evaluation protocol (docs/metrics.md):

- `inception-fid` (protocol `pytorch-fid`): pytorch-fid's `InceptionV3` with its own input path,
  torch's bilinear resize to 299 (half-pixel centres) of [0, 1] images and 2x - 1 scaling.
- `inception-adm` (protocol `adm`): what the ADM evaluator's TF graph does to uint8 images, a
  TF1 legacy bilinear resize to 299 (`tf1_resize_bilinear`) of the 0..255 values and
  (x - 128) / 128, then the same network; it also returns the spatial features of sFID
  (`mixed_6/conv`: Mixed_6d's 1x1 branch, first 7 channels of the 17 x 17 map, flattened in
  NHWC order: 2023 dims). tests/test_metrics_adm.py checks it against torch-fidelity's
  independent TF-exact extractor with the same weights file.

Distances with either are named "FID" (the record names the protocol beside it).
`efficientnet-lite0` (weights ship in a PyPI package, 224 px inputs) and `efficientnet-lite0-128`
(the same on 128 px inputs, the tiny preset's) serve the embedded default; their distances are
named "FD-EffNetLite0" and "FD-EffNetLite0-128", so that none is ever mixed up with another.

Every net takes uint8 images (N, H, W, 3) as a tensor and returns a dict of float32 features:
`pool` (what the distance uses), `logits` (the classifier's output without its bias, for the
Inception Score: the definition of the ADM evaluator and of the original improved-GAN code) and,
for `inception-adm`, `spatial` (sFID).
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
    resize: str          # how images reach the net's input size, as the protocol records it
    spatial_dim: int = 0  # dimension of `spatial` (sFID), 0 when the net has none


def tf1_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1's legacy `resize_bilinear` (align_corners=False, half_pixel_centers=False) of float
    images (N, C, H, W) to (size, size): output pixel i samples the input at i * in / out
    (no half-pixel offset; float32 scale and positions as TF computes them), the upper neighbour
    clamped to the last row/column. Written here rather than imported: torch's `interpolate`
    has no such mode, and torch-fidelity's implementation serves as the independent reference
    the tests compare with. Rows are interpolated first, then columns, the arithmetic of TF's
    kernel: top = tl + (tr - tl) * dx, bottom likewise, out = top + (bottom - top) * dy."""
    def axis(n_in: int):
        scale = torch.tensor(float(n_in), dtype=torch.float32) / torch.tensor(float(size), dtype=torch.float32)
        pos = torch.arange(size, dtype=torch.float32, device=x.device) * scale.to(x.device)
        lo = pos.floor().long()
        return lo, (lo + 1).clamp_max(n_in - 1), (pos - lo.float()).to(x.dtype)

    (y0, y1, dy), (x0, x1, dx) = axis(x.shape[-2]), axis(x.shape[-1])
    left, right = x[..., x0], x[..., x1]
    rows = left + (right - left) * dx
    top, bottom = rows[..., y0, :], rows[..., y1, :]
    return top + (bottom - top) * dy[:, None]


def _pytorch_fid_inception(state: dict, resize_input: bool, normalize_input: bool) -> nn.Module:
    from pytorch_fid import inception as pfi

    # pytorch-fid builds its network with `load_state_dict_from_url`, which would download; we
    # hand it the state dict of our checksum-verified file instead (weights_only load), so the
    # architecture is exactly pytorch-fid's.
    with unittest.mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: state):
        return pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=resize_input,
                               normalize_input=normalize_input, use_fid_inception=True)


def _unbiased_fc(state: dict) -> nn.Module:
    # The 1008-way TF classifier (not kept by pytorch-fid) gives the Inception Score logits,
    # without its bias: what the ADM evaluator's graph (softmax/logits/MatMul) multiplies by.
    fc = nn.Linear(2048, 1008, bias=False)
    fc.load_state_dict({"weight": state["fc.weight"]})
    return fc


class _InceptionFID(nn.Module):
    def __init__(self, weights: Path):
        super().__init__()
        state = load_torch_weights(weights)
        self.net = _pytorch_fid_inception(state, resize_input=True, normalize_input=True)
        self.fc = _unbiased_fc(state)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        # As pytorch-fid's ToTensor(): contiguous NCHW, not a channels-last view (oneDNN takes
        # another convolution path for that layout and the features differ in the last bits).
        x = images.permute(0, 3, 1, 2).contiguous().float() / 255.0
        pool = self.net(x)[0].flatten(1)
        return {"pool": pool, "logits": self.fc(pool)}


class _InceptionADM(nn.Module):
    SIZE = 299
    SPATIAL_CHANNELS = 7  # the evaluator keeps `mixed_6/conv`[..., :7]

    def __init__(self, weights: Path):
        super().__init__()
        state = load_torch_weights(weights)
        self.net = _pytorch_fid_inception(state, resize_input=False, normalize_input=False)
        self.fc = _unbiased_fc(state)
        # `mixed_6/conv` of the TF graph is Mixed_6d's 1x1 branch (conv, batch norm, ReLU), the
        # seventh block of pytorch-fid's block 2 (Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e).
        mixed_6d = self.net.blocks[2][6]
        self._spatial: list[torch.Tensor] = []
        mixed_6d.branch1x1.register_forward_hook(lambda mod, inp, out: self._spatial.append(out))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).contiguous().float()
        if x.shape[-2:] != (self.SIZE, self.SIZE):
            x = tf1_resize_bilinear(x, self.SIZE)
        x = (x - 128) / 128  # the graph's Sub 128, Mul 1/128 (a power of two: the same bits)
        self._spatial.clear()
        pool = self.net(x.contiguous())[0].flatten(1)
        fmap = self._spatial.pop()
        # NHWC flattening, as the evaluator reshapes the TF map (N, 17, 17, 7) to (N, 2023).
        spatial = fmap[:, :self.SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(fmap.shape[0], -1)
        return {"pool": pool, "logits": self.fc(pool), "spatial": spatial}


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
        # Without the bias, as the Inception's logits (one Inception Score definition).
        return {"pool": pool, "logits": F.linear(pool, self.net._fc.weight)}


_TORCH_BILINEAR = "bilinear to the net's input size inside the net (torch, half-pixel centres; pytorch-fid)"

REGISTRY: dict[str, FeatureNetSpec] = {
    "inception-fid": FeatureNetSpec("inception-fid", "FID", "inception-fid", 2048, 1008, _InceptionFID,
                                    _TORCH_BILINEAR + ", [0, 1] -> [-1, 1]"),
    "inception-adm": FeatureNetSpec("inception-adm", "FID", "inception-fid", 2048, 1008, _InceptionADM,
                                    "TF1 legacy bilinear to 299 of 0..255 values, (x - 128) / 128 (ADM's graph)",
                                    spatial_dim=17 * 17 * _InceptionADM.SPATIAL_CHANNELS),
    "efficientnet-lite0": FeatureNetSpec("efficientnet-lite0", "FD-EffNetLite0", "efficientnet-lite0", 1280,
                                         1000, _EfficientNetLite0, _TORCH_BILINEAR),
    # The same net on 128 px inputs: ~4x cheaper on the CPU (24 vs 105 ms per image on one
    # thread), for the tiny preset's 64 px images. Another metric, hence another name.
    "efficientnet-lite0-128": FeatureNetSpec("efficientnet-lite0-128", "FD-EffNetLite0-128", "efficientnet-lite0",
                                             1280, 1000, lambda w: _EfficientNetLite0(w, 128), _TORCH_BILINEAR),
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
