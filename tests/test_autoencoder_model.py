"""Tests of the KL autoencoder and PatchGAN discriminator (docs/method.md §5).

References are independent of the code under test:
- parameter counts: the paper's 83.65M (f8d4) and 64.35M (f16d16), and SD kl-f8's well-known
  exact count 83,653,863; the taming PatchGAN's count worked out by hand below;
- the Gaussian KL: `torch.distributions.kl_divergence` of Normals, in float64;
- attention: a float64 softmax(QK^T/sqrt(C))V written out with einsum;
- hinge losses: values computed by hand.
Big models are only built on the meta device (shapes and counts, no compute); everything that
computes runs on the tiny config, so the file stays well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from specmatch.autoencoder import model as ae
from specmatch.autoencoder.discriminator import PatchDiscriminator, generator_adv_loss, hinge_d_loss
from specmatch.errors import SpecmatchError

PAPER_M_PARAMS = {"f8d4": 83.65, "f16d16": 64.35}  # docs/method.md §5 table
SD_KL_F8_PARAMS = 83_653_863  # SD's AutoencoderKL kl-f8 (the same layout as f8d4)
LATENT_AT_256 = {"f8d4": (4, 32, 32), "f16d16": (16, 16, 16), "f32d64": (64, 8, 8)}


def _meta_model(name: str) -> ae.AutoencoderKL:
    with torch.device("meta"):
        return ae.build(name)


@pytest.fixture(scope="module")
def tiny() -> ae.AutoencoderKL:
    torch.manual_seed(0)
    return ae.build("tiny").eval()


# --------------------------------------------------------------------------- configs and shapes


@pytest.mark.parametrize("name", sorted(PAPER_M_PARAMS))
def test_parameter_counts_match_paper(name):
    n = ae.count_parameters(_meta_model(name))
    assert round(n / 1e6, 2) == PAPER_M_PARAMS[name], f"{name}: {n:,} parameters, paper says {PAPER_M_PARAMS[name]}M"


def test_f8d4_is_exactly_sd_kl_f8():
    n = ae.count_parameters(_meta_model("f8d4"))
    assert n == SD_KL_F8_PARAMS, f"f8d4 has {n:,} parameters, SD kl-f8 has {SD_KL_F8_PARAMS:,}"


@pytest.mark.parametrize("name", sorted(LATENT_AT_256))
def test_latent_and_output_shapes_at_256(name):
    m = _meta_model(name)
    assert m.cfg.down_factor == 256 // LATENT_AT_256[name][-1]
    x = torch.empty(2, 3, 256, 256, device="meta")
    post = m.encode(x)
    assert tuple(post.mean.shape) == (2, *LATENT_AT_256[name])
    assert tuple(m.decode(post.mode()).shape) == (2, 3, 256, 256)


def test_configs_are_the_spec_table():
    assert set(ae.CONFIGS) == {"f8d4", "f16d16", "f32d64", "tiny", "pixels"}
    assert ae.CONFIGS["pixels"].identity and ae.CONFIGS["pixels"].down_factor == 1
    assert ae.CONFIGS["f8d4"].channels == (128, 256, 512, 512) and ae.CONFIGS["f8d4"].z_channels == 4
    assert ae.CONFIGS["f16d16"].channels == (128, 128, 256, 256, 512) and ae.CONFIGS["f16d16"].z_channels == 16
    assert ae.CONFIGS["f32d64"].channels == (128, 128, 256, 256, 512, 512) and ae.CONFIGS["f32d64"].z_channels == 64
    t = ae.CONFIGS["tiny"]
    assert t.down_factor == 4 and t.z_channels == 4


def test_block_structure_per_spec():
    m = _meta_model("f16d16")
    nrb, levels = m.cfg.num_res_blocks, len(m.cfg.channels)
    assert [len(lv.block) for lv in m.encoder.down] == [nrb] * levels
    assert [len(lv.block) for lv in m.decoder.up] == [nrb + 1] * levels
    # down-sampling everywhere but the last level, up-sampling everywhere but the first
    assert [hasattr(lv, "downsample") for lv in m.encoder.down] == [True] * (levels - 1) + [False]
    assert [hasattr(lv, "upsample") for lv in m.decoder.up] == [False] + [True] * (levels - 1)
    norms = [mod for mod in m.modules() if isinstance(mod, nn.GroupNorm)]
    assert norms and all(g.eps == 1e-6 and g.num_groups == 32 for g in norms)
    # single attention block in each mid block, none elsewhere
    assert sum(isinstance(mod, ae.AttnBlock) for mod in m.modules()) == 2
    assert m.last_layer is m.decoder.conv_out.weight and tuple(m.last_layer.shape) == (3, 128, 3, 3)
    assert tuple(m.quant_conv.weight.shape) == (32, 32, 1, 1)
    assert tuple(m.post_quant_conv.weight.shape) == (16, 16, 1, 1)


def test_config_lookup_and_errors():
    assert ae.config("f16d16") is ae.CONFIGS["f16d16"]
    c = ae.config({"channels": [16, 32], "z_channels": 2, "norm_groups": 8, "num_res_blocks": 1})
    assert c.channels == (16, 32) and c.down_factor == 2 and c.name == "custom"
    with pytest.raises(SpecmatchError, match=r"'f8d8'.*f16d16.*f32d64.*f8d4.*tiny"):
        ae.config("f8d8")
    with pytest.raises(SpecmatchError, match="z_chanels"):
        ae.config({"channels": [16, 32], "z_chanels": 2})
    with pytest.raises(SpecmatchError, match="norm_groups"):
        ae.config({"channels": [12, 32], "z_channels": 2, "norm_groups": 8})


def test_tiny_round_trip_shapes(tiny):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        post = tiny.encode(x)
        assert tuple(post.mean.shape) == (2, 4, 16, 16) and tuple(post.logvar.shape) == (2, 4, 16, 16)
        assert tuple(tiny.decode(post.sample()).shape) == (2, 3, 64, 64)
        recon, post2 = tiny(x, sample=False)
        assert tuple(recon.shape) == (2, 3, 64, 64)
        # sample=False decodes the mean: deterministic
        assert torch.equal(recon, tiny(x, sample=False)[0])


@pytest.mark.parametrize("hw", [(66, 64), (64, 62), (30, 30)])
def test_non_divisible_size_raises(tiny, hw):
    with pytest.raises(SpecmatchError, match=rf"{hw[0]}x{hw[1]}.*down factor 4"):
        tiny.encode(torch.zeros(1, 3, *hw))


def test_downsample_padding_by_hand():
    """A 3x3 all-ones kernel on a 4x4 ramp, computed by hand. Symmetric (the authors': one zero
    on every side) sums input rows/cols 2i-1..2i+1; SD's (0,1,0,1) sums 2i..2i+2."""
    x = torch.arange(16.0).reshape(1, 1, 4, 4)  # x[r, c] = 4r + c
    # symmetric, output (0,0): rows 0..1, cols 0..1 (row/col -1 is padding): 0+1+4+5
    # (0,1): rows 0..1, cols 1..3: 1+2+3+5+6+7;  (1,0): rows 1..3, cols 0..1: 4+5+8+9+12+13
    # (1,1): rows 1..3, cols 1..3: 5+6+7+9+10+11+13+14+15
    symmetric = torch.tensor([[10.0, 24.0], [51.0, 90.0]])
    # sd, (0,0): rows 0..2, cols 0..2: 0+1+2+4+5+6+8+9+10;  (0,1): rows 0..2, cols 2..3 (col 4
    # padding): 2+3+6+7+10+11;  (1,0): rows 2..3, cols 0..2: 8+9+10+12+13+14;  (1,1): 10+11+14+15
    sd = torch.tensor([[45.0, 39.0], [66.0, 50.0]])
    for padding, want in (("symmetric", symmetric), ("sd", sd)):
        d = ae.Downsample(1, padding)
        with torch.no_grad():
            d.conv.weight.fill_(1.0)
            d.conv.bias.zero_()
            y = d(x)
        assert y.shape == (1, 1, 2, 2)
        torch.testing.assert_close(y[0, 0], want, msg=padding)


@pytest.mark.parametrize("padding", ["symmetric", "sd"])
def test_padding_option_keeps_shapes_and_parameters(padding):
    cfg = ae.config({"name": "f16d16", "downsample_padding": padding})
    assert cfg.channels == ae.CONFIGS["f16d16"].channels and cfg.downsample_padding == padding
    with torch.device("meta"):
        m = ae.build(cfg)
        assert tuple(m.encode(torch.empty(1, 3, 256, 256)).mean.shape) == (1, 16, 16, 16)
    assert ae.count_parameters(m) == ae.count_parameters(_meta_model("f16d16"))
    t = ae.config({"name": "tiny", "downsample_padding": padding})
    m = ae.build(t).eval()
    with torch.no_grad():
        assert m(torch.zeros(1, 3, 64, 64), sample=False)[0].shape == (1, 3, 64, 64)


def test_padding_default_and_bad_value():
    assert ae.CONFIGS["f8d4"].downsample_padding == "symmetric"
    with pytest.raises(SpecmatchError, match="downsample_padding must be one of"):
        ae.config({"name": "tiny", "downsample_padding": "reflect"})


def test_padding_changes_the_latents():
    """Same weights, two paddings: different encodings (the kernel grid shifts by one pixel)."""
    torch.manual_seed(2)
    a = ae.build(ae.config({"name": "tiny", "downsample_padding": "symmetric"})).eval()
    b = ae.build(ae.config({"name": "tiny", "downsample_padding": "sd"})).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert (a.encode(x).mean - b.encode(x).mean).abs().max() > 1e-3


def test_attention_matches_float64_reference():
    torch.manual_seed(1)
    blk = ae.AttnBlock(16, 8).double()
    for p in blk.parameters():  # non-trivial norm affine too
        nn.init.normal_(p, 0.0, 0.3)
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    h = F.group_norm(x, 8, blk.norm.weight, blk.norm.bias, eps=1e-6)
    q, k, v = (torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], h) + conv.bias[None, :, None, None]
               for conv in (blk.q, blk.k, blk.v))
    q, k, v = (t.flatten(2) for t in (q, k, v))  # (B, C, N)
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(16), dim=-1)
    out = torch.einsum("bij,bcj->bci", w, v).reshape(2, 16, 5, 7)
    ref = x + torch.einsum("oc,bchw->bohw", blk.proj_out.weight[:, :, 0, 0], out) + blk.proj_out.bias[None, :, None, None]
    with torch.no_grad():
        got = blk(x)
    # the block computes attention in float32 on purpose, hence float32 tolerance
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- posterior


def _moments(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return torch.cat([mean, logvar], dim=1)


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(2)
    mean = torch.randn(3, 4, 6, 5, generator=g, dtype=torch.float64) * 2
    logvar = torch.rand(3, 4, 6, 5, generator=g, dtype=torch.float64) * 8 - 4
    post = ae.DiagonalGaussian(_moments(mean, logvar))
    ref = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert post.kl().shape == (3,)
    torch.testing.assert_close(post.kl().double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(post.std.double(), torch.exp(0.5 * logvar), rtol=1e-6, atol=0)
    assert torch.equal(post.mode(), post.mean)


def test_logvar_clamped_to_spec_range():
    mean = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    logvar = torch.tensor([-100.0, 100.0], dtype=torch.float64).reshape(1, 2, 1, 1)
    post = ae.DiagonalGaussian(_moments(mean, logvar))
    assert post.logvar.flatten().tolist() == [-30.0, 20.0]
    clamped = torch.tensor([-30.0, 20.0], dtype=torch.float64).reshape(1, 2, 1, 1)
    ref = kl_divergence(Normal(mean, torch.exp(0.5 * clamped)), Normal(0.0, 1.0)).sum()
    assert torch.isfinite(post.kl()).all()
    torch.testing.assert_close(post.kl().double(), ref.reshape(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(post.std.flatten().double(), torch.tensor([math.exp(-15), math.exp(10)], dtype=torch.float64))


def test_sample_reproducible_and_distributed_right():
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(2, 4, 64, 64, generator=g) * 3
    logvar = torch.rand(2, 4, 64, 64, generator=g) * 6 - 3
    post = ae.DiagonalGaussian(_moments(mean, logvar))
    a = post.sample(torch.Generator().manual_seed(7))
    b = post.sample(torch.Generator().manual_seed(7))
    c = post.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # standardised with the *true* parameters, the 32768 draws must be N(0, 1)
    e = ((a.double() - mean.double()) / torch.exp(0.5 * logvar.double())).flatten()
    assert abs(e.mean().item()) < 0.03  # SE = 0.0055
    assert abs(e.std().item() - 1.0) < 0.02  # SE ~ 0.004
    assert scipy.stats.kstest(e.numpy(), "norm").pvalue > 1e-3


# --------------------------------------------------------------------------- training-relevant


def test_gradients_reach_every_parameter():
    torch.manual_seed(4)
    m = ae.build("tiny")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, _ = m(x, sample=True, generator=torch.Generator().manual_seed(0))
    F.l1_loss(recon, x).backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not dead, f"parameters with no gradient from the L1 reconstruction loss: {dead}"


def test_bf16_autocast_close_to_fp32(tiny):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref, post_ref = tiny(x, sample=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, post = tiny(x, sample=False)
    assert post.mean.dtype == torch.float32 and post.kl().dtype == torch.float32
    assert torch.isfinite(got).all()
    err = (got.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05, f"bf16 autocast relative error {err:.3g}"


def test_traces_as_one_graph(tiny):
    # fullgraph=True fails on any graph break (data-dependent python control flow, unsupported
    # ops); the eager backend keeps it fast on CPU and still runs the full Dynamo trace.
    torch._dynamo.reset()
    fn = torch.compile(lambda x: tiny(x, sample=False)[0], backend="eager", fullgraph=True)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(fn(x), tiny(x, sample=False)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_bf16_compiled_matches_eager():
    torch.manual_seed(5)
    m = ae.build("tiny").cuda()
    x = torch.rand(4, 3, 64, 64, device="cuda") * 2 - 1
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref, _ = m(x, sample=False)
        got, post = cm(x, sample=False)
        loss = F.l1_loss(got.float(), x) + 1e-6 * post.kl().mean()
    loss.backward()
    assert torch.isfinite(got).all() and all(torch.isfinite(p.grad).all() for p in m.parameters())
    assert (got.float() - ref.float()).abs().max() < 0.05 * ref.float().abs().max()


# --------------------------------------------------------------------------- discriminator


@pytest.mark.parametrize("size,patches", [(64, 6), (256, 30)])
def test_discriminator_patch_map_shape(size, patches):
    # 256 px on the meta device: shapes without the compute
    device = "cpu" if size == 64 else "meta"
    with torch.device(device):
        d = PatchDiscriminator()
        assert d(torch.zeros(2, 3, size, size)).shape == (2, 1, patches, patches)


def test_discriminator_layout():
    d = PatchDiscriminator()
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0], c.bias is not None) for c in convs] == [
        (3, 64, 2, True), (64, 128, 2, False), (128, 256, 2, False), (256, 512, 1, False), (512, 1, 1, True)]
    assert all(c.kernel_size == (4, 4) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in d.modules()) == 3
    leaky = [m for m in d.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(leaky) == 4 and all(m.negative_slope == 0.2 for m in leaky)
    # by hand: 3*64*16+64 + 64*128*16 + 128*256*16 + 256*512*16 + 512*16+1 + 2*(128+256+512)
    assert sum(p.numel() for p in d.parameters()) == 2_765_633


@pytest.mark.parametrize("std", [0.02, 0.2])
def test_discriminator_init_std(std):
    torch.manual_seed(6)
    d = PatchDiscriminator(init_std=std)
    # the 256 -> 512 conv: 2M weights
    (big,) = [m for m in d.modules() if isinstance(m, nn.Conv2d) and m.out_channels == 512]
    assert big.weight.shape == (512, 256, 4, 4)
    w = big.weight.detach()
    assert abs(w.mean().item()) < 0.01 * std
    assert abs(w.std().item() / std - 1) < 0.01
    # BN scales ~ N(1, 0.02) whatever init_std (the authors' init_weights and taming's)
    bn = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)][-1]
    assert abs(bn.weight.mean().item() - 1) < 0.004 and abs(bn.weight.std().item() / 0.02 - 1) < 0.15
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_hinge_and_generator_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r) = 0, 0.5, 2   -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.5])  # relu(1 + f) = 0, 1, 2.5   -> mean 7/6
    # the authors' trainer: mean(relu(1 + fake) + relu(1 - real)), no 1/2; taming's has 1/2
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(5 / 6 + 7 / 6))
    torch.testing.assert_close(hinge_d_loss(real, fake, 0.5), torch.tensor(0.5 * (5 / 6 + 7 / 6)))
    torch.testing.assert_close(generator_adv_loss(torch.tensor([[1.0, 2.0], [3.0, 6.0]])), torch.tensor(-3.0))
    # a perfect discriminator pays nothing
    assert hinge_d_loss(torch.full((4,), 1.5), torch.full((4,), -1.0)).item() == 0.0
