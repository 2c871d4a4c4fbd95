"""Result tables: one row per scored sample set, with the protocol beside every number, as
CSV (for analysis) and Markdown (for reading). A distance is always labelled with its metric
name (FID, FD-EffNetLite0), so numbers of different feature nets never share a column."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import SpecmatchError
from ..runtime import atomic
from ..runtime.provenance import Provenance

METRICS_JSON = "metrics.json"


def _generation_row(folder: Path) -> dict[str, Any]:
    path = folder / METRICS_JSON
    if not path.is_file():
        raise SpecmatchError(f"{folder}: no {METRICS_JSON} (expected a `specmatch fid calc` output)")
    m = json.loads(path.read_text())
    s = m.get("sampling")
    if s is None:
        raise SpecmatchError(f"{path}: these metrics are not of `specmatch sample` outputs (no sampling protocol)")
    metric = m["metric"]
    is_key = next((k for k in m if k == "IS" or (k.startswith("IS-") and not k.endswith("_std"))), None)
    return {
        "diffusion": s["diffusion"], "autoencoder": s["autoencoder"], "model": s["model"],
        "process": s["process"], "trained_steps": s["trained_steps"], "weights": s["weights"],
        "sampler": s["sampler"], "steps": s["steps"], "nfe": s["nfe_per_sample"],
        "cfg_scale": s["cfg_scale"], "cfg_interval": "-".join(f"{v:g}" for v in s["cfg_interval"]),
        "n_samples": m["samples"]["n"], "metric": metric, "value": m[metric],
        "precision": m["precision"], "recall": m["recall"],
        "inception_score": m.get(is_key) if is_key else None,
        "reference": f"{m['reference']['dataset']}/{m['reference']['split']} (n={m['reference']['n']})",
        "feature_weights_sha256": m["protocol"]["weights_sha256"][:16],
        "seed": s["seed"], "world_size": s["world_size"], "samples": m["name"],
    }


def generation_table(metric_dirs: list[str | Path]) -> pd.DataFrame:
    if not metric_dirs:
        raise SpecmatchError("no metric folders given")
    rows = [_generation_row(Path(d)) for d in metric_dirs]
    return pd.DataFrame(rows).sort_values(["metric", "diffusion", "sampler"], kind="stable").reset_index(drop=True)


def write_generation(metric_dirs: list[str | Path], name: str, out: str | Path) -> pd.DataFrame:
    """`specmatch report generation`: generation.csv and generation.md in `out` (atomic)."""
    df = generation_table(metric_dirs)
    prov = Provenance("report-generation", name, {"inputs": [str(d) for d in metric_dirs]})
    for d in metric_dirs:
        prov.add_input(Path(d), "metrics")
    with atomic.atomic_dir(out) as tmp:
        df.to_csv(tmp / "generation.csv", index=False, float_format="%.6g")
        md = ["# Generation metrics", "",
              "One row per sample set; `value` is the distance named in `metric` (lower is better). "
              "Distances of different metrics are not comparable.", "",
              df.to_markdown(index=False, floatfmt=".4g"), ""]
        (tmp / "generation.md").write_text("\n".join(md))
        prov.write(out, tmp)
    return df
