"""The public SD-VAE as an autoencoder of the grid (`specmatch import-ae`, autoencoder.import_ae).

The independent reference is diffusers' own AutoencoderKL (a test dependency only): a small one
with random weights is written with `save_pretrained` (config.json +
diffusion_pytorch_model.safetensors, the layout of stabilityai/sd-vae-ft-ema), loaded through
our path, and its encoder moments and decoder output must equal diffusers' to 1e-5. The full SD
configuration is checked key for key and shape for shape on the meta device (no compute).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from specmatch.autoencoder import artifact, evaluate, latents
from specmatch.autoencoder import import_ae
from specmatch.autoencoder import model as ae_model
from specmatch.data.prepare import prepare
from specmatch.errors import SpecmatchError

diffusers = pytest.importorskip("diffusers")

SMALL = {"block_out_channels": (16, 32, 64), "down_block_types": ("DownEncoderBlock2D",) * 3,
         "up_block_types": ("UpDecoderBlock2D",) * 3, "latent_channels": 4, "norm_num_groups": 8,
         "layers_per_block": 1}
SD_KL_F8 = {"block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "latent_channels": 4, "norm_num_groups": 32,
            "layers_per_block": 2, "sample_size": 256}
OLD_ATTN = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _random_vae(seed: int = 0):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(**SMALL).eval()
    with torch.no_grad():  # every tensor random, norms included, so a swapped key shows
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdvae") / "sd-vae-ft-ema"
    vae = _random_vae()
    vae.save_pretrained(folder)
    assert {p.name for p in folder.iterdir()} >= {import_ae.CONFIG_FILE, import_ae.WEIGHTS_FILE}
    return folder, vae


def _compare(ours: ae_model.AutoencoderKL, vae) -> None:
    torch.manual_seed(3)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        post = ours.encode(x)
        torch.testing.assert_close(post.mean, dist.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(post.logvar, dist.logvar, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.decode(z), vae.decode(z).sample, atol=1e-5, rtol=0)


def test_import_equals_diffusers_forward(saved):
    folder, vae = saved
    ours, scaling, raw = import_ae.load_folder(folder)
    assert ours.cfg.downsample_padding == "sd" and ours.cfg.channels == SMALL["block_out_channels"]
    assert scaling == pytest.approx(0.18215) and raw["latent_channels"] == 4
    _compare(ours, vae)


def test_symmetric_padding_would_not_match(saved):
    """The padding matters: the same weights with the authors' symmetric padding give other
    moments (so the test above would catch a wrong padding)."""
    folder, vae = saved
    ours, _, _ = import_ae.load_folder(folder)
    sym = ae_model.build(ae_model.with_padding(ours.cfg, "symmetric")).eval()
    sym.load_state_dict(ours.state_dict())
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert (sym.encode(x).mean - vae.encode(x).latent_dist.mean).abs().max() > 1e-3


def test_old_attention_names_are_read(saved, tmp_path):
    """Files written by diffusers < 0.14 (as the sd-vae-ft-* ones) name the attention
    query/key/value/proj_attn."""
    folder, vae = saved
    old = tmp_path / "old"
    old.mkdir()
    (old / import_ae.CONFIG_FILE).write_text((folder / import_ae.CONFIG_FILE).read_text())
    tensors = load_file(folder / import_ae.WEIGHTS_FILE)
    renamed = {}
    for k, v in tensors.items():
        for new, was in OLD_ATTN.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{was}.")
        renamed[k] = v
    assert any(".query." in k for k in renamed)
    save_file(renamed, old / import_ae.WEIGHTS_FILE)
    ours, _, _ = import_ae.load_folder(old)
    _compare(ours, vae)


def test_full_sd_config_maps_onto_f8d4():
    """The SD kl-f8 configuration maps key for key and shape for shape onto our f8d4 (meta
    tensors: no compute) with SD's padding."""
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL(**SD_KL_F8)
    cfg = ae_model.config({"name": "sd", "channels": SD_KL_F8["block_out_channels"], "z_channels": 4,
                           "downsample_padding": "sd"})
    state = import_ae.convert_state_dict(vae.state_dict(), cfg)
    assert len(state) == len(vae.state_dict())
    assert sum(v.numel() for v in state.values()) == 83_653_863  # SD kl-f8


def _bad_file(folder: Path, tmp_path: Path, edit) -> Path:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / import_ae.CONFIG_FILE).write_text((folder / import_ae.CONFIG_FILE).read_text())
    tensors = load_file(folder / import_ae.WEIGHTS_FILE)
    edit(tensors)
    save_file(tensors, bad / import_ae.WEIGHTS_FILE)
    return bad


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop("decoder.up_blocks.0.resnets.1.conv2.weight"),
     r"missing 1 tensor\(s\): \['decoder\.up\.2\.block\.1\.conv2\.weight'\]"),
    (lambda t: t.update({"encoder.extra.weight": torch.zeros(3)}), r"unexpected 1 key\(s\): \['encoder\.extra\.weight'\]"),
    (lambda t: t.update({"quant_conv.weight": torch.zeros(8, 8, 3, 3)}),
     r"misshaped 1: \['quant_conv\.weight \(8, 8, 3, 3\) \(expected \(8, 8, 1, 1\)"),
])
def test_bad_checkpoints_are_refused_naming_keys(saved, tmp_path, edit, match):
    folder, _ = saved
    with pytest.raises(SpecmatchError, match=match):
        import_ae.load_folder(_bad_file(folder, tmp_path, edit))


@pytest.mark.parametrize("change,match", [
    ({"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D", "UpDecoderBlock2D"]}, "up_block_types"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"shift_factor": 0.1}, "shift_factor"),
    ({"_class_name": "AutoencoderTiny"}, "_class_name"),
])
def test_bad_configs_are_refused_naming_the_key(saved, tmp_path, change, match):
    folder, _ = saved
    raw = {**json.loads((folder / import_ae.CONFIG_FILE).read_text()), **change}
    (tmp_path / import_ae.CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(SpecmatchError, match=rf"config\.json: {match}"):
        import_ae.read_config(tmp_path / import_ae.CONFIG_FILE)
    with pytest.raises(SpecmatchError, match="config.json: missing"):
        import_ae.read_config(tmp_path / "nowhere" / import_ae.CONFIG_FILE)


def test_import_stage_then_latents_with_the_fixed_scale(saved, tmp_path):
    """import-ae writes a train-ae output from the resource (found in the resources folder,
    recorded with its sha256), `artifact.load` reads it back as diffusers' model, and
    extract-latents uses the fixed scale factor."""
    folder, vae = saved
    run = {"dataset": "embedded", "pretrained": "sd-vae-ft-ema", "resources_dir": str(folder.parent),
           "latents": {"scale_factor": 0.18215, "hflip": False, "device": "cpu", "batch_size": 8}}
    out = tmp_path / "ae"
    summary = import_ae.import_autoencoder(run, "imagenet-sdvae-ft-ema", out)
    assert summary["variant"] == "pretrained" and summary["config"]["downsample_padding"] == "sd"
    ae, read = artifact.load(out)
    assert read["pretrained"]["resource"] == "sd-vae-ft-ema" and read["ema"] is False
    _compare(ae, vae)
    prov = json.loads((out / "provenance.json").read_text())
    inputs = {i["role"]: i for i in prov["inputs"]}
    assert inputs["weights:sd-vae-ft-ema"]["sha256"] == summary["pretrained"]["weights_sha256"]

    data = tmp_path / "data"
    prepare({"source": "embedded", "resolution": 32, "seed": 0, "n_train": 16, "n_test": 8}, "embedded", data)
    man = latents.extract(run, out, data, "imagenet-sdvae-ft-ema", tmp_path / "latents")
    assert man["scale_factor"] == 0.18215 and man["scale_source"].startswith("fixed")
    assert man["shape"] == [4, 8, 8] and man["variant"] == "pretrained"
    res = evaluate.evaluate({**run, "eval": {"net": "efficientnet-lite0-128", "lpips": False, "device": "cpu",
                                             "batch_size": 4, "lowpass_ks": [0, 8], "n_reconstructions": 0,
                                             "bootstrap": 0}},
                            out, data, "imagenet-sdvae-ft-ema", tmp_path / "eval")
    assert res["variant"] == "pretrained" and res["n"] == 8 and set(res["lowpass"]) == {"8"}


def test_import_needs_a_present_resource(tmp_path):
    run = {"dataset": "embedded", "pretrained": "sd-vae-ft-mse", "resources_dir": str(tmp_path)}
    with pytest.raises(SpecmatchError, match=r"sd-vae-ft-mse/diffusion_pytorch_model\.safetensors.*missing"):
        import_ae.import_autoencoder(run, "x", tmp_path / "out")
    with pytest.raises(SpecmatchError, match="resource"):
        import_ae.import_autoencoder({**run, "pretrained": "no-such-vae"}, "x", tmp_path / "out")
    assert not (tmp_path / "out").exists()
