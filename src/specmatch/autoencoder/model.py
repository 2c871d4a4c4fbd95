"""The KL autoencoder of docs/method.md §5: an SD "AutoencoderKL" clone in plain torch.

Layout (docs/method.md §5): conv_in; per level `num_res_blocks` ResBlocks and a stride-2 down-sampling
conv except at the last level; a mid block (ResBlock, single-head self-attention, ResBlock);
GN, SiLU, conv to 2*z (mean, logvar); a 1x1 `quant_conv`. The decoder mirrors it with one more
ResBlock per level and nearest x2 up-sampling, and has no output activation (images live in
[-1, 1] but the reconstruction is not squashed, as in SD).

Module names follow the SD layout (`encoder.down.{level}.block.{i}`, `encoder.mid.attn_1`,
`decoder.up.{level}` indexed by level, `quant_conv`, ...), so the state dict of an SD-VAE
checkpoint maps onto the f8d4 model key for key (`autoencoder.import_ae` maps the diffusers
layout). Only the parameter *layout* is shared; the code is this project's own.

Down-sampling padding (`AEConfig.downsample_padding`): the authors' VAE pads its stride-2 convs
symmetrically (padding 1 on every side; forever208/SpectrumMatching, modules/layers.py
DownSampleBlock2D), SD pads right and bottom only (F.pad (0, 1, 0, 1), padding 0). Both map 2n
to n, but the kernel grid is shifted by one pixel, so weights trained with one give other
latents with the other. Our trained autoencoders use the authors' `symmetric`; a loaded SD-VAE
needs `sd` (docs/reference-fidelity.md).

Mixed precision: GroupNorm already runs in float32 under CUDA autocast; the attention is
explicitly computed in float32 (its softmax over up to 1024 tokens is the one place where bf16
visibly hurts), and the posterior is held in float32 so that `exp(logvar)` and the KL sum do not
round. Forward has no data-dependent python control flow, so `torch.compile(fullgraph=True)`
traces it in one graph (shape checks are guards, not graph breaks).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from specmatch.errors import SpecmatchError

__all__ = [
    "AEConfig", "CONFIGS", "config", "DiagonalGaussian", "AutoencoderKL", "PixelIdentity", "build",
    "count_parameters", "LOGVAR_MIN", "LOGVAR_MAX",
]

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # docs/method.md §5: logvar clamp, as in SD
PADDINGS = ("symmetric", "sd")  # AEConfig.downsample_padding
GN_EPS = 1e-6  # docs/method.md §5 / SD; torch's default 1e-5 would change the numbers of a loaded SD-VAE


@dataclass(frozen=True)
class AEConfig:
    """Shape of one autoencoder. `channels` is the width of each resolution level (the first is
    also conv_in's width); the spatial down factor is 2 per level after the first."""

    name: str
    channels: tuple[int, ...]
    z_channels: int
    num_res_blocks: int = 2  # encoder; the decoder uses num_res_blocks + 1 (docs/method.md §5)
    in_channels: int = 3
    attn_in_mid: bool = True
    norm_groups: int = 32
    downsample_padding: str = "symmetric"  # "symmetric" (the authors') or "sd" (right/bottom only)
    # Pixel space: the "autoencoder" is the identity (`PixelIdentity`), so that diffusion on
    # pixels goes through the same stages as latent diffusion. Needs one level and z = in channels.
    identity: bool = False

    @property
    def down_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


CONFIGS: dict[str, AEConfig] = {
    c.name: c
    for c in (
        AEConfig("f8d4", (128, 256, 512, 512), 4),
        AEConfig("f16d16", (128, 128, 256, 256, 512), 16),
        AEConfig("f32d64", (128, 128, 256, 256, 512, 512), 64),
        # 2-core CPU demo on 64 px images: down factor 4 gives a 16x16x4 latent, the same latent
        # grid as f16 at 256 px, so the spectral losses see a realistic map size. The full-res
        # level is kept at 16 channels because it dominates the cost: one AE train step at batch
        # 16 takes ~0.45 s on 2 cores, against ~0.85 s with 32 (before LPIPS and D).
        AEConfig("tiny", (16, 32, 64), 4, num_res_blocks=1, norm_groups=8),
        # Pixel-space diffusion (docs/method.md §1): latents are the images themselves.
        AEConfig("pixels", (3,), 3, num_res_blocks=1, norm_groups=1, identity=True),
    )
}


def _validate(cfg: AEConfig) -> AEConfig:
    where = f"autoencoder config {cfg.name!r}"
    if not cfg.channels or any(int(c) < 1 for c in cfg.channels):
        raise SpecmatchError(f"{where}: channels must be a non-empty list of positive ints, got {cfg.channels}")
    bad = [c for c in cfg.channels if c % cfg.norm_groups]
    if cfg.norm_groups < 1 or bad:
        raise SpecmatchError(
            f"{where}: every entry of channels must be divisible by norm_groups={cfg.norm_groups} "
            f"(GroupNorm), not {bad or cfg.channels}")
    for key in ("z_channels", "num_res_blocks", "in_channels"):
        if int(getattr(cfg, key)) < 1:
            raise SpecmatchError(f"{where}: {key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.identity and (len(cfg.channels) != 1 or cfg.z_channels != cfg.in_channels):
        raise SpecmatchError(f"{where}: an identity (pixel-space) config has one level and z_channels = in_channels "
                             f"({cfg.in_channels}), got channels {list(cfg.channels)}, z_channels {cfg.z_channels}")
    if cfg.downsample_padding not in PADDINGS:
        raise SpecmatchError(f"{where}: downsample_padding must be one of {list(PADDINGS)}, "
                             f"got {cfg.downsample_padding!r}")
    return cfg


def with_padding(cfg: AEConfig, padding: str | None) -> AEConfig:
    """`cfg` with its down-sampling padding replaced (None: unchanged), validated."""
    return cfg if padding is None else _validate(dataclasses.replace(cfg, downsample_padding=padding))


def config(name_or_dict: str | Mapping[str, Any] | AEConfig) -> AEConfig:
    """An AEConfig from a name in CONFIGS, from a dict of AEConfig fields (`name` optional), or
    from a dict naming a config of CONFIGS without `channels` and changing some of its fields."""
    if isinstance(name_or_dict, AEConfig):
        return _validate(name_or_dict)
    if isinstance(name_or_dict, str):
        if name_or_dict not in CONFIGS:
            raise SpecmatchError(
                f"unknown autoencoder config {name_or_dict!r}; known: {', '.join(sorted(CONFIGS))}")
        return CONFIGS[name_or_dict]
    if not isinstance(name_or_dict, Mapping):
        raise SpecmatchError(
            f"autoencoder config must be a name ({', '.join(sorted(CONFIGS))}) or a dict of fields, "
            f"got {type(name_or_dict).__name__}")
    fields = {f.name for f in dataclasses.fields(AEConfig)}
    unknown = sorted(set(name_or_dict) - fields)
    if unknown:
        raise SpecmatchError(
            f"autoencoder config: unknown key(s) {unknown}; allowed: {sorted(fields)} "
            f"(or a name: {', '.join(sorted(CONFIGS))})")
    kw = dict(name_or_dict)
    if kw.get("name") in CONFIGS and "channels" not in kw:
        # A named config with some fields changed, e.g. {name: f8d4, downsample_padding: sd}.
        kw = {**dataclasses.asdict(CONFIGS[kw["name"]]), **kw}
    kw.setdefault("name", "custom")
    missing = sorted({"channels", "z_channels"} - set(kw))
    if missing:
        raise SpecmatchError(f"autoencoder config {kw['name']!r}: missing key(s) {missing}")
    try:
        kw["channels"] = tuple(int(c) for c in kw["channels"])
        for key in ("z_channels", "num_res_blocks", "in_channels", "norm_groups"):
            if key in kw:
                kw[key] = int(kw[key])
        for key in ("attn_in_mid", "identity"):
            if key in kw:
                kw[key] = bool(kw[key])
    except (TypeError, ValueError) as e:
        raise SpecmatchError(f"autoencoder config {kw['name']!r}: bad value ({e})") from None
    return _validate(AEConfig(**kw))


# --------------------------------------------------------------------------- building blocks


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=GN_EPS, affine=True)


class ResBlock(nn.Module):
    """GN, SiLU, 3x3 conv, GN, SiLU, 3x3 conv, plus a (1x1-projected when widths differ) skip.
    SD has a dropout before the second conv; it is 0 for the VAE, so it is left out."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


def _autocast_device(t: torch.Tensor) -> str:
    # torch.autocast rejects device types it has no policy for (e.g. "meta", used to count
    # parameters and check shapes); any valid type works there, since nothing is computed.
    return t.device.type if t.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, residual. Scale 1/sqrt(C) (SDPA's default,
    also SD's). Softmax in float32 with autocast off: under bf16 autocast SDPA would otherwise
    run in bf16, and the mid block of f8 at 256 px attends over 1024 tokens."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1 head, HW, C), fp32
            return t.reshape(b, 1, c, hh * ww).transpose(-1, -2).float()

        with torch.autocast(device_type=_autocast_device(x), enabled=False):
            out = F.scaled_dot_product_attention(tokens(q), tokens(k), tokens(v))
        out = out.transpose(-1, -2).reshape(b, c, hh, ww).to(q.dtype)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv, 2n -> n. `padding`: "symmetric" pads one zero on every side (the
    authors' VAE: output pixel i sees input rows 2i-1..2i+1); "sd" pads right and bottom only
    (SD's: rows 2i..2i+2), so that SD checkpoints see the grid they were trained on."""

    def __init__(self, channels: int, padding: str = "symmetric"):
        super().__init__()
        self.sd = padding == "sd"
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.sd else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.sd else x)


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int, groups: int, attn: bool):
        super().__init__()
        self.block_1 = ResBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups) if attn else nn.Identity()
        self.block_2 = ResBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """The ResBlocks of one resolution level plus its optional resampler (`downsample` in the
    encoder, `upsample` in the decoder; the SD attribute names)."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, groups: int, resample: str | None,
                 padding: str = "symmetric"):
        super().__init__()
        self.block = nn.ModuleList(
            ResBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n_blocks))
        if resample == "down":
            self.downsample = Downsample(c_out, padding)
        elif resample == "up":
            self.upsample = Upsample(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        # Fixed at construction time, so this is not data-dependent control flow.
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: AEConfig):
        super().__init__()
        ch, g, last = cfg.channels, cfg.norm_groups, len(cfg.channels) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList(
            _Level(ch[max(i - 1, 0)], ch[i], cfg.num_res_blocks, g, "down" if i < last else None,
                   cfg.downsample_padding)
            for i in range(len(ch)))
        self.mid = _Mid(ch[-1], g, cfg.attn_in_mid)
        self.norm_out = _norm(ch[-1], g)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: AEConfig):
        super().__init__()
        ch, g = cfg.channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.z_channels, ch[-1], 3, padding=1)
        self.mid = _Mid(ch[-1], g, cfg.attn_in_mid)
        # up[i] is level i (as in SD), but it is built and run from the lowest resolution up:
        # level i takes the width of level i+1 (or the mid block's for the last level).
        self.up = nn.ModuleList(
            _Level(ch[min(i + 1, len(ch) - 1)], ch[i], cfg.num_res_blocks + 1, g, "up" if i > 0 else None)
            for i in range(len(ch)))
        self.norm_out = _norm(ch[0], g)
        self.conv_out = nn.Conv2d(ch[0], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# --------------------------------------------------------------------------- posterior


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, exp(logvar)) from the encoder's (B, 2z, h, w) moments
    (first z channels the mean, the rest the log-variance). Held in float32 whatever the
    moments' dtype: exp(logvar) and the KL sum over thousands of elements need it."""

    def __init__(self, moments: torch.Tensor):
        if moments.ndim < 2 or moments.shape[1] % 2:
            raise SpecmatchError(
                f"DiagonalGaussian: moments need an even channel dim 1 (mean, logvar), got shape {tuple(moments.shape)}")
        mean, logvar = moments.float().chunk(2, dim=1)
        self.mean = mean
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps with eps ~ N(0, I); reproducible given a seeded `generator` (which must
        live on the same device as the moments)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over all non-batch dims: shape (B,)."""
        dims = tuple(range(1, self.mean.ndim))
        return -0.5 * torch.sum(1.0 + self.logvar - self.mean.pow(2) - self.var, dim=dims)


# --------------------------------------------------------------------------- model


def _cpu_channels_last(x: torch.Tensor) -> torch.Tensor:
    """On the CPU the convolutions (three quarters of a training step) run about 15% faster on
    channels-last activations (oneDNN's native layout; bench/autoencoder.py measures it), the
    weights staying in the default layout so that checkpoints are unchanged. The outputs of
    `encode` and `decode` are returned in the default layout. Not applied on CUDA, where it is
    unmeasured here (bench/gpu.py)."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


class AutoencoderKL(nn.Module):
    """Encoder + `quant_conv` -> DiagonalGaussian; `post_quant_conv` + decoder -> image.
    Images are (B, in_channels, H, W) in [-1, 1] with H, W divisible by `cfg.down_factor`."""

    def __init__(self, cfg: AEConfig):
        super().__init__()
        self.cfg = _validate(cfg)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def _check_size(self, x: torch.Tensor) -> None:
        f = self.cfg.down_factor
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise SpecmatchError(
                f"autoencoder {self.cfg.name!r}: expected images (B, {self.cfg.in_channels}, H, W), "
                f"got shape {tuple(x.shape)}")
        if x.shape[-2] % f or x.shape[-1] % f:
            raise SpecmatchError(
                f"autoencoder {self.cfg.name!r}: image size {x.shape[-2]}x{x.shape[-1]} is not divisible "
                f"by the down factor {f}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        self._check_size(x)
        moments = self.quant_conv(self.encoder(_cpu_channels_last(x)))
        return DiagonalGaussian(moments.contiguous())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        # The posterior is float32; follow the weights' dtype so that a model cast to bf16 as a
        # whole still runs (under autocast the conv casts anyway, and this is a no-op in fp32).
        z = _cpu_channels_last(z.to(self.post_quant_conv.weight.dtype))
        return self.decoder(self.post_quant_conv(z)).contiguous()

    def forward(
        self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's final conv weight: where docs/method.md §5's adaptive GAN weight takes its norms."""
        return self.decoder.conv_out.weight


class PixelIdentity(nn.Module):
    """The pixel-space "autoencoder": encode gives the image as the posterior mean, with the
    log-variance at the clamp floor LOGVAR_MIN (a std of 3e-7, below half a uint8 level of 1/127.5,
    so a posterior sample rounds back to the same image), and decode returns its input. It has no
    weights: `train-ae` writes it without training, and every stage after it (latents with their
    scale factor from the data, diffusion, sampling, FD) runs on pixels unchanged."""

    def __init__(self, cfg: AEConfig):
        super().__init__()
        self.cfg = _validate(cfg)
        if not cfg.identity:
            raise SpecmatchError(f"autoencoder config {cfg.name!r} is not an identity config")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise SpecmatchError(f"autoencoder {self.cfg.name!r}: expected images (B, {self.cfg.in_channels}, H, W), "
                                 f"got shape {tuple(x.shape)}")
        return DiagonalGaussian(torch.cat([x, torch.full_like(x, LOGVAR_MIN)], dim=1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def forward(self, x: torch.Tensor, sample: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample else posterior.mode()), posterior


def build(cfg_or_name: str | Mapping[str, Any] | AEConfig) -> AutoencoderKL | PixelIdentity:
    cfg = config(cfg_or_name)
    return PixelIdentity(cfg) if cfg.identity else AutoencoderKL(cfg)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def to_float(images: np.ndarray, device) -> torch.Tensor:
    """uint8 images (B, H, W, 3) -> float NCHW in [-1, 1], the autoencoder's input."""
    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC, as a saved image would be."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
