"""The `train-diffusion` output (and its run folder's snapshots): file names, writing, and
reading back the trained network. Sampling, `fid-progress` and the report load a model here,
never through the trainer.

    <out>/model.safetensors      net.<k> (raw) and ema.<k> (EMA) weights
    <out>/diffusion.json         the summary: model, process, latents, alignment, snapshots
    <out>/snapshots/step-<N>.safetensors   EMA (or raw) weights at train.snapshot_steps

`specmatch import-model` (diffusion.import_model) writes the same layout from a released checkpoint:
its summary has `imported` (the source layout, file and sha256) and `time_scale` (the network's
time input, time_scale * t; absent = 1000, ours), and its file holds the checkpoint's weights
under `ema.` (or `net.`) only.

`load` checks the weights file it reads (model.safetensors or a snapshot) against the sha256 in
the folder's provenance.json before using it (`runtime.weights.load_stage_weights`;
`$SPECMATCH_VERIFY=0` skips, and is recorded).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import SpecmatchError
from ..runtime import atomic, checkpoint
from ..runtime.jsonfile import read_json
from ..runtime.weights import load_stage_weights, safetensors_bytes, save_safetensors
from . import models

KIND = "diffusion"
SUMMARY = "diffusion.json"
WEIGHTS = "model.safetensors"
SNAPSHOTS = "snapshots"


def snapshot_path(folder: str | Path, step: int) -> Path:
    """`<folder>/snapshots/step-<step:08d>.safetensors` (a run folder or a train-diffusion output)."""
    return Path(folder) / SNAPSHOTS / f"{checkpoint.step_dir_name(step)}.safetensors"


def write_snapshot(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], fp: str) -> None:
    path = snapshot_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_file(path) as f:
        f.write(safetensors_bytes(detached(tensors), metadata={"kind": KIND, "fingerprint": fp, "step": str(step)}))


def detached(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def snapshot_ok(path: Path, fp: str) -> bool:
    """A snapshot file of this run (its fingerprint), complete (written atomically)."""
    if not path.is_file():
        return False
    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("fingerprint") == fp


def write(tmp: Path, weights: dict[str, torch.Tensor], summary: dict[str, Any], fp: str, run_dir: Path,
          snapshot_steps=()) -> None:
    """The output's files into `tmp` (the stage's atomic_dir): weights, the snapshots of
    `snapshot_steps` copied from the run folder (each checked to be of this run), the summary."""
    save_safetensors(detached(weights), tmp / WEIGHTS, metadata={"kind": KIND, "fingerprint": fp})
    for s in snapshot_steps:
        src = snapshot_path(run_dir, s)
        if not snapshot_ok(src, fp):
            raise SpecmatchError(f"{src}: the snapshot of step {s} is missing or belongs to another run")
        snapshot_path(tmp, s).parent.mkdir(exist_ok=True)
        shutil.copyfile(src, snapshot_path(tmp, s))
    (tmp / SUMMARY).write_text(json.dumps(summary, indent=1, default=str) + "\n")


def read_summary(folder: str | Path) -> dict[str, Any]:
    """diffusion.json of a finished `train-diffusion` folder."""
    return read_json(Path(folder) / SUMMARY,
                     f"{folder}: not a trained diffusion model (no {SUMMARY}); run `specmatch train-diffusion`")


def build_network(summary: dict[str, Any]) -> torch.nn.Module:
    """The untrained network a `diffusion.json` describes (its architecture, latent shape, classes
    and time scale), initialised by the global RNG."""
    return models.build(summary["model"], in_channels=summary["in_channels"], input_size=summary["input_size"],
                        num_classes=summary["num_classes"],
                        time_scale=float(summary.get("time_scale", models.TIME_SCALE)))


def load(folder: str | Path, use_ema: bool = True, device="cpu", snapshot: int | None = None,
         verify: bool | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network of a finished `train-diffusion` folder (EMA weights when present and asked
    for), in eval mode, with its summary. Only the network's own weights are read: anything a
    training run carried besides them (e.g. an alignment projector) is not needed to sample.
    `snapshot`: the weights of that step's snapshot instead of the final ones (snapshots hold
    the EMA weights only, or the raw ones of a run without EMA). The file read is checked
    against the sha256 the folder's provenance.json lists (`verify`: None follows
    `$SPECMATCH_VERIFY`)."""
    folder = Path(folder)
    summary = read_summary(folder)
    w_path = folder / WEIGHTS
    if not w_path.is_file():
        raise SpecmatchError(f"{folder}: not a trained diffusion model (no {WEIGHTS}); run `specmatch train-diffusion`")
    net = build_network(summary)
    prefix = "ema." if use_ema and summary.get("ema") else "net."
    held = (summary.get("imported") or {}).get("weights")
    if held is not None and prefix != f"{held}.":
        raise SpecmatchError(f"{folder}: an imported model holds only the {held!r} weights of its checkpoint "
                             f"({summary['imported']['file']}); sample it with use_ema: {held == 'ema'}")
    if snapshot is not None:
        w_path = snapshot_path(folder, snapshot)
        if not w_path.is_file():
            have = (summary.get("snapshots") or {}).get("steps", [])
            raise SpecmatchError(f"{folder}: no snapshot of step {snapshot} ({w_path.name}; the run has snapshots of "
                                 f"steps {have}: train.snapshot_steps)")
        if use_ema != bool(summary.get("ema")):
            raise SpecmatchError(f"{w_path}: snapshots hold the {'EMA' if summary.get('ema') else 'raw'} weights "
                                 f"only, but use_ema is {use_ema}")
    remedy = ("copy the whole folder again, or make it again with `specmatch " +
              ("import-model`" if summary.get("imported") else "train-diffusion`"))
    tensors = load_stage_weights(folder, w_path.relative_to(folder).as_posix(), str(device), verify, remedy)
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SpecmatchError(f"{w_path}: weights do not fit {summary['model']} (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    net.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, summary
