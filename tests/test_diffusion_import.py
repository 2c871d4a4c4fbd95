"""Released diffusion checkpoints (`specmatch import-model`, diffusion.import_model).

References, independent of the code under test:
- SiT and REPA: diffusers' `DiTTransformer2DModel` (the DiT network SiT and REPA use), random
  weights, written into each release's layout by a key map made here from reading the
  repositories (willisma/SiT models.py, sihyun-yu/REPA models/sit.py). Its sinusoid is DiT's
  own once `downscale_freq_shift` is 0 (diffusers builds DiT's with 1, a slight frequency change
  its weight conversion tolerates), and its LayerNorm eps 1e-6 as DiT's.
  SiT: ours(x, t, y) must equal -DiT(x, 1 - t, y)[:, :C] (SiT's t = 1 is the data, its velocity
  data - noise, the learned-sigma half dropped); REPA: ours(x, t, y) = DiT(x, t, y).
- U-ViT (no implementation on PyPI): its forward written out below from reading baofff/U-ViT
  libs/uvit.py ([label, time, patches] tokens, qkv split as (K H D), time input 999 t for the
  continuous-time models), plus a round trip.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from specmatch.diffusion import artifact, models
from specmatch.diffusion import import_model
from specmatch.errors import SpecmatchError

diffusers = pytest.importorskip("diffusers")

C, SIZE, PATCH, CLASSES = 4, 8, 2, 10
TINY = models.NETS["SiT-tiny"]  # width 128, 4 blocks, 4 heads


def _dit(out_channels: int, seed: int = 0):
    torch.manual_seed(seed)
    dit = diffusers.DiTTransformer2DModel(
        num_attention_heads=TINY.heads, attention_head_dim=TINY.width // TINY.heads, in_channels=C,
        out_channels=out_channels, num_layers=TINY.depth, sample_size=SIZE, patch_size=PATCH,
        num_embeds_ada_norm=CLASSES, norm_eps=1e-6).eval()
    blocks = dit.transformer_blocks
    with torch.no_grad():
        for p in dit.parameters():  # DiT zero-initialises its modulations: make everything count
            p.copy_(torch.randn_like(p) * 0.05)
        for b in blocks:  # one time/label embedder, as DiT (diffusers keeps a copy per block)
            b.norm1.emb.load_state_dict(blocks[0].norm1.emb.state_dict())
            b.norm1.emb.time_proj.downscale_freq_shift = 0
    return dit


def _dit_to_sit_layout(dit) -> dict[str, torch.Tensor]:
    """The state dict of SiT's / REPA's `SiT` module (DiT's names) holding diffusers' weights."""
    sd = dit.state_dict()
    emb = "transformer_blocks.0.norm1.emb."
    out = {"x_embedder.proj.weight": sd["pos_embed.proj.weight"], "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
           "pos_embed": dit.pos_embed.pos_embed.clone(),
           "t_embedder.mlp.0.weight": sd[emb + "timestep_embedder.linear_1.weight"],
           "t_embedder.mlp.0.bias": sd[emb + "timestep_embedder.linear_1.bias"],
           "t_embedder.mlp.2.weight": sd[emb + "timestep_embedder.linear_2.weight"],
           "t_embedder.mlp.2.bias": sd[emb + "timestep_embedder.linear_2.bias"],
           "y_embedder.embedding_table.weight": sd[emb + "class_embedder.embedding_table.weight"],
           "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
           "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
           "final_layer.linear.weight": sd["proj_out_2.weight"], "final_layer.linear.bias": sd["proj_out_2.bias"]}
    for i in range(TINY.depth):
        d, s = f"transformer_blocks.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            out[s + f"attn.qkv.{part}"] = torch.cat([sd[d + f"attn1.to_{n}.{part}"] for n in "qkv"])
            out[s + f"attn.proj.{part}"] = sd[d + f"attn1.to_out.0.{part}"]
            out[s + f"mlp.fc1.{part}"] = sd[d + f"ff.net.0.proj.{part}"]
            out[s + f"mlp.fc2.{part}"] = sd[d + f"ff.net.2.{part}"]
            out[s + f"adaLN_modulation.1.{part}"] = sd[d + f"norm1.linear.{part}"]
    return {k: v.clone() for k, v in out.items()}


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, C, SIZE, SIZE, generator=g)
    t = torch.tensor([0.05, 0.5, 0.93])
    y = torch.tensor([0, 7, CLASSES])  # the last: the null label
    return x, t, y


def _ref(dit, x, t, y) -> torch.Tensor:
    with torch.no_grad():
        return dit(x, timestep=t, class_labels=y).sample[:, :C]


def _import(tmp_path, layout, state_or_obj, model="SiT-tiny/2", weights="ema", suffix=".pt", **kw):
    ckpt = tmp_path / f"ckpt{suffix}"
    if suffix == ".safetensors":
        save_file(state_or_obj, ckpt)
    else:
        torch.save(state_or_obj, ckpt)
    params = {"layout": layout, "model": model, "autoencoder": "imagenet-sdvae-ft-ema", "in_channels": C,
              "input_size": SIZE, "num_classes": CLASSES, "weights": weights, **kw}
    out = tmp_path / "model"
    summary = import_model.import_model(params, ckpt, "released", out)
    net, read = artifact.load(out, use_ema=weights == "ema")
    return net, summary, ckpt


def test_sit_checkpoint_against_diffusers_dit(tmp_path):
    """willisma/SiT: learned-sigma output (2C), t = 1 the data, velocity data - noise."""
    dit = _dit(out_channels=2 * C)
    net, summary, ckpt = _import(tmp_path, "sit", _dit_to_sit_layout(dit))  # a bare state dict, as released
    x, t, y = _inputs()
    with torch.no_grad():
        ours = net(x, t, y)
    torch.testing.assert_close(ours, -_ref(dit, x, 1 - t, y), atol=1e-5, rtol=1e-4)
    assert summary["time_scale"] == 1.0 and summary["process"]["kind"] == "linear"
    assert any("learned-sigma" in c for c in summary["imported"]["conversions"])
    assert summary["imported"]["sha256"] == summary["fingerprint"]
    prov = json.loads((tmp_path / "model" / "provenance.json").read_text())
    assert prov["inputs"][0]["role"] == "checkpoint:sit" and prov["inputs"][0]["sha256"] == summary["fingerprint"]
    # the conversion is needed: without the time reversal and sign flip it would not match
    assert (ours - _ref(dit, x, t, y)).abs().max() > 1e-2


def test_repa_checkpoint_against_diffusers_dit(tmp_path):
    """sihyun-yu/REPA: our conventions already; a training checkpoint {model, ema, opt, args,
    steps} with the alignment projectors, which are dropped."""
    dit = _dit(out_channels=C, seed=2)
    ema = _dit_to_sit_layout(dit)
    projector = {"projectors.0.0.weight": torch.randn(32, TINY.width), "projectors.0.0.bias": torch.zeros(32),
                 "projectors.0.2.weight": torch.randn(32, 32), "projectors.0.4.weight": torch.randn(16, 32)}
    raw = {k: v if k == "pos_embed" else v + 0.1 for k, v in ema.items()}  # pos_embed is fixed
    obj = {"model": {**raw, **projector}, "ema": {**ema, **projector}, "opt": {"state": {}, "param_groups": []},
           "args": argparse.Namespace(model="SiT-tiny/2", encoder_depth=2), "steps": 4_000_000}
    net, summary, ckpt = _import(tmp_path, "repa-sit", obj, trained_steps=4_000_000)
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, y), _ref(dit, x, t, y), atol=1e-5, rtol=1e-4)
    assert summary["alignment"]["kind"] == "repa" and summary["steps"] == 4_000_000
    assert any("projector" in c for c in summary["imported"]["conversions"])
    # the imported model holds the EMA weights only: raw sampling is refused, naming the file
    with pytest.raises(SpecmatchError, match="holds only the 'ema' weights.*ckpt.pt"):
        artifact.load(tmp_path / "model", use_ema=False)
    # weights: model picks the raw ones
    (tmp_path / "raw").mkdir()
    net2, _, _ = _import(tmp_path / "raw", "repa-sit", obj, weights="model")
    assert torch.allclose(net2.blocks[0].attn.qkv.weight, raw["blocks.0.attn.qkv.weight"])


def _uvit_reference(sd: dict[str, torch.Tensor], x, timesteps, y, heads: int, patch: int) -> torch.Tensor:
    """U-ViT's forward (baofff/U-ViT libs/uvit.py, conv=True, mlp_time_embed=False) on its own
    state dict, written out from reading it."""
    b, c, h, w = x.shape
    d = sd["pos_embed"].shape[-1]
    tok = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    tok = tok.flatten(2).transpose(1, 2)
    half = d // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    time_token = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)[:, None]
    tok = torch.cat([time_token, tok], 1)
    label = sd["label_emb.weight"][y][:, None]
    tok = torch.cat([label, tok], 1) + sd["pos_embed"]  # [label, time, patches]

    def block(p, z, skip=None):
        if skip is not None:
            z = F.linear(torch.cat([z, skip], -1), sd[p + "skip_linear.weight"], sd[p + "skip_linear.bias"])
        a = F.layer_norm(z, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        qkv = F.linear(a, sd[p + "attn.qkv.weight"])  # qkv_bias=False
        qkv = qkv.reshape(b, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # 'B L (K H D) -> K B H L D'
        att = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) / math.sqrt(d // heads), -1) @ qkv[2]
        z = z + F.linear(att.transpose(1, 2).reshape(b, -1, d), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        m = F.layer_norm(z, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        m = F.linear(F.gelu(F.linear(m, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        return z + m

    n_in = sum(1 for k in sd if k.startswith("in_blocks.") and k.endswith("norm1.weight"))
    skips = []
    for i in range(n_in):
        tok = block(f"in_blocks.{i}.", tok)
        skips.append(tok)
    tok = block("mid_block.", tok)
    for i in range(n_in):
        tok = block(f"out_blocks.{i}.", tok, skips.pop())
    tok = F.layer_norm(tok, (d,), sd["norm.weight"], sd["norm.bias"])
    tok = F.linear(tok, sd["decoder_pred.weight"], sd["decoder_pred.bias"])[:, 2:]
    g = h // patch
    img = tok.reshape(b, g, g, patch, patch, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)  # (p1 p2 C)
    return F.conv2d(img, sd["final_layer.weight"], sd["final_layer.bias"], padding=1)


def _uvit_checkpoint(seed: int = 3) -> dict[str, torch.Tensor]:
    """A U-ViT-layout state dict with random weights (U-ViT's names are ours; only the token order
    of pos_embed differs, which a random table does not care about)."""
    torch.manual_seed(seed)
    net = models.build("UViT-tiny/2", in_channels=C, input_size=SIZE, num_classes=CLASSES)
    return {k: torch.randn_like(v) * 0.05 for k, v in net.state_dict().items()}


def test_uvit_checkpoint_against_its_forward(tmp_path):
    sd = _uvit_checkpoint()
    net, summary, _ = _import(tmp_path, "uvit", sd, model="UViT-tiny/2", suffix=".safetensors")
    x, t, y = _inputs()
    with torch.no_grad():
        ours = net(x, t, y)
        ref = _uvit_reference(sd, x, 999 * t, y, models.NETS["UViT-tiny"].heads, 2)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    assert summary["time_scale"] == 999.0 and summary["process"]["kind"] == "vp-linear"
    # token order: our time token's position row is U-ViT's row 1, the label's its row 0
    torch.testing.assert_close(net.pos_embed[0, 0], sd["pos_embed"][0, 1])
    torch.testing.assert_close(net.pos_embed[0, 1], sd["pos_embed"][0, 0])


def test_uvit_round_trip(tmp_path):
    """Our U-ViT written in U-ViT's layout (pos_embed rows swapped back) and imported is the same
    network, weight for weight."""
    torch.manual_seed(4)
    ours = models.build("UViT-tiny/2", in_channels=C, input_size=SIZE, num_classes=CLASSES, time_scale=999.0)
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    sd["pos_embed"] = sd["pos_embed"][:, [1, 0, *range(2, sd["pos_embed"].shape[1])]]
    back, _, _ = _import(tmp_path, "uvit", sd, model="UViT-tiny/2")
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


@pytest.mark.parametrize("layout,edit,match", [
    ("sit", lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), r"missing 1 tensor\(s\): \['blocks\.1\.mlp\.fc2\.bias'\]"),
    ("repa-sit", lambda sd: sd.update({"blocks.0.attn.q_norm.weight": torch.ones(32)}),
     r"unexpected 1 key\(s\): \['blocks\.0\.attn\.q_norm\.weight'\]"),
    ("sit", lambda sd: sd.update({"y_embedder.embedding_table.weight": torch.zeros(CLASSES, TINY.width)}),
     r"misshaped 1: \['y_embedder\.embedding_table\.weight \(10, 128\) \(expected \(11, 128\)\)"),
    ("sit", lambda sd: sd.update({"pos_embed": sd["pos_embed"].flip(1)}), "pos_embed is not the 2-D sin-cos"),
    ("uvit", lambda sd: sd.update({"time_embed.0.weight": torch.zeros(4)}), "mlp_time_embed"),
])
def test_bad_checkpoints_are_refused_naming_keys(tmp_path, layout, edit, match):
    sd = _uvit_checkpoint() if layout == "uvit" else _dit_to_sit_layout(_dit(2 * C if layout == "sit" else C))
    edit(sd)
    with pytest.raises(SpecmatchError, match=match):
        _import(tmp_path, layout, sd, model="UViT-tiny/2" if layout == "uvit" else "SiT-tiny/2")
    assert not (tmp_path / "model").exists()


def test_bad_files_and_parameters(tmp_path):
    sd = _dit_to_sit_layout(_dit(C))
    with pytest.raises(SpecmatchError, match="without 'ema' weights"):
        _import(tmp_path, "repa-sit", {"model": sd, "opt": {}})
    with pytest.raises(SpecmatchError, match="not tensors"):
        _import(tmp_path, "repa-sit", {**sd, "steps": 5})
    with pytest.raises(SpecmatchError, match="is a sit network, layout 'uvit'"):
        _import(tmp_path, "uvit", sd)
    with pytest.raises(SpecmatchError, match="misshaped"):  # the wrong size named for the file
        _import(tmp_path, "repa-sit", sd, model="SiT-S/2")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SpecmatchError, match="junk.pt: cannot be read"):
        import_model.read_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(SpecmatchError, match="layout"):
        import_model.import_model({"layout": "dit", "model": "SiT-tiny/2", "autoencoder": "a"}, tmp_path / "junk.pt",
                             "x", tmp_path / "o")


def test_reversed_time_rotation_is_exact():
    t = torch.linspace(0, 1, 7, dtype=torch.float64)
    rot = import_model._reversed_time_rotation(models.SIT_FREQ_DIM)
    emb = models.timestep_embedding(t, models.SIT_FREQ_DIM).double()
    torch.testing.assert_close(emb @ rot.T, models.timestep_embedding(1 - t, models.SIT_FREQ_DIM).double(),
                               atol=1e-6, rtol=0)


def test_sample_from_imported_model_and_autoencoder(tmp_path):
    """`specmatch sample` on an imported SiT and an imported SD-VAE-layout autoencoder, as for a
    released checkpoint at scale (here 4 images, 2 Euler steps, guidance on)."""
    from specmatch.autoencoder import import_ae
    from specmatch.diffusion import sample
    from test_autoencoder_import import _random_vae  # the tests folder is on sys.path

    _random_vae().save_pretrained(tmp_path / "resources" / "sd-vae-ft-ema")
    import_ae.import_autoencoder({"dataset": "imagenet", "pretrained": "sd-vae-ft-ema",
                                   "resources_dir": str(tmp_path / "resources")}, "imagenet-sdvae-ft-ema",
                                  tmp_path / "ae")
    _import(tmp_path, "sit", _dit_to_sit_layout(_dit(2 * C)))
    protocol = sample.sample(tmp_path / "model", tmp_path / "ae",
                             {"method": "euler", "steps": 2, "n_samples": 4, "batch_size": 4, "shard_size": 4,
                              "cfg_scale": 1.5, "device": "cpu"}, "released-euler", tmp_path / "samples",
                             work_dir=tmp_path / "work")
    assert protocol.n_samples == 4 and protocol.scale_factor == 0.18215 and protocol.autoencoder == "imagenet-sdvae-ft-ema"
    man = json.loads((tmp_path / "samples" / "manifest.json").read_text())
    assert man["splits"]["samples"]["count"] == 4 and man["resolution"] == 32
