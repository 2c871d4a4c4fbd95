"""Frozen target encoders for representation alignment (docs/method.md §7), a registry keyed by name.

- `dinov2-vitb14`: DINOv2 ViT-B/14, built with timm's `VisionTransformer` and loaded from Meta's
  official checkpoint file (`dinov2_vitb14_pretrain.pth`, in `resources/`). Images are resized
  to 224 px (bicubic) and normalised with ImageNet's mean and std; the targets are the patch
  tokens after the final norm (DINOv2's `x_norm_patchtokens`), a 16x16 grid of 768-d tokens.
  The checkpoint's position table (37x37, for 518 px) is resampled once, at load, exactly as
  DINOv2 resamples it at run time (bicubic with its scale factor (g + 0.1) / 37, no antialias),
  so the features equal DINOv2's own forward at that size.
- `efficientnet-lite0`: the final 1280-channel feature map of EfficientNet-Lite0 (weights ship in
  a PyPI package), on 256 px inputs: an 8x8 grid, the embedded default's target.
- `efficientnet-lite0-s16` and `-s8`: the maps at stride 16 (112 channels, on 128 px inputs) and
  stride 8 (40 channels, on 64 px inputs): also 8x8 grids, at about 1/6 and 1/40 of the cost.
  The 256 px net costs ~0.2 s per image on one CPU thread, too much for the tiny preset's 8192
  cache entries; `-s8` on the tiny images' own 64 px is its target.

Every encoder takes uint8 images (N, H, W, 3) and returns float32 token grids (N, D, h, w) with
h = w = image_size / stride. `image_size` may be overridden (the grid follows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import resources
from ..errors import SpecmatchError
from ..runtime.hashing import sha256_file
from ..runtime.weights import load_torch_weights
from .registry import REGISTRY, EncoderSpec, grid_of, resolved_size, spec  # noqa: F401  (the registry lives without torch)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINOV2_INTERPOLATE_OFFSET = 0.1  # DINOv2's `interpolate_offset` (hub models), kept for exact features
# Keys of the official checkpoint that the encoder does not use (masked-token pretraining only).
DINOV2_UNUSED_KEYS = ("mask_token",)


# --------------------------------------------------------------------------- DINOv2


def resample_dinov2_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + M*M, D) -> (1, 1 + grid*grid, D) the way DINOv2's `interpolate_pos_encoding` does
    at run time: bicubic on the M x M table with scale factor (grid + 0.1) / M, no antialias."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    m = int(round(patch_pos.shape[1] ** 0.5))
    if m * m != patch_pos.shape[1]:
        raise SpecmatchError(f"DINOv2 position table of {patch_pos.shape[1]} patch entries is not square")
    if m == grid:
        return pos_embed
    d = patch_pos.shape[-1]
    scale = (grid + DINOV2_INTERPOLATE_OFFSET) / m
    table = patch_pos.float().reshape(1, m, m, d).permute(0, 3, 1, 2)
    table = F.interpolate(table, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    if table.shape[-2:] != (grid, grid):
        raise SpecmatchError(f"DINOv2 position resampling gave {tuple(table.shape[-2:])}, expected {grid}x{grid}")
    table = table.permute(0, 2, 3, 1).reshape(1, grid * grid, d)
    return torch.cat([cls_pos.float(), table], dim=1).to(pos_embed.dtype)


def build_dinov2(state: dict[str, torch.Tensor], image_size: int, heads: int, where: str = "checkpoint") -> nn.Module:
    """timm's VisionTransformer holding an official DINOv2 state dict (key layout of
    `dinov2_vit*_pretrain.pth`); the architecture is read off the tensors' shapes (heads given).
    Missing or unexpected keys are refused by name."""
    from timm.models.vision_transformer import VisionTransformer

    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in state:
            raise SpecmatchError(f"{where}: not a DINOv2 checkpoint (no {key!r})")
    width = int(state["cls_token"].shape[-1])
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    mlp_hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0]) if "blocks.0.mlp.fc1.weight" in state else 4 * width
    if image_size % patch:
        raise SpecmatchError(f"{where}: image_size {image_size} is not a multiple of the patch size {patch}")
    grid = image_size // patch
    net = VisionTransformer(img_size=image_size, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
                            mlp_ratio=mlp_hidden / width, init_values=1.0, num_classes=0, global_pool="",
                            dynamic_img_size=False)
    state = {k: v for k, v in state.items() if k not in DINOV2_UNUSED_KEYS}
    state["pos_embed"] = resample_dinov2_pos_embed(state["pos_embed"], grid)
    expected = set(net.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise SpecmatchError(f"{where}: does not fit DINOv2 ViT (width {width}, depth {depth}, patch {patch}): "
                             f"missing keys {missing}, unexpected keys {unexpected}")
    net.load_state_dict(state, strict=True)
    return net


class _DINOv2(nn.Module):
    def __init__(self, weights: Path, image_size: int, heads: int):
        super().__init__()
        state = load_torch_weights(weights)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        self.net = build_dinov2(state, image_size, heads, where=str(weights))
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: float (N, 3, H, W) in [0, 1]
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        tokens = self.net.forward_features((x - self.mean) / self.std)[:, self.net.num_prefix_tokens:]
        g = self.image_size // self.net.patch_embed.patch_size[0]
        return tokens.transpose(1, 2).reshape(len(x), -1, g, g)


# --------------------------------------------------------------------------- EfficientNet-Lite0


class _EffNetLite0(nn.Module):
    def __init__(self, weights: Path, image_size: int, stride: int):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0")
        net.load_state_dict(load_torch_weights(weights))
        # Channels-last: oneDNN's depthwise convolutions run ~1.6x faster on the CPU in that layout.
        self.net, self.image_size, self.stride = net.to(memory_format=torch.channels_last), image_size, stride
        # Keep the blocks up to the stride asked for: stop before the first block that would
        # take the cumulative stride (the stem's 2, times each block's) beyond it.
        total, self.n_blocks = 2, len(net._blocks)
        for i, b in enumerate(net._blocks):
            st = b._block_args.stride
            total *= int(st[0] if isinstance(st, (list, tuple)) else st)
            if total > stride:
                self.n_blocks = i
                break

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        n = self.net
        h = n._swish(n._bn0(n._conv_stem(((x - 0.5) / 0.5).contiguous(memory_format=torch.channels_last))))
        for block in n._blocks[:self.n_blocks]:
            h = block(h)
        if self.stride == 32:
            h = n._swish(n._bn1(n._conv_head(h)))
        return h.contiguous()


# --------------------------------------------------------------------------- loading


class TargetEncoder(nn.Module):
    """A frozen encoder: uint8 images (N, H, W, 3) -> float32 token grids (N, D, g, g)."""

    def __init__(self, s: EncoderSpec, module: nn.Module, image_size: int, weights: Path, sha256: str):
        super().__init__()
        self.spec, self.module, self.image_size = s, module, image_size
        self.grid = image_size // s.stride
        self.weights_path, self.weights_sha256 = Path(weights), sha256

    @property
    def dim(self) -> int:
        return self.spec.dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise SpecmatchError(f"target encoder {self.spec.name}: expected uint8 images (N, H, W, 3), got "
                                 f"{images.dtype} {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).contiguous().float() / 255.0
        out = self.module(x).float()
        if out.shape[1:] != (self.spec.dim, self.grid, self.grid):
            raise SpecmatchError(f"target encoder {self.spec.name}: produced {tuple(out.shape[1:])}, expected "
                                 f"{(self.spec.dim, self.grid, self.grid)}")
        return out

    def describe(self) -> dict[str, Any]:
        return {"encoder": self.spec.name, "what": self.spec.what, "image_size": self.image_size,
                "grid": [self.grid, self.grid], "dim": self.spec.dim, "weights_file": self.weights_path.name,
                "weights_sha256": self.weights_sha256}


def build(name: str, weights: str | Path, image_size: int | None = None, device: str | torch.device = "cpu",
          sha256: str | None = None) -> TargetEncoder:
    """Encoder `name` with the weights of an explicit file (tests; the stages use `load`)."""
    s = spec(name)
    size = resolved_size(name, image_size)
    grid_of(name, size)
    weights = Path(weights)
    # The layers' random initialisation (overwritten by the weights) must not consume the
    # caller's RNG: a trainer seeded before loading an encoder builds its projector after it.
    with torch.random.fork_rng(devices=[]):
        if s.family == "dinov2":
            module: nn.Module = _DINOv2(weights, size, s.heads)
        else:
            module = _EffNetLite0(weights, size, s.stride)
    enc = TargetEncoder(s, module, size, weights, sha256 or sha256_file(weights)).eval().to(device)
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


def load(name: str, image_size: int | None = None, device: str | torch.device = "cpu",
         resources_dir=None) -> TargetEncoder:
    """Encoder `name` with its checksum-verified weights from the resources."""
    path, digest = resources.require(spec(name).resource, resources_dir)
    return build(name, path, image_size, device, digest)
