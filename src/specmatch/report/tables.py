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


def generation_row(folder: Path) -> dict[str, Any]:
    """One scored sample set (a `fid calc` output of `sample` images): the run, the sampling
    protocol, the metric by name and its value, precision/recall, IS, reference, feature weights."""
    folder = Path(folder)
    path = folder / METRICS_JSON
    if not path.is_file():
        raise SpecmatchError(f"{folder}: no {METRICS_JSON} (expected a `specmatch fid calc` output)")
    m = json.loads(path.read_text())
    s = m.get("sampling")
    if s is None:
        raise SpecmatchError(f"{path}: these metrics are not of `specmatch sample` outputs (no sampling protocol)")
    try:
        return _generation_row(m, s)
    except KeyError as e:
        raise SpecmatchError(f"{path}: no key {e} (expected a `specmatch fid calc` output of `specmatch sample` "
                             "images)") from None


def _generation_row(m: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    metric = m["metric"]
    is_key = next((k for k in m if k == "IS" or (k.startswith("IS-") and not k.endswith("_std"))), None)
    return {
        "diffusion": s["diffusion"], "autoencoder": s["autoencoder"], "model": s["model"],
        "process": s["process"], "alignment": s.get("alignment", "none"), "trained_steps": s["trained_steps"],
        "weights": s["weights"],
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
    rows = [generation_row(Path(d)) for d in metric_dirs]
    return pd.DataFrame(rows).sort_values(["metric", "diffusion", "sampler"], kind="stable").reset_index(drop=True)


def alignment_table(gen: pd.DataFrame) -> pd.DataFrame:
    """The REPA comparison (SPEC 9, E3): the runs that differ only in their alignment (same
    autoencoder, network, process and training steps), one row per alignment, with the metric,
    IS, precision and recall of every sampler side by side (column labels carry the sampler and
    its guidance). Empty when no such group exists."""
    keys = ["autoencoder", "model", "process", "trained_steps", "metric"]
    rows = []
    for group, g in gen.groupby(keys, sort=True):
        if g["alignment"].nunique() < 2:
            continue
        for align, a in g.groupby("alignment", sort=False):
            row = dict(zip(keys, group))
            row["alignment"] = align
            for _, r in a.iterrows():
                label = f"{r['sampler']} {r['steps']} steps, cfg {r['cfg_scale']:g} on {r['cfg_interval']}"
                row[f"{r['metric']} [{label}]"] = r["value"]
                row[f"IS [{label}]"] = r["inception_score"]
                row[f"precision [{label}]"] = r["precision"]
                row[f"recall [{label}]"] = r["recall"]
            row["n_samples"] = int(a["n_samples"].iloc[0])
            rows.append(row)
    if not rows:
        return pd.DataFrame()
    order = {"none": 0, "repa": 1, "irepa": 2, "dog": 3}
    df = pd.DataFrame(rows)
    df["_o"] = df["alignment"].map(lambda v: order.get(str(v).split(" ")[0], 9))
    return df.sort_values(keys + ["_o"], kind="stable").drop(columns="_o").reset_index(drop=True)


def markdown(df: pd.DataFrame) -> str:
    """A Markdown table, 4 significant digits, missing values as empty cells."""
    return df.astype(object).where(df.notna(), None).to_markdown(index=False, floatfmt=".4g", missingval="")


def write_table(df: pd.DataFrame, folder: Path, stem: str, title: str, intro: str) -> None:
    """`<stem>.csv` (for analysis) and `<stem>.md` (title, what the rows are, the table) in `folder`."""
    df.to_csv(folder / f"{stem}.csv", index=False, float_format="%.6g")
    md = [f"# {title}", "", intro, "", markdown(df), ""]
    (folder / f"{stem}.md").write_text("\n".join(md))


def write_generation(metric_dirs: list[str | Path], name: str, out: str | Path) -> pd.DataFrame:
    """`specmatch report generation`: generation.csv and generation.md in `out` (atomic), and
    alignment.csv / alignment.md when the runs include an alignment comparison."""
    df = generation_table(metric_dirs)
    comparison = alignment_table(df)
    prov = Provenance("report-generation", name, {"inputs": [str(d) for d in metric_dirs]})
    for d in metric_dirs:
        prov.add_input(Path(d), "metrics")
    with atomic.atomic_dir(out) as tmp:
        write_table(df, tmp, "generation", "Generation metrics",
                    "One row per sample set; `value` is the distance named in `metric` (lower is better). "
                    "Distances of different metrics are not comparable.")
        if len(comparison):
            write_table(comparison, tmp, "alignment", "Representation alignment: REPA vs iREPA vs DoG-REPA",
                        "Runs that differ only in their alignment (same latents, network and training steps), one "
                        "row per alignment; one column group per sampler. Lower distance is better.")
        prov.write(out, tmp)
    return df
