"""Result tables: one row per scored sample set, with the protocol beside every number, as
CSV (for analysis) and Markdown (for reading). A distance is always labelled with its metric
name (FID, FD-EffNetLite0), so numbers of different feature nets never share a column."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import SpecmatchError
from ..metrics import record
from ..render.tables import write_table
from ..runtime import atomic
from ..runtime.provenance import Provenance

# Table order of the alignment kinds: the baseline first, then REPA and its two variants.
ALIGN_ORDER = {"none": 0, "repa": 1, "irepa": 2, "dog": 3}


def align_order(label: str) -> int:
    """Sort key of an alignment kind or table label ('dog (encoder, depth 2, ...)')."""
    return ALIGN_ORDER.get(str(label).split(" ")[0], len(ALIGN_ORDER))


def train_seed(row: dict[str, Any]) -> int | None:
    """A generation row's training seed (`train_seed`); None where it is not recorded (samples of
    imported models, records written before it was), read back from a CSV as NaN."""
    v = row.get("train_seed")
    return None if v is None or (isinstance(v, float) and v != v) else int(v)


def generation_row(folder: Path) -> dict[str, Any]:
    """One scored sample set (a `fid calc` output of `sample` images): the run, the sampling
    protocol, the metric by name and its value, precision/recall, IS, reference, feature weights."""
    folder = Path(folder)
    m = record.read(folder)
    s = m.sampling
    if s is None:
        raise SpecmatchError(f"{folder / record.FILE}: these metrics are not of `specmatch sample` outputs (no "
                             "sampling protocol)")
    return {
        "diffusion": s.diffusion, "autoencoder": s.autoencoder, "dataset": m.reference["dataset"], "model": s.model,
        "process": s.process, "alignment": s.alignment, "trained_steps": s.trained_steps,
        "weights": s.weights,
        "sampler": s.sampler, "steps": s.steps, "nfe": s.nfe_per_sample,
        "cfg_scale": s.cfg_scale, "cfg_interval": s.cfg_label,
        "n_samples": m.samples["n"], "protocol": m.protocol_name, "metric": m.metric, "value": m.value,
        "value_std": m.uncertainty.std if m.uncertainty is not None else None,
        "precision": m.precision, "recall": m.recall,
        "inception_score": m.inception_score.mean if m.inception_score else None,
        "reference": m.reference_label, "feature_weights_sha256": m.feature_weights_sha256[:16],
        "seed": s.seed, "train_seed": s.train_seed, "world_size": s.world_size, "samples": m.name,
    }


def generation_table(metric_dirs: list[str | Path]) -> pd.DataFrame:
    if not metric_dirs:
        raise SpecmatchError("no metric folders given")
    rows = [generation_row(Path(d)) for d in metric_dirs]
    return pd.DataFrame(rows).sort_values(["metric", "diffusion", "sampler"], kind="stable").reset_index(drop=True)


def alignment_comparison(gen: pd.DataFrame) -> pd.DataFrame:
    """The REPA comparison of `report generation`: the runs that differ only in their alignment (same
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
    df = pd.DataFrame(rows)
    df["_o"] = df["alignment"].map(align_order)
    return df.sort_values(keys + ["_o"], kind="stable").drop(columns="_o").reset_index(drop=True)


def write_generation(metric_dirs: list[str | Path], name: str, out: str | Path) -> pd.DataFrame:
    """`specmatch report generation`: generation.csv and generation.md in `out` (atomic), and
    alignment.csv / alignment.md when the runs include an alignment comparison."""
    df = generation_table(metric_dirs)
    comparison = alignment_comparison(df)
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
