"""The two latent-diffusion networks of docs/method.md §6 and their registry.

* `UViT` (Bao et al. 2023, "All are worth words"): every input is a token -- [time, (class),
  patches] -- with a learned absolute position embedding over all of them, pre-norm transformer
  blocks, and long skips between the shallow and deep halves. `depth` is U-ViT's own config
  number: depth//2 in-blocks, one mid block, depth//2 out-blocks, so "depth 12" has 13 blocks
  (U-ViT-S in the paper: "13 layers"). Out-block i takes the output of in-block depth//2 - 1 - i
  (a stack), concatenates it to its input and maps 2*width -> width with a Linear first. The
  head is LayerNorm, Linear to patch*patch*C, unpatchify and a 3x3 conv (U-ViT's `conv=True`).
  No qkv bias, exact GELU, and the time token is the bare sinusoid of 1000*t of size `width`
  (U-ViT's `mlp_time_embed=False`, used by all its released configs; it also keeps U-ViT-S at
  the paper's 44M parameters). Init as U-ViT: truncated normal 0.02 for linears and pos_embed.
* `SiT` (Ma et al. 2024; the network is DiT's, Peebles & Xie 2023): patch embedding, fixed 2-D
  sin-cos position embedding, DiT blocks with adaLN-Zero conditioned on c = t_emb + y_emb, an
  adaLN final layer and unpatchify. qkv bias, GELU(tanh), LayerNorm without affine (eps 1e-6),
  no learned sigma (out channels = in channels). Init as DiT: xavier-uniform linears, patch
  embedding like a linear, normal 0.02 for the label table and the timestep MLP, zeros for every
  adaLN modulation and for the final layer, so a fresh SiT outputs exactly zero.

Module and parameter names follow the reference code (`x_embedder.proj`, `t_embedder.mlp`,
`y_embedder.embedding_table`, `blocks.{i}.adaLN_modulation.1`, `final_layer.linear` for SiT;
`patch_embed.proj`, `in_blocks`, `mid_block`, `out_blocks.{i}.skip_linear`, `decoder_pred`,
`final_layer` for U-ViT), so the released checkpoints' state dicts map onto these modules key for
key (SiT's `pos_embed` is a buffer here; DiT checkpoints with learn_sigma have 2*C outputs).

The building blocks -- attention, MLP, patch embedding -- are timm's (`timm.layers.Attention`,
`Mlp`, `PatchEmbed`, the ones DiT and U-ViT themselves build on), with U-ViT's and DiT's settings:
no qkv bias and exact GELU for U-ViT, qkv bias and GELU(tanh) for SiT. timm's Attention goes
through `F.scaled_dot_product_attention` (its `fused_attn`, on unless TIMM_FUSED_ATTN=0 is set;
the fallback is the same attention written out). Importing timm imports torchvision; together
they add a few seconds to this module's import.
What timm has no block for is written here: the time embeddings, U-ViT's long-skip block, DiT's
adaLN-Zero block and final layer.

Time input: both families embed `time_scale * t` (default 1000, DDPM-style steps). Imported
checkpoints keep their own scale (`diffusion.import_model`): U-ViT's continuous models were trained on
999 t, SiT's and REPA's on t itself (1), so an imported network carries `time_scale` in its
summary and is built with it.

Common interface (the trainer, the samplers and REPA rely on it):
`model(x[B,C,H,W], t[B] in [0,1], y[B] long | None, hidden_block=None) -> out[B,C,H,W]`, or
`(out, hidden)` with `hidden` the patch tokens (B, N, width) after the 1-based block
`hidden_block` in forward order (for U-ViT: in-blocks, mid, out-blocks; time and class tokens
removed). Class-conditional models take labels in [0, num_classes]; `num_classes` itself is
`null_label`, the "no class" input of classifier-free guidance. Unconditional models ignore y.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn

from timm.layers import Attention, Mlp, PatchEmbed

from specmatch.errors import SpecmatchError

__all__ = [
    "NetConfig", "NETS", "PATCHES", "parse_name", "build", "count_parameters",
    "UViT", "SiT", "timestep_embedding", "sincos_pos_embed_2d", "patchify", "unpatchify",
]

PATCHES = (1, 2, 4, 8)
TIME_SCALE = 1000.0  # continuous t in [0, 1] is embedded as the DDPM-style step 1000*t
SIT_FREQ_DIM = 256  # DiT's TimestepEmbedder frequency_embedding_size


# --------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class NetConfig:
    """Size of one network. For U-ViT `depth` is U-ViT's config number (blocks = depth + 1)."""

    family: str  # "uvit" | "sit"
    width: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0


NETS: dict[str, NetConfig] = {
    "UViT-S": NetConfig("uvit", 512, 12, 8),  # 13 blocks, U-ViT paper's U-ViT-S (44M)
    "UViT-M": NetConfig("uvit", 768, 16, 12),  # 17 blocks, U-ViT-M (131M)
    "UViT-L": NetConfig("uvit", 1024, 20, 16),  # 21 blocks, U-ViT-L (the released ImageNet 256 U-ViT-L/2)
    "UViT-H": NetConfig("uvit", 1152, 28, 16),  # 29 blocks, U-ViT-H
    "UViT-tiny": NetConfig("uvit", 128, 4, 4),  # 5 blocks; CPU demo and tests
    "SiT-S": NetConfig("sit", 384, 12, 6),
    "SiT-B": NetConfig("sit", 768, 12, 12),
    "SiT-L": NetConfig("sit", 1024, 24, 16),
    "SiT-XL": NetConfig("sit", 1152, 28, 16),
    "SiT-tiny": NetConfig("sit", 128, 4, 4),  # CPU demo and tests
}


def _known_names() -> str:
    return ", ".join(f"{k}/p" for k in NETS) + f" with p in {list(PATCHES)}"


def parse_name(name: str) -> tuple[NetConfig, int]:
    """'SiT-B/2' -> (NETS['SiT-B'], 2)."""
    size, sep, patch_s = str(name).partition("/")
    if not sep or size not in NETS:
        raise SpecmatchError(f"unknown diffusion network {name!r}; known: {_known_names()}")
    try:
        patch = int(patch_s)
    except ValueError:
        patch = -1
    if patch not in PATCHES or patch_s.strip() != str(patch):
        raise SpecmatchError(
            f"diffusion network {name!r}: patch {patch_s!r} is not one of {list(PATCHES)}"
        )
    return NETS[size], patch


def build(name: str, *, in_channels: int, input_size: int, num_classes: int = 0,
          time_scale: float = TIME_SCALE) -> nn.Module:
    """The network `name` ('UViT-S/2', 'SiT-B/1', ...) for square latents of `in_channels` x
    `input_size` x `input_size`; `num_classes` > 0 makes it class-conditional (one extra label,
    `num_classes`, is the null label); `time_scale`: the time input is the sinusoid of
    time_scale * t (imported checkpoints keep their own)."""
    cfg, patch = parse_name(name)
    values = patch * patch * int(in_channels)
    if values > cfg.width:
        # Each token is the linear embedding of one patch: more values than the width cannot all
        # pass the embedding (measured: UViT-tiny/4 on 16-channel latents, 256 values into 128,
        # did not learn at all), so the run would spend its budget on a network that cannot fit.
        raise SpecmatchError(
            f"diffusion network {name!r} on {in_channels}-channel latents: a token holds patch^2 x channels = "
            f"{patch}^2 x {in_channels} = {values} values, more than the network's width {cfg.width}; use a smaller "
            f"patch (/{max([p for p in PATCHES if p * p * int(in_channels) <= cfg.width] or [1])}) or a wider network")
    cls = {"uvit": UViT, "sit": SiT}[cfg.family]
    return cls(
        in_channels=in_channels, input_size=input_size, patch=patch, width=cfg.width,
        depth=cfg.depth, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, num_classes=num_classes,
        name=name, time_scale=time_scale,
    )


def count_parameters(model: nn.Module) -> int:
    """All parameters (trained or not). SiT's fixed position embedding is a buffer, not counted."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Shared pieces


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of the (fractional) steps `t` (B,), as in DiT / U-ViT /
    ADM; computed in float32 whatever the autocast state (written by hand: timm has none)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """DiT/MAE's fixed 2-D sin-cos position embedding (grid*grid, dim), row-major tokens. The
    first half of the channels encodes the column (DiT's meshgrid(w, h) puts w first), the second
    half the row; each half is [sin, cos] of pos * 10000^(-k/(dim/4))."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs width divisible by 4, got {dim}")
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows = pos.repeat_interleave(grid)  # token n = r * grid + c
    cols = pos.repeat(grid)

    def one(p: torch.Tensor) -> torch.Tensor:
        a = p[:, None] * omega[None]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)

    return torch.cat([one(cols), one(rows)], dim=1).float()


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C), row-major tokens, features ordered (p, q, c)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of `patchify` (DiT's and U-ViT's feature layout (p, q, c))."""
    b = x.shape[0]
    gh, gw = grid
    x = x.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, gh * p, gw * p)


def _patch_embed(in_channels: int, width: int, patch: int, input_size: int) -> PatchEmbed:
    """timm's strided-conv patch embedding -> (B, N, width) tokens (`proj`, as DiT and U-ViT)."""
    return PatchEmbed(img_size=input_size, patch_size=patch, in_chans=in_channels, embed_dim=width)


class _Net(nn.Module):
    """Attributes and input checks shared by both families."""

    def _setup(self, *, name, in_channels, input_size, patch, width, heads, num_classes, n_blocks,
               time_scale=TIME_SCALE):
        if not time_scale > 0:
            raise SpecmatchError(f"{name}: time_scale must be > 0, got {time_scale}")
        if patch not in PATCHES:
            raise SpecmatchError(f"{name}: patch {patch} is not one of {list(PATCHES)}")
        if input_size <= 0 or input_size % patch:
            raise SpecmatchError(
                f"{name}: latent size {input_size} is not divisible by the patch size {patch}"
            )
        if num_classes < 0:
            raise SpecmatchError(f"{name}: num_classes must be >= 0, got {num_classes}")
        if heads < 1 or width % heads:
            raise SpecmatchError(f"{name}: width {width} is not divisible by {heads} heads")
        self.name = name
        self.in_channels = in_channels
        self.input_size = input_size
        self.patch = patch
        self.hidden_dim = width
        self.num_classes = num_classes
        self.null_label = num_classes
        self.token_grid = (input_size // patch, input_size // patch)
        self.n_blocks = n_blocks
        self.time_scale = float(time_scale)

    def _check(self, x: torch.Tensor, t: torch.Tensor, y, hidden_block) -> None:
        want = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"{self.name}: expected x of shape (B, {want}), got {tuple(x.shape)}")
        b = x.shape[0]
        if t.shape != (b,):
            raise ValueError(f"{self.name}: expected t of shape ({b},), got {tuple(t.shape)}")
        if self.num_classes > 0:
            if y is None:
                raise ValueError(
                    f"{self.name} is class-conditional ({self.num_classes} classes): pass y "
                    f"(use the null label {self.null_label} for the unconditional branch)"
                )
            if y.shape != (b,):
                raise ValueError(f"{self.name}: expected y of shape ({b},), got {tuple(y.shape)}")
        if hidden_block is not None and not 1 <= hidden_block <= self.n_blocks:
            raise SpecmatchError(
                f"{self.name}: hidden_block {hidden_block} is outside [1, {self.n_blocks}] "
                f"(the network has {self.n_blocks} transformer blocks)"
            )


# --------------------------------------------------------------------------------------------
# U-ViT


class UViTBlock(nn.Module):
    """Pre-norm transformer block; with `skip`, a Linear(2*width, width) on concat(h, skip) first
    (U-ViT's long skip; timm's Block has no such input, hence this class)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, skip: bool = False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * width, width) if skip else None
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, qkv_bias=False)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(_Net):
    """U-ViT; see the module docstring. `depth` must be even: depth//2 in-blocks, a mid block and
    depth//2 out-blocks, i.e. depth + 1 blocks (U-ViT's configs: depth=12 -> 13 blocks)."""

    def __init__(self, *, in_channels: int, input_size: int, patch: int, width: int, depth: int,
                 heads: int, mlp_ratio: float = 4.0, num_classes: int = 0, name: str = "UViT",
                 time_scale: float = TIME_SCALE):
        super().__init__()
        if depth < 2 or depth % 2:
            raise SpecmatchError(f"{name}: U-ViT depth must be even and >= 2, got {depth}")
        self._setup(name=name, in_channels=in_channels, input_size=input_size, patch=patch,
                    width=width, heads=heads, num_classes=num_classes, n_blocks=depth + 1,
                    time_scale=time_scale)
        self.extras = 2 if num_classes > 0 else 1  # time token (+ class token)
        n_tokens = self.extras + self.token_grid[0] * self.token_grid[1]
        self.patch_embed = _patch_embed(in_channels, width, patch, input_size)
        if num_classes > 0:
            self.label_emb = nn.Embedding(num_classes + 1, width)  # last row: null label
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, width))
        self.in_blocks = nn.ModuleList(
            UViTBlock(width, heads, mlp_ratio) for _ in range(depth // 2)
        )
        self.mid_block = UViTBlock(width, heads, mlp_ratio)
        self.out_blocks = nn.ModuleList(
            UViTBlock(width, heads, mlp_ratio, skip=True) for _ in range(depth // 2)
        )
        self.norm = nn.LayerNorm(width)
        self.decoder_pred = nn.Linear(width, patch * patch * in_channels)
        self.final_layer = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # nn.Embedding keeps torch's N(0, 1) and the convs torch's default, as in U-ViT.

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                hidden_block: int | None = None):
        self._check(x, t, y, hidden_block)
        h = self.patch_embed(x)
        time_tok = timestep_embedding(t * self.time_scale, self.hidden_dim).to(h.dtype)
        toks = [time_tok[:, None]]
        if self.num_classes > 0:
            toks.append(self.label_emb(y)[:, None].to(h.dtype))
        h = torch.cat([*toks, h], dim=1) + self.pos_embed

        hidden = None
        k = 0  # blocks done, 1-based index of the last one
        skips = []
        for blk in self.in_blocks:
            h = blk(h)
            skips.append(h)
            k += 1
            if k == hidden_block:
                hidden = h[:, self.extras:]
        h = self.mid_block(h)
        k += 1
        if k == hidden_block:
            hidden = h[:, self.extras:]
        for blk in self.out_blocks:
            h = blk(h, skips.pop())
            k += 1
            if k == hidden_block:
                hidden = h[:, self.extras:]

        h = self.decoder_pred(self.norm(h))[:, self.extras:]
        out = self.final_layer(unpatchify(h, self.patch, self.in_channels, self.token_grid))
        return out if hidden_block is None else (out, hidden)


# --------------------------------------------------------------------------------------------
# SiT (DiT network)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    """DiT's: sinusoid (256 frequencies) of time_scale*t -> Linear-SiLU-Linear (timm has none)."""

    def __init__(self, width: int, freq_dim: int = SIT_FREQ_DIM, time_scale: float = TIME_SCALE):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_scale = float(time_scale)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t * self.time_scale, self.freq_dim))


class LabelEmbedder(nn.Module):
    """Label table with one extra row, the null label (DiT's, without its own label dropout:
    the trainer drops labels by passing `null_label`)."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, width)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class DiTBlock(nn.Module):
    """adaLN-Zero block: shift/scale/gate of attention and MLP from SiLU-Linear(c) (not in timm)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio),
                       act_layer=partial(nn.GELU, approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(_modulate(self.norm1(x), sh1, sc1))
        return x + g2[:, None] * self.mlp(_modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    """DiT's head: adaLN (shift, scale) then Linear to patch*patch*C."""

    def __init__(self, width: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class SiT(_Net):
    """SiT / DiT network; see the module docstring. `depth` blocks."""

    def __init__(self, *, in_channels: int, input_size: int, patch: int, width: int, depth: int,
                 heads: int, mlp_ratio: float = 4.0, num_classes: int = 0, name: str = "SiT",
                 time_scale: float = TIME_SCALE):
        super().__init__()
        if depth < 1:
            raise SpecmatchError(f"{name}: depth must be >= 1, got {depth}")
        self._setup(name=name, in_channels=in_channels, input_size=input_size, patch=patch,
                    width=width, heads=heads, num_classes=num_classes, n_blocks=depth,
                    time_scale=time_scale)
        self.x_embedder = _patch_embed(in_channels, width, patch, input_size)
        self.t_embedder = TimestepEmbedder(width, time_scale=time_scale)
        if num_classes > 0:
            self.y_embedder = LabelEmbedder(num_classes, width)
        # Fixed, so a buffer (not trained, not weight-decayed); persistent for DiT checkpoints.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(width, self.token_grid[0])[None])
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(width, patch, in_channels)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.num_classes > 0:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        fl = self.final_layer
        for lin in (fl.adaLN_modulation[-1], fl.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                hidden_block: int | None = None):
        self._check(x, t, y, hidden_block)
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t)
        if self.num_classes > 0:
            c = c + self.y_embedder(y)
        hidden = None
        for k, blk in enumerate(self.blocks, start=1):
            h = blk(h, c)
            if k == hidden_block:
                hidden = h
        out = unpatchify(self.final_layer(h, c), self.patch, self.in_channels, self.token_grid)
        return out if hidden_block is None else (out, hidden)
