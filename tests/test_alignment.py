"""Representation alignment (REPA / iREPA / DoG-REPA, docs/method.md §7): the DINOv2 loader against an
independent functional forward, the objectives against numpy, the target cache against the
encoder run on the (mirrored) images, and the diffusion trainer's alignment branch.

Everything runs on the micro dataset of conftest (32 px, 24 train images, 48 latent entries of
4x16x16) with EfficientNet-Lite0's stride-8 map (40 channels) as the target encoder, and a
random small ViT in DINOv2's official checkpoint layout for the DINOv2 path.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from specmatch import spectral
from specmatch.alignment import encoders, objectives, targets
from specmatch.autoencoder.latents import read_manifest as read_latent_manifest
from specmatch.data.prepare import prepare
from specmatch.data.reader import SplitReader
from specmatch.diffusion import artifact, train
from specmatch.errors import SpecmatchError
from specmatch.runtime import checkpoint
from specmatch.runtime.training import batch_indices

from conftest import assert_bitwise, weights

ENC = "efficientnet-lite0-s8"
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# =========================================================================== DINOv2

D, DEPTH, HEADS, PATCH, MLP = 64, 2, 4, 14, 256


def dinov2_state(m: int = 37, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of a small ViT in the key layout of `dinov2_vit*_pretrain.pth`."""
    g = _gen(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    s = {"cls_token": rnd(1, 1, D, scale=0.5), "pos_embed": rnd(1, 1 + m * m, D, scale=0.5),
         "mask_token": rnd(1, D),
         "patch_embed.proj.weight": rnd(D, 3, PATCH, PATCH, scale=(3 * PATCH * PATCH) ** -0.5),
         "patch_embed.proj.bias": rnd(D, scale=0.1)}
    for i in range(DEPTH):
        p = f"blocks.{i}."
        s.update({p + "norm1.weight": 1 + rnd(D, scale=0.2), p + "norm1.bias": rnd(D, scale=0.1),
                  p + "attn.qkv.weight": rnd(3 * D, D, scale=D ** -0.5 * 2), p + "attn.qkv.bias": rnd(3 * D, scale=0.1),
                  p + "attn.proj.weight": rnd(D, D, scale=D ** -0.5), p + "attn.proj.bias": rnd(D, scale=0.1),
                  p + "ls1.gamma": 0.2 + torch.rand(D, generator=g),
                  p + "norm2.weight": 1 + rnd(D, scale=0.2), p + "norm2.bias": rnd(D, scale=0.1),
                  p + "mlp.fc1.weight": rnd(MLP, D, scale=D ** -0.5), p + "mlp.fc1.bias": rnd(MLP, scale=0.1),
                  p + "mlp.fc2.weight": rnd(D, MLP, scale=MLP ** -0.5), p + "mlp.fc2.bias": rnd(D, scale=0.1),
                  p + "ls2.gamma": 0.2 + torch.rand(D, generator=g)})
    s.update({"norm.weight": 1 + rnd(D, scale=0.2), "norm.bias": rnd(D, scale=0.1)})
    return s


def ref_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """DINOv2's `interpolate_pos_encoding` (hub models: interpolate_offset 0.1, no antialias)."""
    m = int(math.isqrt(pos.shape[1] - 1))
    if m == grid:
        return pos
    patch = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    sx = (grid + 0.1) / m
    patch = F.interpolate(patch, scale_factor=(sx, sx), mode="bicubic", antialias=False)
    assert patch.shape[-2:] == (grid, grid)
    return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def ref_dinov2(state: dict[str, torch.Tensor], x: torch.Tensor, heads: int = HEADS) -> torch.Tensor:
    """`x_norm_patchtokens` of DINOv2 written with torch.nn.functional only, in float64."""
    w = {k: v.double() for k, v in state.items()}
    x = x.double()
    n = x.shape[0]
    h = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=PATCH)
    grid = h.shape[-1]
    h = h.flatten(2).transpose(1, 2)
    h = torch.cat([w["cls_token"].expand(n, -1, -1), h], dim=1) + ref_pos_embed(w["pos_embed"], grid)
    t, d = h.shape[1], h.shape[2]
    hd = d // heads
    depth = len({k.split(".")[1] for k in w if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        y = F.layer_norm(h, (d,), w[p + "norm1.weight"], w[p + "norm1.bias"], eps=1e-6)
        qkv = F.linear(y, w[p + "attn.qkv.weight"], w[p + "attn.qkv.bias"]).reshape(n, t, 3, heads, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * hd ** -0.5).softmax(dim=-1)
        o = (a @ v).transpose(1, 2).reshape(n, t, d)
        h = h + w[p + "ls1.gamma"] * F.linear(o, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
        y = F.layer_norm(h, (d,), w[p + "norm2.weight"], w[p + "norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])),
                     w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
        h = h + w[p + "ls2.gamma"] * y
    h = F.layer_norm(h, (d,), w["norm.weight"], w["norm.bias"], eps=1e-6)
    return h[:, 1:]


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory):
    state = dinov2_state()
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_tiny_pretrain.pth"
    torch.save(state, path)
    return state, path


def test_resample_pos_embed_is_dinov2s_runtime_interpolation():
    pos = dinov2_state()["pos_embed"]
    got = encoders.resample_dinov2_pos_embed(pos, 16)
    assert got.shape == (1, 1 + 256, D)
    torch.testing.assert_close(got, ref_pos_embed(pos, 16), rtol=0, atol=1e-6)
    # The test can tell: resampling to the size (not DINOv2's scale factor) gives another table.
    naive = F.interpolate(pos[:, 1:].reshape(1, 37, 37, D).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic")
    assert (naive.permute(0, 2, 3, 1).reshape(1, 256, D) - got[:, 1:]).abs().max() > 1e-2
    assert torch.equal(got[:, :1], pos[:, :1])  # the class token's entry is kept
    assert encoders.resample_dinov2_pos_embed(pos, 37) is pos  # DINOv2 returns the table as is


def shrink_stream(state: dict[str, torch.Tensor], f: float) -> dict[str, torch.Tensor]:
    """Scale the embeddings and layer scales by f: a residual stream of small variance, where
    LayerNorm's eps (DINOv2: 1e-6, torch's default: 1e-5) makes a visible difference."""
    out = dict(state)
    for k in out:
        if k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias") or k.endswith("gamma"):
            out[k] = out[k] * f
    return out


@pytest.mark.parametrize("m,image_size,f", [(37, 224, 1.0), (16, 224, 1.0), (37, 112, 1.0), (37, 224, 0.1)])
def test_build_dinov2_matches_functional_reference(m, image_size, f):
    state = shrink_stream(dinov2_state(m=m, seed=m), f)
    net = encoders.build_dinov2(dict(state), image_size=image_size, heads=HEADS).eval()
    for seed in (1, 2):
        x = torch.randn(2, 3, image_size, image_size, generator=_gen(seed))
        with torch.no_grad():
            got = net.forward_features(x)[:, 1:]
        want = ref_dinov2(state, x)
        assert got.shape == want.shape == (2, (image_size // PATCH) ** 2, D)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)


def test_dinov2_encoder_resizes_bicubic_and_normalises_imagenet(dino_file):
    state, path = dino_file
    module = encoders._DINOv2(path, 224, HEADS).eval()
    x01 = torch.rand(2, 3, 32, 32, generator=_gen(3))
    with torch.no_grad():
        got = module(x01)
    xr = F.interpolate(x01, size=(224, 224), mode="bicubic", align_corners=False)
    want = ref_dinov2(state, (xr - IMAGENET_MEAN) / IMAGENET_STD)
    want = want.transpose(1, 2).reshape(2, D, 16, 16)  # token n = row n // 16, column n % 16
    assert got.shape == (2, D, 16, 16)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)


def test_dinov2_target_encoder_on_uint8_images(dino_file, monkeypatch):
    """The registry's full path (build -> TargetEncoder) for a DINOv2 entry: uint8 (N, H, W, 3)
    images -> /255 -> bicubic 224 -> ImageNet normalisation -> patch tokens as a 16x16 grid."""
    state, path = dino_file
    monkeypatch.setitem(encoders.REGISTRY, "dinov2-test", encoders.EncoderSpec(
        "dinov2-test", "dinov2", "dinov2-vitb14", 224, 14, D, heads=HEADS))
    enc = encoders.build("dinov2-test", path)
    assert enc.grid == 16 and enc.dim == D and not any(p.requires_grad for p in enc.parameters())
    images = torch.randint(0, 256, (2, 40, 40, 3), dtype=torch.uint8, generator=_gen(4))
    got = enc(images)
    x01 = images.permute(0, 3, 1, 2).double() / 255.0
    xr = F.interpolate(x01, size=(224, 224), mode="bicubic", align_corners=False)
    want = ref_dinov2(state, (xr - IMAGENET_MEAN.double()) / IMAGENET_STD.double()).transpose(1, 2).reshape(2, D, 16, 16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)
    assert enc.describe()["weights_file"] == path.name
    with pytest.raises(SpecmatchError, match="uint8"):
        enc(images.float())


def test_dinov2_checkpoint_with_missing_or_extra_key_is_refused(tmp_path):
    state = dinov2_state()
    missing = dict(state)
    del missing["blocks.1.attn.proj.bias"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(SpecmatchError, match=r"blocks\.1\.attn\.proj\.bias"):
        encoders._DINOv2(tmp_path / "missing.pth", 224, HEADS)
    extra = {**state, "blocks.0.attn.q_norm.weight": torch.ones(D)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(SpecmatchError, match=r"blocks\.0\.attn\.q_norm\.weight"):
        encoders._DINOv2(tmp_path / "extra.pth", 224, HEADS)
    with pytest.raises(SpecmatchError, match="cls_token"):
        encoders.build_dinov2({k: v for k, v in state.items() if k != "cls_token"}, 224, HEADS)
    with pytest.raises(SpecmatchError, match="multiple of the patch size"):
        encoders.build_dinov2(dict(state), 100, HEADS)


def test_registry_grids_and_bad_names():
    assert encoders.grid_of("dinov2-vitb14") == 16
    assert encoders.grid_of(ENC) == 8 and encoders.grid_of(ENC, 32) == 4
    assert encoders.grid_of("efficientnet-lite0") == 8 and encoders.grid_of("efficientnet-lite0-s16") == 8
    with pytest.raises(SpecmatchError, match="unknown target encoder"):
        encoders.spec("resnet-50")
    with pytest.raises(SpecmatchError, match="multiple of its stride"):
        encoders.grid_of(ENC, 60)


def test_effnet_stride8_map_is_the_last_block_at_stride_8():
    """Reference: the package's own full forward (`extract_features`), hooked after every block;
    the stride-8 target is the output of the last block whose map is image/8 (40 channels)."""
    enc = encoders.load(ENC, 64)
    net = enc.module.net
    outs = []
    hooks = [b.register_forward_hook(lambda mod, i, o: outs.append(o)) for b in net._blocks]
    images = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8, generator=_gen(5))
    x = F.interpolate(images.permute(0, 3, 1, 2).float() / 255.0, size=(64, 64), mode="bicubic", align_corners=False)
    try:
        with torch.no_grad():
            net.extract_features((x - 0.5) / 0.5)
    finally:
        for h in hooks:
            h.remove()
    at8 = [o for o in outs if o.shape[-1] == 64 // 8]
    assert at8 and at8[-1].shape[1] == 40
    got = enc(images)
    assert got.shape == (3, 40, 8, 8)
    torch.testing.assert_close(got, at8[-1].float().contiguous(), rtol=1e-4, atol=1e-4)


# =========================================================================== objectives


def test_spatial_normalize_against_numpy():
    y = torch.randn(3, 5, 6, 7, generator=_gen(0)) * 3 + 2
    z = objectives.spatial_normalize(y)
    zn = z.double().numpy()
    np.testing.assert_allclose(zn.mean(axis=(-2, -1)), 0.0, atol=1e-5)
    np.testing.assert_allclose(zn.std(axis=(-2, -1)), 1.0, atol=1e-5)  # population std
    yn = y.double().numpy()
    mean, std = yn.mean(axis=(-2, -1), keepdims=True), yn.std(axis=(-2, -1), keepdims=True)
    np.testing.assert_allclose(zn, (yn - mean) / std, atol=1e-4)
    np.testing.assert_allclose(objectives.spatial_normalize(y, gamma=0.0).numpy(), yn / std, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(objectives.spatial_normalize(y, gamma=0.5).numpy(), (yn - 0.5 * mean) / std,
                               rtol=1e-4, atol=1e-5)


def np_bilinear(y: np.ndarray, out: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (align_corners=False), edges clamped."""
    h = y.shape[-1]
    src = (np.arange(out) + 0.5) * h / out - 0.5
    src = np.clip(src, 0, None)
    i0 = np.minimum(np.floor(src).astype(int), h - 1)
    i1 = np.minimum(i0 + 1, h - 1)
    f = src - i0
    rows = y[..., i0, :] * (1 - f)[:, None] + y[..., i1, :] * f[:, None]
    return rows[..., i0] * (1 - f) + rows[..., i1] * f


def test_resize_grid_identity_area_bilinear():
    y = torch.randn(2, 3, 8, 8, generator=_gen(1))
    assert torch.equal(objectives.resize_grid(y, 8), y)
    yn = y.double().numpy()
    blocks = yn.reshape(2, 3, 4, 2, 4, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(objectives.resize_grid(y, 4).numpy(), blocks, atol=1e-6)
    small = torch.randn(2, 3, 4, 4, generator=_gen(2))
    np.testing.assert_allclose(objectives.resize_grid(small, 8).numpy(), np_bilinear(small.double().numpy(), 8),
                               atol=1e-6)
    np.testing.assert_allclose(objectives.resize_grid(small, 6).numpy(), np_bilinear(small.double().numpy(), 6),
                               atol=1e-6)


def test_transform_kinds():
    y = torch.randn(2, 4, 8, 8, generator=_gen(3)) + 1.0
    assert torch.equal(objectives.transform(y, "repa", {}), y)
    torch.testing.assert_close(objectives.transform(y, "irepa", {"irepa_gamma": 0.25}),
                               objectives.spatial_normalize(y, 0.25))
    # DoG: the spectral module's filter (tested against scipy there) with the given / default sigmas.
    torch.testing.assert_close(objectives.transform(y, "dog", {"dog": {"sigma1": 0.5, "sigma2": 1.5}}),
                               spectral.dog_filter(y, 0.5, 1.5))
    torch.testing.assert_close(objectives.transform(y, "dog", {}), spectral.dog_filter(y, 0.8, 2.0))
    for bad in ("none", "cka"):
        with pytest.raises(SpecmatchError, match="alignment kind"):
            objectives.transform(y, bad, {})


def np_neg_mean_cos(pred: np.ndarray, target: np.ndarray) -> float:
    b, d, h, w = target.shape
    total = 0.0
    for i in range(b):
        for n in range(h * w):
            t = target[i, :, n // w, n % w]
            p = pred[i, n]
            total += p @ t / (np.linalg.norm(p) * np.linalg.norm(t))
    return -total / (b * h * w)


def test_alignment_loss():
    target = torch.randn(2, 5, 3, 4, generator=_gen(4))
    tokens = target.flatten(2).transpose(1, 2)  # (B, N, D), row-major
    assert objectives.alignment_loss(tokens, target).item() == pytest.approx(-1.0, abs=1e-6)
    assert objectives.alignment_loss(-tokens, target).item() == pytest.approx(1.0, abs=1e-6)
    assert objectives.alignment_loss(tokens * 7.0, target).item() == pytest.approx(-1.0, abs=1e-6)
    pred = torch.randn(2, 12, 5, generator=_gen(5))
    want = np_neg_mean_cos(pred.double().numpy(), target.double().numpy())
    assert objectives.alignment_loss(pred, target).item() == pytest.approx(want, abs=1e-6)
    assert objectives.alignment_loss(pred.bfloat16(), target).dtype == torch.float32
    with pytest.raises(SpecmatchError, match="do not match"):
        objectives.alignment_loss(pred[:, :11], target)
    with pytest.raises(SpecmatchError, match="do not match"):
        objectives.alignment_loss(pred[..., :4], target)


def test_mlp_projector_structure():
    proj = objectives.build_projector("mlp", 32, 7, (4, 4), hidden=24)
    layers = list(proj.net)
    assert [type(m) for m in layers] == [torch.nn.Linear, torch.nn.SiLU, torch.nn.Linear, torch.nn.SiLU,
                                         torch.nn.Linear]
    assert [(m.in_features, m.out_features) for m in layers[::2]] == [(32, 24), (24, 24), (24, 7)]
    x = torch.randn(2, 16, 32, generator=_gen(6))
    l1, l2, l3 = layers[::2]
    want = F.linear(F.silu(F.linear(F.silu(F.linear(x, l1.weight, l1.bias)), l2.weight, l2.bias)), l3.weight, l3.bias)
    torch.testing.assert_close(proj(x), want)
    assert objectives.build_projector("mlp", 32, 7, (4, 4)).net[0].out_features == 2048  # REPA's default
    with pytest.raises(SpecmatchError, match="projector"):
        objectives.build_projector("linear", 32, 7, (4, 4))


def test_conv_projector_is_a_3x3_conv_on_the_row_major_grid():
    h, w, c, out = 3, 5, 6, 4  # non-square: a swapped h/w would show
    proj = objectives.build_projector("conv", c, out, (h, w))
    assert proj.conv.weight.shape == (out, c, 3, 3)
    tokens = torch.randn(2, h * w, c, generator=_gen(7))
    grid = torch.zeros(2, c, h, w)
    for n in range(h * w):
        grid[:, :, n // w, n % w] = tokens[:, n]
    want = F.conv2d(grid, proj.conv.weight, proj.conv.bias, padding=1)
    expect = torch.stack([want[:, :, n // w, n % w] for n in range(h * w)], dim=1)
    torch.testing.assert_close(proj(tokens), expect)
    with pytest.raises(SpecmatchError, match="do not form"):
        proj(tokens[:, :14])


def np_bin_counts(h: int, w: int, n_bins: int) -> np.ndarray:
    """Independent count of the DCT cells per radial bin (docs/method.md §2.4)."""
    u, v = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    r = np.sqrt(u ** 2 + v ** 2)
    bins = np.minimum(np.floor(n_bins * r / np.sqrt((h - 1) ** 2 + (w - 1) ** 2)), n_bins - 1).astype(int)
    return np.bincount(bins.ravel(), minlength=n_bins)


@pytest.mark.parametrize("g", [8, 4])
def test_target_spectrum(g):
    y = torch.randn(3, 6, g, g, generator=_gen(8)) + 0.3
    out = objectives.target_spectrum(y, n_bins=16)
    tokens = y.flatten(2).transpose(1, 2)
    torch.testing.assert_close(out["rmsc2"], spectral.rmsc2(tokens))
    counts = np_bin_counts(g, g, 16)
    # 8x8 fills all 16 bins; 4x4 leaves some empty.
    assert (counts == 0).any() == (g == 4)
    assert out["valid"].tolist() == (counts > 0).tolist()
    assert out["energies"].shape == (3, 16)
    assert torch.isfinite(out["energies"][:, out["valid"]]).all()


# =========================================================================== target cache


def _extract(dataset, out, **kw):
    p = {"encoder": ENC, "image_size": 64, "device": "cpu", "batch_size": 7, "shard_size": 10, "dtype": "float32",
         **kw}
    return targets.extract(p, dataset, "t", out)


def _shards(folder, man, keys):
    arrays = {k: [] for k in keys}
    for s in man["shards"]:
        with np.load(Path(folder) / s["file"]) as z:
            for k in keys:
                arrays[k].append(z[k])
    return {k: np.concatenate(v) for k, v in arrays.items()}


@pytest.fixture(scope="module")
def micro(micro_latents):
    return micro_latents


@pytest.fixture(scope="module")
def tcache(micro, tmp_path_factory):
    """A float32 stride-8 target cache (64 px, 8x8 x 40) of the micro dataset, with flips."""
    out = tmp_path_factory.mktemp("targets") / "tg"
    man = _extract(micro[0], out)
    return out, man


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory):
    """The embedded set prepared with another seed: other train images."""
    data = tmp_path_factory.mktemp("other") / "embedded"
    prepare({"source": "embedded", "resolution": 32, "seed": 1, "n_train": 24, "n_test": 8, "shard_size": 10},
            "embedded", data)
    return data


def test_target_cache_entries_are_the_encoder_on_the_mirrored_images(micro, tcache):
    data, _, lat = micro
    out, man = tcache
    reader = SplitReader(data, "train")
    n = len(reader)
    assert n == 24
    assert man["count"] == 2 * n and man["images"] == n and man["hflip"] is True
    assert man["shape"] == [40, 8, 8] and man["grid"] == [8, 8] and man["dtype"] == "float32"
    assert len(man["shards"]) == 5 and [s["count"] for s in man["shards"]] == [10, 10, 10, 10, 8]
    assert json.loads((out / "manifest.json").read_text()) == man
    got = _shards(out, man, ["targets", "index", "flip"])
    assert got["targets"].dtype == np.float32 and got["targets"].shape == (48, 40, 8, 8)
    enc = encoders.load(ENC, 64)
    images, _ = reader.get(np.arange(n))
    want = enc(torch.from_numpy(np.ascontiguousarray(images))).numpy()
    want_flip = enc(torch.from_numpy(np.ascontiguousarray(images[:, :, ::-1]))).numpy()  # mirror: width axis
    np.testing.assert_allclose(got["targets"][:n], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["targets"][n:], want_flip, rtol=1e-4, atol=1e-4)
    assert np.abs(want - want_flip).max() > 0.1  # the mirror is visible to the encoder
    assert got["index"].tolist() == list(range(n)) * 2
    assert got["flip"].tolist() == [False] * n + [True] * n
    # Entry order is the latent cache's.
    lman = read_latent_manifest(lat)
    lat_arrays = _shards(lat, lman, ["index", "flip"])
    assert lat_arrays["index"].tolist() == got["index"].tolist()
    assert lat_arrays["flip"].tolist() == got["flip"].tolist()
    # The reader gives them back by entry, in any order.
    r = targets.TargetReader(out)
    ids = np.array([47, 3, 24, 0])
    np.testing.assert_array_equal(r.targets(ids).numpy(), got["targets"][ids])
    assert (out / "provenance.json").is_file()


def test_target_cache_float16_default(micro, tcache, tmp_path):
    man = targets.extract({"encoder": ENC, "device": "cpu", "batch_size": 16, "shard_size": 100}, micro[0], "t16",
                          tmp_path / "t16")
    assert man["dtype"] == "float16" and man["image_size"] == 64 and len(man["shards"]) == 1
    y16 = _shards(tmp_path / "t16", man, ["targets"])["targets"]
    assert y16.dtype == np.float16
    y32 = _shards(tcache[0], tcache[1], ["targets"])["targets"]
    np.testing.assert_allclose(y16.astype(np.float32), y32, rtol=1e-2, atol=1e-2)
    assert targets.TargetReader(tmp_path / "t16").targets([0]).dtype == torch.float32


def test_target_reader_check_matches(micro, tcache, tmp_path):
    lat = micro[2]
    lman = read_latent_manifest(lat)
    reader = targets.TargetReader(tcache[0])
    reader.check_matches(lman, lat)
    with pytest.raises(SpecmatchError, match="hflip"):
        reader.check_matches({**lman, "hflip": False}, lat)
    with pytest.raises(SpecmatchError, match="dataset_images_sha256"):
        reader.check_matches({**lman, "dataset_images_sha256": "0" * 64}, lat)
    with pytest.raises(SpecmatchError, match="count"):
        reader.check_matches({**lman, "count": 47}, lat)
    with pytest.raises(SpecmatchError, match="not a target cache"):
        targets.TargetReader(tmp_path)
    with pytest.raises(SpecmatchError, match="specmatch.targets/1"):
        targets.TargetReader(lat)


def test_extract_bad_inputs(micro, tmp_path):
    data = micro[0]
    with pytest.raises(SpecmatchError, match="unknown target encoder"):
        _extract(data, tmp_path / "a", encoder="resnet-50")
    with pytest.raises(SpecmatchError, match="multiple of its stride"):
        _extract(data, tmp_path / "b", image_size=60)
    with pytest.raises(SpecmatchError):
        _extract(data, tmp_path / "c", dtype="float64")
    assert list(tmp_path.iterdir()) == []


def test_failed_extraction_leaves_no_output(micro, tmp_path, monkeypatch):
    real = encoders.TargetEncoder.forward
    calls = []

    def failing(self, images):
        calls.append(len(images))
        if len(calls) == 4:  # after the first shard is written
            raise RuntimeError("encoder died")
        return real(self, images)

    monkeypatch.setattr(encoders.TargetEncoder, "forward", failing)
    out = tmp_path / "tg"
    with pytest.raises(RuntimeError, match="encoder died"):
        _extract(micro[0], out)
    assert len(calls) == 4
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no hidden temporary left either


# =========================================================================== trainer


def sit(steps=4, kind="repa", **train_kw):
    return {"autoencoder": "micro", "model": "SiT-tiny/2", "process": {"kind": "linear"}, "conditional": True,
            "train": {"steps": steps, "batch_size": 4, "device": "cpu", "lr": 1e-3, "ema_decay": 0.9,
                      "checkpoint_every": 2, "log_every": 1, "seed": 5, **train_kw},
            "alignment": {"kind": kind, "encoder": ENC, "image_size": 64, "depth": 2, "proj_hidden": 64}}


def _log(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _record_targets(monkeypatch) -> list:
    """The targets the trainer hands to the alignment loss, step by step."""
    seen: list = []
    real = objectives.alignment_loss

    def record(pred, target):
        seen.append(target.detach().clone())
        return real(pred, target)

    monkeypatch.setattr(objectives, "alignment_loss", record)
    return seen


def np_expected_target(kind: str, raw: np.ndarray) -> np.ndarray:
    if kind == "repa":
        return raw
    if kind == "irepa":
        return (raw - raw.mean(axis=(-2, -1), keepdims=True)) / raw.std(axis=(-2, -1), keepdims=True)
    # dog, defaults sigma 0.8 / 2.0, reflect padding (scipy's "mirror"), kernel radius ceil(3 sigma)
    def blur(s):
        return scipy.ndimage.gaussian_filter(raw, s, mode="mirror", radius=math.ceil(3 * s), axes=(-2, -1))

    d = blur(0.8) - blur(2.0)
    return d / d.std(axis=(-2, -1), keepdims=True)


@pytest.mark.parametrize("kind,projector", [("repa", "mlp"), ("irepa", "conv"), ("dog", "mlp")])
def test_training_with_alignment(kind, projector, micro, tcache, tmp_path, monkeypatch):
    lat = micro[2]
    run_dir, out = tmp_path / "run", tmp_path / "out"
    seen = _record_targets(monkeypatch)
    summary = train.train(sit(steps=3, kind=kind), lat, out, "a", run_dir=run_dir, targets=tcache[0])
    log = _log(run_dir)
    assert [r["step"] for r in log] == [1, 2, 3]
    for r in log:
        assert np.isfinite([r["align_loss"], r["diffusion_loss"]]).all() and -1 <= r["align_loss"] <= 1
        assert r["loss"] == pytest.approx(r["diffusion_loss"] + 0.5 * r["align_loss"], rel=1e-5, abs=1e-6)
    # The targets of each step are the transform of the cache entries of that step's batch.
    raw = _shards(tcache[0], tcache[1], ["targets"])["targets"].astype(np.float64)
    assert len(seen) == 3
    for step, y in enumerate(seen):
        idx = batch_indices(48, 4, 5, step)
        np.testing.assert_allclose(y.double().numpy(), np_expected_target(kind, raw[idx]), rtol=1e-4, atol=1e-4)
    # The projector lives in the training checkpoints only.
    ckpts = checkpoint.list_checkpoints(run_dir)
    assert [s for s, _ in ckpts] == [2, 3]
    ck = load_file(ckpts[-1][1] / "model.safetensors")
    proj = {k: v for k, v in ck.items() if k.startswith("proj.")}
    if projector == "conv":
        assert proj.keys() == {"proj.conv.weight", "proj.conv.bias"}
        assert proj["proj.conv.weight"].shape == (40, 128, 3, 3)
    else:
        assert [tuple(proj[f"proj.net.{i}.weight"].shape) for i in (0, 2, 4)] == [(64, 128), (64, 64), (40, 64)]
    w = weights(out)
    assert w and not any(k.startswith("proj.") for k in w)
    net_keys = {k for k in w if k.startswith("net.")}
    assert net_keys and net_keys == {k for k in ck if k.startswith("net.")}
    net, loaded = artifact.load(out)
    for k, v in net.state_dict().items():
        assert torch.equal(v, w["ema." + k])
    a = loaded["alignment"]
    assert a == summary["alignment"]
    assert a["kind"] == kind and a["projector"] == projector and a["encoder"] == ENC and a["depth"] == 2
    assert a["target_grid"] == [8, 8] and a["token_grid"] == [8, 8] and a["resized"] is False
    assert a["target_dim"] == 40 and a["weight"] == 0.5
    # The filter the targets went through is recorded with the model (the report reads it there).
    assert {"dog": a.get("dog"), "irepa": a.get("irepa_gamma"), "repa": None}[kind] == {
        "dog": {"sigma1": 0.8, "sigma2": 2.0}, "irepa": 1.0, "repa": None}[kind]


def test_alignment_loss_falls(micro, tcache, tmp_path):
    params = sit(steps=30, ema_decay=0.0, checkpoint_every=1000)
    train.train(params, micro[2], tmp_path / "out", "a", run_dir=tmp_path / "run", targets=tcache[0])
    align = [r["align_loss"] for r in _log(tmp_path / "run")]
    assert len(align) == 30
    assert np.mean(align[-5:]) < np.mean(align[:5]) - 0.05, align


def test_on_the_fly_targets_equal_cached(micro, tcache, tmp_path, monkeypatch):
    data, _, lat = micro
    seen = _record_targets(monkeypatch)
    params = sit(steps=2, ema_decay=0.0)
    train.train(params, lat, tmp_path / "o1", "a", run_dir=tmp_path / "r1", targets=tcache[0])
    cached = list(seen)
    seen.clear()
    fly = {**params, "alignment": {**params["alignment"], "targets": "on-the-fly"}}
    summary = train.train(fly, lat, tmp_path / "o2", "b", run_dir=tmp_path / "r2", dataset=data)
    assert len(cached) == len(seen) == 2
    for a, b in zip(cached, seen):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert summary["alignment"]["targets"] == "on-the-fly" and summary["alignment"]["image_size"] == 64
    prov = json.loads((tmp_path / "o2" / "provenance.json").read_text())
    assert ENC in json.dumps(prov) and "dataset" in json.dumps(prov)


@pytest.mark.parametrize("kind", ["none", "repa"])
def test_same_seed_same_model_whatever_the_global_rng(kind, micro, tcache, tmp_path):
    """The network and the projector are initialised from train.seed, not from whatever the
    process's global RNG holds when `train` is called (regression: they were once built before
    the process was seeded)."""
    params = sit(steps=1, kind=kind, ema_decay=0.0)
    ws = []
    for i, outer in enumerate((1, 2)):
        torch.manual_seed(outer)  # state left by whatever ran before in this process
        train.train(params, micro[2], tmp_path / f"o{i}", "a", run_dir=tmp_path / f"r{i}", targets=tcache[0])
        ws.append(weights(tmp_path / f"o{i}"))
        if kind != "none":
            ck = load_file(checkpoint.list_checkpoints(tmp_path / f"r{i}")[-1][1] / "model.safetensors")
            ws.append({k: v for k, v in ck.items() if k.startswith("proj.")})
    for a, b in zip(ws[:len(ws) // 2], ws[len(ws) // 2:]):
        assert a
        assert_bitwise(a, b)


def _record_projector_init(monkeypatch) -> list:
    seen: list = []
    real = objectives.build_projector

    def build(*a, **kw):
        proj = real(*a, **kw)
        seen.append({k: v.detach().clone() for k, v in proj.state_dict().items()})
        return proj

    monkeypatch.setattr(objectives, "build_projector", build)
    return seen


# Regression: building the on-the-fly encoder (random layer init, then the weights) once drew from
# the seeded global RNG before the projector was built, so cached and on-the-fly runs of the same
# seed started from different projectors. `encoders.build` now leaves the caller's RNG alone.
def test_on_the_fly_run_starts_like_cached(micro, tcache, tmp_path, monkeypatch):
    data, _, lat = micro
    inits = _record_projector_init(monkeypatch)
    params = sit(steps=1, ema_decay=0.0)
    train.train(params, lat, tmp_path / "o1", "a", run_dir=tmp_path / "r1", targets=tcache[0])
    fly = {**params, "alignment": {**params["alignment"], "targets": "on-the-fly"}}
    train.train(fly, lat, tmp_path / "o2", "b", run_dir=tmp_path / "r2", dataset=data)
    assert len(inits) == 2
    assert_bitwise(inits[0], inits[1])
    a, b = _log(tmp_path / "r1"), _log(tmp_path / "r2")
    np.testing.assert_allclose([r["align_loss"] for r in a], [r["align_loss"] for r in b], rtol=0, atol=1e-5)


def test_small_target_grid_is_resized_and_said(micro, tmp_path, monkeypatch):
    data, _, lat = micro
    seen = _record_targets(monkeypatch)
    params = sit(steps=1, ema_decay=0.0)
    params["alignment"].update(image_size=32, targets="on-the-fly")
    summary = train.train(params, lat, tmp_path / "out", "a", run_dir=tmp_path / "run", dataset=data)
    a = json.loads((tmp_path / "out" / "diffusion.json").read_text())["alignment"]
    assert a == json.loads(json.dumps(summary["alignment"]))
    assert a["target_grid"] == [4, 4] and a["token_grid"] == [8, 8] and a["resized"] is True
    # The 4x4 grid of the batch's images, bilinearly brought to 8x8.
    enc = encoders.load(ENC, 32)
    reader = SplitReader(data, "train")
    idx = batch_indices(48, 4, 5, 0)
    images, _ = reader.get(idx % 24)
    images = np.where((idx >= 24)[:, None, None, None], images[:, :, ::-1], images)
    raw = enc(torch.from_numpy(np.ascontiguousarray(images))).double().numpy()
    assert raw.shape == (4, 40, 4, 4)
    np.testing.assert_allclose(seen[0].double().numpy(), np_bilinear(raw, 8), rtol=1e-4, atol=1e-4)


def test_resume_with_alignment_is_bitwise_identical(micro, tcache, tmp_path):
    lat = micro[2]
    params = sit(steps=4, kind="irepa")
    torch.manual_seed(0)  # the global RNG state before a call must not matter
    train.train(params, lat, tmp_path / "outA", "a", run_dir=tmp_path / "runA", targets=tcache[0])
    torch.manual_seed(1)
    two = sit(steps=2, kind="irepa")
    train.train(two, lat, tmp_path / "outB2", "b", run_dir=tmp_path / "runB", targets=tcache[0])
    torch.manual_seed(123)  # the resumed run must not depend on it
    # The 2-step run stands in for one interrupted at step 2: continued with train.extend (constant schedule).
    extended = {**params, "train": {**params["train"], "extend": True}}
    train.train(extended, lat, tmp_path / "outB", "b", run_dir=tmp_path / "runB", targets=tcache[0])
    assert [r["step"] for r in _log(tmp_path / "runB")] == [1, 2, 3, 4]
    assert_bitwise(weights(tmp_path / "outA"), weights(tmp_path / "outB"))
    ca = load_file(checkpoint.list_checkpoints(tmp_path / "runA")[-1][1] / "model.safetensors")
    cb = load_file(checkpoint.list_checkpoints(tmp_path / "runB")[-1][1] / "model.safetensors")
    assert any(k.startswith("proj.") for k in ca)
    assert_bitwise(ca, cb)  # the projector too
    np.testing.assert_array_equal([r["align_loss"] for r in _log(tmp_path / "runA")],
                                  [r["align_loss"] for r in _log(tmp_path / "runB")])


def test_alignment_bad_inputs(micro, tcache, other_dataset, tmp_path):
    data, _, lat = micro
    r, o = tmp_path / "r", tmp_path / "o"
    with pytest.raises(SpecmatchError, match="--targets"):
        train.train(sit(), lat, o, "a", run_dir=r)
    fly = sit()
    fly["alignment"]["targets"] = "on-the-fly"
    with pytest.raises(SpecmatchError, match="--dataset"):
        train.train(fly, lat, o, "a", run_dir=r)
    with pytest.raises(SpecmatchError, match="not the ones"):
        train.train(fly, lat, o, "a", run_dir=r, dataset=other_dataset)
    deep = sit()
    deep["alignment"]["depth"] = 5  # SiT-tiny has 4 blocks
    with pytest.raises(SpecmatchError, match="depth 5"):
        train.train(deep, lat, o, "a", run_dir=r, targets=tcache[0])
    other_size = sit()
    other_size["alignment"]["image_size"] = 32
    with pytest.raises(SpecmatchError, match="64 px"):
        train.train(other_size, lat, o, "a", run_dir=r, targets=tcache[0])
    # Target caches whose entries are not the latent cache's.
    _extract(data, tmp_path / "noflip", hflip=False, shard_size=100, batch_size=24)
    with pytest.raises(SpecmatchError, match="hflip"):
        train.train(sit(), lat, o, "a", run_dir=r, targets=tmp_path / "noflip")
    _extract(other_dataset, tmp_path / "other", shard_size=100, batch_size=48)
    with pytest.raises(SpecmatchError, match="dataset_images_sha256"):
        train.train(sit(), lat, o, "a", run_dir=r, targets=tmp_path / "other")
    assert not r.exists() and not o.exists()
