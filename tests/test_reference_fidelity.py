"""The paper grid follows the recipes docs/reference-fidelity.md states: each checked setting of
the resolved `params.yaml` has the value the table's "ours" column gives (and the reference's,
where they are the same), so the document and the preset cannot drift apart unnoticed."""

from __future__ import annotations

from pathlib import Path

import pytest

from specmatch import config, grid
from specmatch.autoencoder import model as ae_model

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "reference-fidelity.md").read_text()
E3 = ["imagenet-sdvae-sitb2", "imagenet-sdvae-sitb2-repa", "imagenet-sdvae-sitb2-irepa", "imagenet-sdvae-sitb2-dog"]


@pytest.fixture(scope="module")
def paper():
    return config.load(ROOT / "params.yaml", "paper")


def _ae(p, name="celebahq-f16d16-dsm"):
    return grid.autoencoder_run(p, name)


# (what, value in the resolved paper grid, expected, the doc's text for it)
CHECKS = [
    ("AE iterations", lambda p: _ae(p)["train"]["steps"], 500000, "`train.steps` 500000"),
    ("AE schedule", lambda p: _ae(p)["disc"]["schedule"], "alternating", "`disc.schedule` `alternating`"),
    ("AE EMA", lambda p: _ae(p)["train"]["ema_decay"], 0.0, "`train.ema_decay` 0"),
    ("AE SyncBN", lambda p: _ae(p)["disc"]["sync_batchnorm"], True, "`disc.sync_batchnorm` true"),
    ("AE hinge", lambda p: _ae(p)["disc"]["hinge_scale"], 1.0, "`disc.hinge_scale` 1.0"),
    ("AE D init", lambda p: _ae(p)["disc"]["init_std"], 0.02, "`disc.init_std` 0.02"),
    ("AE GAN start", lambda p: _ae(p)["loss"]["gan_start"], 50001, "`loss.gan_start` 50001"),
    ("AE padding", lambda p: ae_model.config(_ae(p)["config"]).downsample_padding, "symmetric",
     "`config.downsample_padding` `symmetric`"),
    ("AE lr", lambda p: _ae(p)["train"]["lr"], 5e-5, "`train.lr` 5e-5"),
    ("AE warm-up", lambda p: _ae(p)["train"]["warmup_steps"], 2000, "`warmup_steps` 2000"),
    ("AE wd", lambda p: _ae(p)["train"]["weight_decay"], 0.005, "`weight_decay` 0.005"),
    ("AE clip", lambda p: _ae(p)["train"]["grad_clip"], 1.0, "`grad_clip` 1.0 |"),
    ("AE batch", lambda p: _ae(p)["train"]["batch_size"], 48, "`batch_size` 48 / 128"),
    ("AE ImageNet DSM", lambda p: (_ae(p, "imagenet-f16d16-dsm")["train"]["steps"],
                                   _ae(p, "imagenet-f16d16-dsm")["train"]["batch_size"]), (1000000, 128),
     "ImageNet entries 600000 / 1000000"),
    ("AE mask draw", lambda p: _ae(p)["loss"].get("mask_draw", "shared"), "shared", "`loss.mask_draw` `shared`"),
    ("SD-VAE", lambda p: (_ae(p, "imagenet-sdvae-ft-ema")["pretrained"],
                          _ae(p, "imagenet-sdvae-ft-ema")["latents"]["scale_factor"]), ("sd-vae-ft-ema", 0.18215),
     "`autoencoders.imagenet-sdvae-ft-ema.latents.scale_factor` 0.18215"),
    ("E3 network", lambda p: {(r["model"], r["autoencoder"]) for r in (grid.diffusion_run(p, n) for n in E3)},
     {("SiT-B/2", "imagenet-sdvae-ft-ema")}, "SiT-B/2 on `imagenet-sdvae-ft-ema`"),
    ("E3 alignment", lambda p: [grid.diffusion_run(p, n)["alignment"]["kind"] for n in E3],
     ["none", "repa", "irepa", "dog"], "`alignment.kind` irepa"),
    ("REPA depth, weight", lambda p: (grid.diffusion_run(p, E3[1])["alignment"]["depth"],
                                      grid.diffusion_run(p, E3[1])["alignment"]["weight"]), (8, 0.5),
     "`alignment.depth` 8, `weight` 0.5"),
    ("U-ViT optimiser", lambda p: {k: grid.diffusion_run(p, "celebahq-f16d16-dsm-uvit")["train"][k]
                                   for k in ("lr", "weight_decay", "betas", "warmup_steps", "grad_clip")},
     {"lr": 2e-4, "weight_decay": 0.03, "betas": [0.99, 0.99], "warmup_steps": 5000, "grad_clip": None},
     "`train.lr` 2e-4, `weight_decay` 0.03, `betas` [0.99, 0.99], `warmup_steps` 5000, `grad_clip` null"),
    ("sampler SDE", lambda p: {k: grid.sampler(p, "sde250-cfg-50k")[k]
                               for k in ("method", "steps", "n_samples", "cfg_scale", "cfg_interval")},
     {"method": "euler-maruyama", "steps": 250, "n_samples": 50000, "cfg_scale": 1.8, "cfg_interval": [0.0, 0.7]},
     "`sde250-cfg-50k`: 1.8 on [0, 0.7]"),
]


@pytest.mark.parametrize("what,get,want,doc", CHECKS, ids=[c[0] for c in CHECKS])
def test_paper_grid_matches_the_fidelity_table(paper, what, get, want, doc):
    assert get(paper) == want, what
    assert doc in DOC, f"docs/reference-fidelity.md does not state {doc!r}"


def test_every_sit_run_of_the_paper_grid_clips_at_one_and_follows_repa(paper):
    sit = [n for n in paper["grid"]["diffusions"] if paper["diffusions"][n]["model"].startswith("SiT")]
    assert len(sit) == 10  # E2 (3), E3 (4), E3b aligned (3)
    for n in sit:
        t = grid.diffusion_run(paper, n)["train"]
        assert (t["grad_clip"], t["batch_size"], t["lr"], t["ema_decay"], t["label_dropout"], t["steps"]) == \
            (1.0, 256, 1e-4, 0.9999, 0.1, 400000), n


def test_e3_and_e3b_in_the_report(paper):
    exp = paper["report"]["experiments"]
    assert exp["E3"]["diffusions"] == E3
    assert all(d.startswith("imagenet-f16d16-dsm-sit") for d in exp["E3b"]["diffusions"])
    assert set(E3 + exp["E3b"]["diffusions"]) <= set(paper["grid"]["diffusions"])
    assert "imagenet-sdvae-ft-ema" in paper["grid"]["autoencoders"]
