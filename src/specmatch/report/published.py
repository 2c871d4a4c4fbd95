"""E3 beside the published numbers: which of our E3 rows compare with them, and the table that
puts them side by side (docs/reference-fidelity.md, "E3").

The numbers the paper's alignment comparison quotes (ImageNet 256, SiT-B/2 at 400k iterations
with DINOv2-B/14 targets, gFID-50k; second-hand, the guidance setting is not stated in the
sources we have): REPA 5.68, iREPA 5.07, DoG-REPA 4.98. They were measured in REPA's setting
(the public SD-VAE's latents, 4x32x32 at 256 px, scale 0.18215; ADM's evaluator against its
ImageNet reference batch), as the REPA and iREPA numbers beside them. A row of ours compares
with them only in that setting; every other row (E3b, the tiny preset) is shown with the
reason it does not. Ours are shown both without and with guidance.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

# alignment kind -> published gFID-50k (SiT-B/2, 400k iterations)
PUBLISHED = {"repa": 5.68, "irepa": 5.07, "dog": 4.98}
SOURCE = ("the paper's alignment comparison (SiT-B/2, 400k iterations, DINOv2-B/14, ImageNet 256, gFID-50k; "
          "second-hand, guidance not stated)")
# What a row must have to be set beside them (column of the E3 table -> value).
SETTING = {"model": "SiT-B/2", "trained_steps": 400000, "n_samples": 50000, "protocol": "adm",
           "sampler": "euler-maruyama", "steps": 250}
SD_VAE_LATENTS = {"scale_factor": 0.18215, "shape": [4, 32, 32]}


def _why_not(row: pd.Series, latents: dict[str, Any] | None) -> str:
    """'' when the row is in the published setting, else what differs."""
    out = [f"{k} {row.get(k)!r} (published: {v!r})" for k, v in SETTING.items() if row.get(k) != v]
    if "FID" not in row or pd.isna(row.get("FID")):
        out.append("no FID (another feature net)")
    got = {k: (latents or {}).get(k) for k in SD_VAE_LATENTS}
    if got != SD_VAE_LATENTS:
        out.append(f"latents {got} (published: the public SD-VAE's {SD_VAE_LATENTS})")
    return "; ".join(out)


def compare(e3: pd.DataFrame, diffusion: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """The E3 (or E3b) table with three columns added: `published_FID` (the published number of
    the row's alignment kind, where one exists), `comparable` (the row is in the published
    setting) and `not_comparable_because` (what differs, else ''). `diffusion`: the runs'
    summaries (diffusion.json), for their latents."""
    if e3.empty:
        return e3
    out = e3.copy()
    why = [_why_not(r, (diffusion.get(r["diffusion"]) or {}).get("latents")) for _, r in out.iterrows()]
    out["published_FID"] = [PUBLISHED.get(k) for k in out["alignment"]]
    out["comparable"] = [not w for w in why]
    out["not_comparable_because"] = why
    return out


def side_by_side(e3: pd.DataFrame) -> pd.DataFrame:
    """One row per alignment kind: our FID without and with guidance (the runs in the published
    setting only) beside the published number."""
    if e3.empty or "comparable" not in e3:
        return pd.DataFrame()
    ok = e3[e3["comparable"]] if "FID" in e3 else e3.iloc[:0].assign(FID=[])
    rows = []
    for kind in dict.fromkeys(e3["alignment"]):
        mine = ok[ok["alignment"] == kind]
        plain = mine[mine["cfg_scale"] == 1.0]["FID"]
        guided = mine[mine["cfg_scale"] != 1.0]
        rows.append({"alignment": kind,
                     "ours_FID_no_guidance": float(plain.iloc[0]) if len(plain) else None,
                     "ours_FID_guided": float(guided["FID"].iloc[0]) if len(guided) else None,
                     "guidance": (f"{guided['cfg_scale'].iloc[0]:g} on t in {guided['cfg_interval'].iloc[0]}"
                                  if len(guided) else None),
                     "published_FID": PUBLISHED.get(kind)})
    return pd.DataFrame(rows)


def section(e3: pd.DataFrame) -> list[str]:
    """The report page's lines for E3: which rows compare with the published numbers, and the
    side-by-side table (markdown)."""
    from ..render.tables import markdown

    if e3.empty or "comparable" not in e3:
        return []
    lines = [f"Published numbers: REPA {PUBLISHED['repa']}, iREPA {PUBLISHED['irepa']}, DoG-REPA {PUBLISHED['dog']} "
             f"({SOURCE}). Their guidance setting is not stated in the sources we have, so ours are shown without "
             "and with guidance. Only rows in the published setting (SiT-B/2 on the public SD-VAE's latents, 400k "
             "steps, Euler-Maruyama 250 steps, 50k samples, FID under the ADM protocol) compare with them.", ""]
    table = side_by_side(e3)
    if e3["comparable"].any():
        lines += [markdown(table), ""]
    else:
        reasons = sorted(set(e3["not_comparable_because"]))
        lines += ["No row of this preset is in the published setting: " + " | ".join(reasons) + ".", ""]
    return lines
