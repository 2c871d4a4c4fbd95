"""`specmatch fid-progress`: the generation metric of a diffusion run over its training.

The trainer saves the EMA weights at `train.snapshot_steps` (`snapshots/step-<N>.safetensors` in
its output). This stage samples every snapshot, and the final weights, with one sampler and a
reduced number of samples, decodes them with the run's autoencoder and scores them against the
dataset's reference statistics with the metric code of `specmatch fid calc`
(`metrics.reference.Reference`). Sample i of every point starts from the same noise and label
(seeded by its index, `diffusion.sample.generate`), so the curve compares weights, not draws.

Numbers over N samples are biased upwards against those of the final evaluation when N is
smaller: each point records its N, and the report plots the final evaluation separately unless
its protocol is the same.

The output also holds the curve for TensorBoard and DVC plots (`runtime.curves`, in `curves/`):
the metric (tag: its name), precision, recall and IS at each step, written with the output.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import config as config_mod
from ..autoencoder import artifact as ae_artifact
from ..errors import SpecmatchError
from ..metrics.reference import Reference
from ..runtime import atomic, distributed
from ..runtime.curves import Curves
from ..runtime.jsonfile import read_json
from ..runtime.provenance import Provenance
from . import artifact
from .sample import check_compatible, generate

log = logging.getLogger(__name__)

PROGRESS_JSON = "progress.json"
PROGRESS_CSV = "progress.csv"
COLUMNS = ("diffusion", "autoencoder", "step", "source", "metric", "value", "precision", "recall", "inception_score",
           "n_samples", "protocol", "sampler", "steps", "nfe", "cfg_scale", "cfg_interval", "reference",
           "feature_weights_sha256", "seed", "weights")


def read(folder: str | Path) -> tuple[str, pd.DataFrame]:
    """(the diffusion run, its points: one row per evaluated weights, the columns of COLUMNS) of a
    `fid-progress` output folder; an error names the file and what is missing."""
    folder = Path(folder)
    info = read_json(folder / PROGRESS_JSON, f"{folder / PROGRESS_JSON}: missing (expected a `specmatch "
                                              "fid-progress` output)")
    csv = folder / PROGRESS_CSV
    if not csv.is_file():
        raise SpecmatchError(f"{csv}: missing (expected a `specmatch fid-progress` output)")
    df = pd.read_csv(csv)
    missing = [c for c in COLUMNS if c not in df]
    if missing or "diffusion" not in info:
        raise SpecmatchError(f"{folder}: no {'columns ' + str(missing) if missing else 'key diffusion'} (an output "
                             "of an older or another stage?)")
    return info["diffusion"], df


def params(p: dict[str, Any], name: str) -> dict[str, Any]:
    """`--params`: {"sampler": resolved sampler settings (the run's first sampler), "metrics": the
    `metrics` section, "n_samples": samples per point}; validated with defaults."""
    unknown = sorted(set(p) - {"sampler", "metrics", "n_samples"})
    if unknown or "sampler" not in p or "n_samples" not in p:
        raise SpecmatchError(f"parameters of {name}: expected the keys sampler, metrics, n_samples "
                             f"(unknown {unknown}, got {sorted(p)})")
    n = p["n_samples"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise SpecmatchError(f"parameters of {name}: n_samples must be an integer >= 2, got {n!r}")
    sampler = config_mod.validate({**p["sampler"], "n_samples": n}, "diff_sampler", where="sampler",
                                  source=f"sampler of {name}")
    metrics = config_mod.validate(p.get("metrics") or {}, "metrics", where="metrics", source=f"metrics of {name}")
    return {"sampler": sampler, "metrics": metrics, "n_samples": n}


def run(model_dir: str | Path, ae_dir: str | Path, ref_dir: str | Path, p: dict[str, Any], name: str,
        out: str | Path) -> pd.DataFrame:
    p = params(p, name)
    s = p["sampler"]
    model_dir, ae_dir, out = Path(model_dir), Path(ae_dir), Path(out)
    summary = artifact.read_summary(model_dir)
    steps = list((summary.get("snapshots") or {}).get("steps") or [])
    if not steps:
        raise SpecmatchError(f"{model_dir}: the run saved no snapshots; list the steps in its train.snapshot_steps "
                             "(params.yaml) and train it again")
    for step in steps:
        if not artifact.snapshot_path(model_dir, step).is_file():
            raise SpecmatchError(f"{model_dir}: diffusion.json lists a snapshot of step {step}, but "
                                 f"{artifact.snapshot_path(model_dir, step)} is missing")
    # The final weights close the curve, unless the last snapshot is of the final step already.
    points = [(int(step), step) for step in sorted(steps)]
    if points[-1][0] != int(summary["steps"]):
        points.append((int(summary["steps"]), None))
    info = distributed.setup(s["device"])
    try:
        return _run(p, info, model_dir, ae_dir, Path(ref_dir), summary, points, name, out)
    finally:
        distributed.teardown()


def _run(p, info, model_dir, ae_dir, ref_dir, summary, points, name, out):
    s, n = p["sampler"], p["n_samples"]
    dev = info.device
    ae, ae_summary = ae_artifact.load(ae_dir, True, dev)
    path = check_compatible(s, model_dir, summary, ae_dir, ae_summary)
    reference = Reference(ref_dir, p["metrics"])
    scale = float(summary["latents"]["scale_factor"])
    rows, results = [], []
    for step, snap in points:
        net, _ = artifact.load(model_dir, s["use_ema"], dev, snapshot=snap)
        t0 = time.perf_counter()
        mine = list(range(info.rank, n, info.world_size))
        images, _, nfe = generate(net, path, ae, scale, s, mine, n, dev)
        parts = distributed.all_gather_object((mine, images)) if info.world_size > 1 else [(mine, images)]
        order = np.argsort(np.concatenate([np.asarray(i, np.int64) for i, _ in parts]), kind="stable")
        images = np.concatenate([im for _, im in parts])[order]
        seconds = time.perf_counter() - t0
        m = reference.measure(images, f"samples of {model_dir} at step {step}")
        source = "final weights" if snap is None else "snapshot"
        rows.append({"diffusion": summary["name"], "autoencoder": summary["latents"]["autoencoder"], "step": step,
                     "source": source, "metric": m.metric, "value": m.value, "precision": m.precision,
                     "recall": m.recall, "inception_score": m.inception_score.mean if m.inception_score else None,
                     "n_samples": n, "protocol": m.protocol_name,
                     "sampler": s["method"], "steps": s["steps"], "nfe": nfe, "cfg_scale": s["cfg_scale"],
                     "cfg_interval": "-".join(f"{v:g}" for v in s["cfg_interval"]),
                     "reference": m.reference_label, "feature_weights_sha256": m.feature_weights_sha256[:16],
                     "seed": s["seed"],
                     "weights": "ema" if (s["use_ema"] and summary.get("ema")) else "raw"})
        results.append({"step": step, "source": source, "seconds_sampling": seconds, **m.to_json()})
        log.info("fid-progress %s: step %d (%s): %s = %.4f over %d samples", name, step, source, m.metric, m.value, n)
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    if info.is_main:
        _write(p, summary, model_dir, ae_dir, reference, df, results, name, out, info.world_size)
    distributed.barrier()
    return df


def _write(p, summary, model_dir, ae_dir, reference, df, results, name, out, world):
    prov = Provenance("fid-progress", name, p, seeds={"sample": p["sampler"]["seed"], "metrics": p["metrics"]["seed"]})
    prov.add_input(model_dir, "diffusion model")
    prov.add_input(ae_dir, "autoencoder")
    reference.add_inputs(prov)
    protocol = {"diffusion": summary["name"], "trained_steps": summary["steps"], "sampler": p["sampler"],
                "n_samples": p["n_samples"], "metric": results[0]["protocol"], "world_size": world,
                "reference_stats_sha256": results[0]["reference"]["stats_sha256"]}
    prov.protocol = protocol
    with atomic.atomic_dir(out) as tmp:
        df.to_csv(tmp / PROGRESS_CSV, index=False, float_format="%.6g")
        with Curves(tmp, 0, True) as curves:  # the metric over training for TensorBoard and DVC plots
            for row in df.itertuples(index=False):
                values = {row.metric: row.value, "precision": row.precision, "recall": row.recall,
                          "inception_score": row.inception_score}
                curves.log(int(row.step), {k: v for k, v in values.items() if v is not None and pd.notna(v)})
        atomic.write_text(tmp / PROGRESS_JSON, json.dumps({"name": name, **protocol, "points": results}, indent=1,
                                                          default=float) + "\n")
        prov.write(out, tmp)
