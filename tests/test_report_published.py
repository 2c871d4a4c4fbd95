"""E3 beside the published numbers (report.published): which rows compare, and the side-by-side
table with and without guidance."""

from __future__ import annotations

import pandas as pd

from specmatch.report import published

SDVAE = {"latents": {"scale_factor": 0.18215, "shape": [4, 32, 32]}}
OURS = {"latents": {"scale_factor": 0.9731, "shape": [16, 16, 16]}}


def _row(diffusion, kind, cfg, fid, **kw):
    return {"diffusion": diffusion, "alignment": kind, "model": "SiT-B/2", "trained_steps": 400000,
            "n_samples": 50000, "protocol": "adm", "sampler": "euler-maruyama", "steps": 250, "cfg_scale": cfg,
            "cfg_interval": "0-0.7" if cfg != 1.0 else "0-1", "FID": fid, **kw}


def test_rows_in_the_published_setting_compare():
    df = pd.DataFrame([_row("e3-repa", "repa", 1.0, 20.1), _row("e3-repa", "repa", 1.8, 6.0),
                       _row("e3-none", "none", 1.0, 30.0), _row("e3-dog", "dog", 1.8, 5.1),
                       _row("e3b-repa", "repa", 1.0, 15.0, model="SiT-B/1"),
                       _row("e3-irepa", "irepa", 1.0, 19.0, protocol="pytorch-fid")])
    runs = {"e3-repa": SDVAE, "e3-none": SDVAE, "e3-dog": SDVAE, "e3b-repa": OURS, "e3-irepa": SDVAE}
    out = published.compare(df, runs)
    assert out["comparable"].tolist() == [True, True, True, True, False, False]
    pub = out["published_FID"].tolist()[:4]
    assert pub[:2] == [5.68, 5.68] and pd.isna(pub[2]) and pub[3] == 4.98
    why = out["not_comparable_because"].tolist()
    assert "model 'SiT-B/1'" in why[4] and "latents" in why[4] and "protocol 'pytorch-fid'" in why[5]
    side = published.side_by_side(out).set_index("alignment")
    assert side.loc["repa", "ours_FID_no_guidance"] == 20.1 and side.loc["repa", "ours_FID_guided"] == 6.0
    assert side.loc["repa", "published_FID"] == 5.68 and pd.isna(side.loc["dog", "ours_FID_no_guidance"])
    assert pd.isna(side.loc["irepa", "ours_FID_no_guidance"])  # its only row is not comparable
    text = "\n".join(published.section(out))
    assert "REPA 5.68, iREPA 5.07, DoG-REPA 4.98" in text and "without and with guidance" in text


def test_other_feature_nets_never_compare():
    df = pd.DataFrame([{**{k: v for k, v in _row("tiny", "repa", 1.0, 0.0).items() if k != "FID"},
                        "FD-EffNetLite0-128": 12.0, "model": "SiT-tiny/2", "n_samples": 128}])
    out = published.compare(df, {"tiny": {"latents": {"scale_factor": 1.1, "shape": [4, 16, 16]}}})
    assert not out["comparable"].any() and "no FID" in out["not_comparable_because"][0]
    assert "No row of this preset is in the published setting" in "\n".join(published.section(out))
