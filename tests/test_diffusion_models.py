"""The diffusion networks (U-ViT, SiT) and their registry: sizes pinned to published parameter
counts, DiT's adaLN-Zero init, the forward interface the trainer / samplers / REPA rely on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specmatch.diffusion.models import (
    NETS,
    Attention,
    build,
    count_parameters,
    parse_name,
    patchify,
    sincos_pos_embed_2d,
    timestep_embedding,
    unpatchify,
)
from specmatch.errors import SpecmatchError

TINY = ("UViT-tiny", "SiT-tiny")


def _tiny(family: str, patch: int = 2, num_classes: int = 0, in_channels: int = 4, size: int = 8):
    torch.manual_seed(0)
    return build(f"{family}/{patch}", in_channels=in_channels, input_size=size,
                 num_classes=num_classes)


@torch.no_grad()
def _perturb(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Move every parameter off its init, so zero-inits (adaLN-Zero, final layer) block nothing."""
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def _inputs(model, batch: int = 3, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g) if model.num_classes else None
    return x, t, y


# ---------------------------------------------------------------------------------------------
# Sizes against published figures


def test_sit_parameter_counts_match_dit_published_figures():
    # DiT's published counts (Peebles & Xie, Table 4 / repo) are for in 4, 32x32 latents, 1000
    # classes (+1 null row), learn_sigma=True (8 output channels), and count the fixed pos_embed
    # (a frozen nn.Parameter there). Ours: 4 output channels and pos_embed is a buffer, so
    #   expected = published - N*D (pos_embed, N = 16*16 tokens) - D*p*p*4 - p*p*4 (final linear)
    # DiT-XL/2 (D=1152): 675.13M - 256*1152 - (1152*16 + 16) = 675.13M - 294,912 - 18,448
    # DiT-B/2  (D=768):  130.51M - 256*768  - (768*16 + 16)  = 130.51M - 196,608 - 12,304
    # The published figures are rounded to 10k, hence the +-5k tolerance.
    cases = {"SiT-XL/2": (675.13e6, 1152), "SiT-B/2": (130.51e6, 768)}
    with torch.device("meta"):
        for name, (published, d) in cases.items():
            model = build(name, in_channels=4, input_size=32, num_classes=1000)
            expected = published - 256 * d - (d * 16 + 16)
            assert abs(count_parameters(model) - expected) <= 5_000, (name, count_parameters(model))


def test_uvit_parameter_counts_match_paper():
    # U-ViT paper, Table 1: U-ViT-S (13 layers, width 512, 8 heads) 44M, U-ViT-M (17 layers, 768)
    # 131M. The transformer body dominates (13 blocks of 12*D^2 + 10*D plus 6 skip linears of
    # 2*D^2 + D = 44.11M for S), so the input-specific parts (here f8d4 latents, patch 2) change
    # the count by well under 1%.
    with torch.device("meta"):
        s = build("UViT-S/2", in_channels=4, input_size=32)
        m = build("UViT-M/2", in_channels=4, input_size=32)
    assert s.n_blocks == 13 and m.n_blocks == 17
    assert abs(count_parameters(s) - 44e6) / 44e6 < 0.01
    assert abs(count_parameters(m) - 131e6) / 131e6 < 0.01
    # Exact count of U-ViT's reference layout (no qkv bias, bare sinusoid time token, conv head),
    # D = 512, C = 4, p = 2, N = 256 patch tokens + 1 time token:
    #   13 blocks * (LN 2*2D + qkv 3D^2 + proj D^2+D + fc1 4D^2+4D + fc2 4D^2+D = 12D^2+10D)
    #     = 13 * 3,150,848 = 40,961,024
    #   6 skip linears * (2D^2 + D) = 3,148,800;  patch embed p^2*C*D + D = 8,704
    #   pos_embed 257*D = 131,584;  final LN 2D = 1,024;  decoder D*p^2*C + p^2*C = 8,208
    #   3x3 conv 9*C^2 + C = 148                              total = 44,259,492
    assert count_parameters(s) == 44_259_492
    # U-ViT-L 287M and U-ViT-H 501M (U-ViT paper, Table 1), as its released ImageNet 256 models
    # (4x32x32 latents, patch 2, 1000 classes and the null label)
    with torch.device("meta"):
        big = {n: build(f"{n}/2", in_channels=4, input_size=32, num_classes=1000) for n in ("UViT-L", "UViT-H")}
    assert big["UViT-L"].n_blocks == 21 and round(count_parameters(big["UViT-L"]) / 1e6) == 287
    assert big["UViT-H"].n_blocks == 29 and round(count_parameters(big["UViT-H"]) / 1e6) == 501


def test_registry_entries_and_attributes():
    for size, cfg in NETS.items():
        with torch.device("meta"):
            model = build(f"{size}/2", in_channels=4, input_size=16, num_classes=10)
        assert model.name == f"{size}/2"
        assert model.hidden_dim == cfg.width
        assert model.token_grid == (8, 8)
        assert model.n_blocks == (cfg.depth + 1 if cfg.family == "uvit" else cfg.depth)
        assert (model.num_classes, model.null_label, model.patch) == (10, 10, 2)
        assert (model.in_channels, model.input_size) == (4, 16)
    assert parse_name("SiT-B/2") == (NETS["SiT-B"], 2)
    assert parse_name("UViT-S/1") == (NETS["UViT-S"], 1)


# ---------------------------------------------------------------------------------------------
# Init, shapes, interface


def test_fresh_sit_outputs_exactly_zero():
    model = _tiny("SiT-tiny", num_classes=5)
    x, t, y = _inputs(model)
    with torch.no_grad():
        out = model(x, t, y)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("family", TINY)
@pytest.mark.parametrize("patch", [1, 2])
@pytest.mark.parametrize("num_classes", [0, 7])
def test_shapes_and_hidden_tokens(family, patch, num_classes):
    model = _tiny(family, patch=patch, num_classes=num_classes)
    x, t, y = _inputs(model)
    n = (8 // patch) ** 2
    with torch.no_grad():
        out = model(x, t, y)
        out2, hidden = model(x, t, y, hidden_block=model.n_blocks // 2 + 1)
    assert out.shape == x.shape
    assert hidden.shape == (3, n, model.hidden_dim)
    torch.testing.assert_close(out2, out)
    for bad in (0, model.n_blocks + 1):
        with pytest.raises(SpecmatchError, match="hidden_block"):
            model(x, t, y, hidden_block=bad)


@pytest.mark.parametrize("family", TINY)
def test_hidden_is_the_output_of_that_block(family):
    # hidden_block k = the patch tokens right after the k-th block in forward order: replace
    # every block from k+1 on by a spy and compare with what it received.
    model = _perturb(_tiny(family, num_classes=3))
    x, t, y = _inputs(model)
    blocks = (list(model.in_blocks) + [model.mid_block] + list(model.out_blocks)
              if family == "UViT-tiny" else list(model.blocks))
    assert len(blocks) == model.n_blocks
    seen = {}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o))
               for i, b in enumerate(blocks, start=1)]
    with torch.no_grad():
        for k in (1, model.n_blocks):
            _, hidden = model(x, t, y, hidden_block=k)
            extras = model.extras if family == "UViT-tiny" else 0
            torch.testing.assert_close(hidden, seen[k][:, extras:])
    for h in handles:
        h.remove()


@pytest.mark.parametrize("family", TINY)
def test_batch_independent_and_channels_last(family):
    # No cross-sample mixing (a wrong reshape in (un)patchify or attention would mix the batch),
    # and a channels-last input gives the same numbers.
    model = _perturb(_tiny(family, num_classes=4)).eval()
    x, t, y = _inputs(model, batch=4)
    with torch.no_grad():
        full = model(x, t, y)
        one = model(x[2:3], t[2:3], y[2:3])
        cl = model(x.contiguous(memory_format=torch.channels_last), t, y)
    torch.testing.assert_close(one, full[2:3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cl, full, rtol=1e-4, atol=1e-5)


def test_sit_patches_go_back_where_they_came_from():
    # With the adaLN gates at zero (fresh SiT), every token passes the blocks unchanged, so the
    # output patch (i, j) is a function of the input patch (i, j) only. Give the final layer
    # weights and change one input patch: exactly that output patch must move. A transposed or
    # mis-ordered unpatchify (or patch embedding) puts the change elsewhere.
    model = _tiny("SiT-tiny", patch=2, num_classes=0, size=8)
    torch.nn.init.normal_(model.final_layer.linear.weight)
    x, t, _ = _inputs(model, batch=1)
    x2 = x.clone()
    x2[:, :, 2:4, 4:6] += 1.0  # patch (row 1, col 2)
    with torch.no_grad():
        diff = (model(x2, t) - model(x, t)).abs().sum(dim=(0, 1))
    moved = diff > 1e-6
    expect = torch.zeros(8, 8, dtype=torch.bool)
    expect[2:4, 4:6] = True
    assert torch.equal(moved, expect)


def test_patchify_roundtrip_and_layout():
    x = torch.randn(2, 3, 8, 12)
    tok = patchify(x, 4)
    assert tok.shape == (2, 6, 48)
    # token 4 = row 1, col 1; feature (p, q, c) = (1, 2, 0) -> index (1*4 + 2)*3 + 0
    assert tok[1, 4, (1 * 4 + 2) * 3] == x[1, 0, 4 + 1, 4 + 2]
    torch.testing.assert_close(unpatchify(tok, 4, 3, (2, 3)), x)


def test_sincos_pos_embed_matches_dit_formula():
    # DiT's get_2d_sincos_pos_embed (numpy, MAE): meshgrid(w, h) -> first half from the column
    # coordinate, second half from the row; each half [sin, cos] with omega = 1/10000^(k/(D/4)).
    d, g = 16, 4

    def one(pos):
        omega = 1.0 / 10000 ** (np.arange(d // 4, dtype=np.float64) / (d / 4.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32))
    ref = np.concatenate([one(grid[0]), one(grid[1])], axis=1)
    torch.testing.assert_close(sincos_pos_embed_2d(d, g), torch.from_numpy(ref).float())


# ---------------------------------------------------------------------------------------------
# The inputs are used


@pytest.mark.parametrize("family", TINY)
def test_class_label_and_null_label(family):
    model = _perturb(_tiny(family, num_classes=5)).eval()
    x, t, _ = _inputs(model, batch=2)
    with torch.no_grad():
        a = model(x, t, torch.tensor([0, 0]))
        b = model(x, t, torch.tensor([1, 1]))
        null = model(x, t, torch.full((2,), model.null_label))
    assert (a - b).abs().max() > 1e-3
    assert torch.isfinite(null).all() and (null - a).abs().max() > 1e-3
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, t)
    # An unconditional model ignores y.
    unc = _perturb(_tiny(family, num_classes=0)).eval()
    with torch.no_grad():
        torch.testing.assert_close(unc(x, t), unc(x, t, torch.tensor([3, 1])))


@pytest.mark.parametrize("family", TINY)
def test_output_depends_on_t(family):
    model = _perturb(_tiny(family)).eval()
    x, _, _ = _inputs(model, batch=2)
    with torch.no_grad():
        a = model(x, torch.full((2,), 0.2))
        b = model(x, torch.full((2,), 0.7))
        c = model(x, torch.full((2,), 0.2005))  # 1000*t: steps half a DDPM step apart differ
    assert (a - b).abs().max() > 1e-3
    assert (a - c).abs().max() > 1e-5


def test_uvit_long_skips_are_used():
    model = _perturb(_tiny("UViT-tiny")).eval()
    assert model.n_blocks == NETS["UViT-tiny"].depth + 1 == 5
    assert len(model.in_blocks) == len(model.out_blocks) == 2
    x, t, _ = _inputs(model, batch=2)
    # Out-block i receives the output of in-block (n_in - 1 - i) as its skip (U-Net order).
    outs, skips = {}, {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o))
             for i, b in enumerate(model.in_blocks)]
    hooks += [b.register_forward_pre_hook(lambda m, a, i=i: skips.__setitem__(i, a[1]))
              for i, b in enumerate(model.out_blocks)]
    with torch.no_grad():
        ref = model(x, t)
        for h in hooks:
            h.remove()
        assert torch.equal(skips[0], outs[1]) and torch.equal(skips[1], outs[0])
        d = model.hidden_dim
        model.out_blocks[0].skip_linear.weight[:, d:] = 0.0  # drop the skip half
        cut = model(x, t)
    assert (ref - cut).abs().max() > 1e-3


def test_time_is_embedded_as_1000_t():
    # Both families embed the DDPM-style step 1000*t by default; an imported checkpoint keeps its
    # own scale (SiT and REPA: t itself, U-ViT's continuous models: 999 t; diffusion.import_model).
    t = torch.tensor([0.0, 0.25, 1.0])
    sit = _tiny("SiT-tiny")
    ref = sit.t_embedder.mlp(timestep_embedding(1000 * t, 256))
    torch.testing.assert_close(sit.t_embedder(t), ref)
    torch.manual_seed(0)
    one = build("SiT-tiny/2", in_channels=4, input_size=8, time_scale=1.0)
    torch.testing.assert_close(one.t_embedder(t), one.t_embedder.mlp(timestep_embedding(t, 256)))
    assert one.time_scale == 1.0 and sit.time_scale == 1000.0
    with pytest.raises(SpecmatchError, match="time_scale"):
        build("SiT-tiny/2", in_channels=4, input_size=8, time_scale=0.0)
    uvit = _perturb(_tiny("UViT-tiny")).eval()
    x, _, _ = _inputs(uvit)
    seen = {}
    hook = uvit.in_blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__(0, a[0]))
    with torch.no_grad():
        uvit(x, t)
    hook.remove()
    time_token = seen[0][:, 0] - uvit.pos_embed[0, 0]
    torch.testing.assert_close(time_token, timestep_embedding(1000 * t, uvit.hidden_dim))


def test_attention_matches_torch_multihead_attention():
    # Independent reference for the head split / merge: nn.MultiheadAttention with our weights.
    torch.manual_seed(0)
    attn = Attention(32, 4, qkv_bias=True)
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        attn.qkv.bias.normal_()
        ref.in_proj_weight.copy_(attn.qkv.weight)
        ref.in_proj_bias.copy_(attn.qkv.bias)
        ref.out_proj.weight.copy_(attn.proj.weight)
        ref.out_proj.bias.copy_(attn.proj.bias)
        x = torch.randn(3, 10, 32)
        torch.testing.assert_close(attn(x), ref(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("family", TINY)
def test_gradient_reaches_every_parameter(family):
    model = _perturb(_tiny(family, num_classes=3))
    x, t, y = _inputs(model, batch=2)
    y = torch.tensor([0, model.null_label])  # both label rows used
    model(x, t, y).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not dead, dead


@pytest.mark.parametrize("family", TINY)
def test_bf16_autocast_close_to_float32(family):
    model = _perturb(_tiny(family, num_classes=3), std=0.02).eval()
    x, t, y = _inputs(model, batch=2)
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, y)
    assert torch.isfinite(low).all()
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.05, float(rel)


# ---------------------------------------------------------------------------------------------
# Errors


def test_errors_name_the_problem():
    with pytest.raises(SpecmatchError, match="SiT-B/p"):
        parse_name("SiT-Q/2")
    with pytest.raises(SpecmatchError, match="unknown"):
        parse_name("SiT-B")
    with pytest.raises(SpecmatchError, match="patch"):
        parse_name("SiT-B/3")
    with pytest.raises(SpecmatchError, match="patch"):
        parse_name("UViT-S/x")
    with pytest.raises(SpecmatchError, match=r"SiT-tiny/4.*10.*4"):
        build("SiT-tiny/4", in_channels=4, input_size=10)
    # A token of 4^2 x 16 = 256 values into a width of 128 (it did not learn at all): refused, with the patch that fits.
    with pytest.raises(SpecmatchError, match=r"'UViT-tiny/4' on 16-channel latents.*= 256 values.*width 128.*\(/2\)"):
        build("UViT-tiny/4", in_channels=16, input_size=16)
    assert build("UViT-tiny/2", in_channels=16, input_size=16).patch_embed.proj.in_channels == 16
    model = _tiny("UViT-tiny")
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(1, 4, 16, 16), torch.rand(1))
