"""The `train-ae` output: file names, writing, and reading back the trained autoencoder.
Evaluation, latent extraction, sampling and `fid-progress` load an autoencoder here, never
through the trainer.

    <out>/model.safetensors   ae.<k> (raw) and ema.<k> (EMA, when kept) weights
    <out>/autoencoder.json    the summary: config, variant, objective, steps, dataset identity

`load` checks model.safetensors against the sha256 in the folder's provenance.json before using
it (`runtime.weights.load_stage_weights`; `$SPECMATCH_VERIFY=0` skips, and is recorded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import SpecmatchError
from ..runtime.weights import load_stage_weights, save_safetensors
from . import model as ae_model

KIND = "autoencoder"
SUMMARY = "autoencoder.json"
WEIGHTS = "model.safetensors"


def write(tmp: Path, weights: dict[str, torch.Tensor], summary: dict[str, Any], fp: str) -> None:
    """The output's files into `tmp` (the stage's atomic_dir)."""
    save_safetensors(weights, tmp / WEIGHTS, metadata={"kind": KIND, "fingerprint": fp})
    (tmp / SUMMARY).write_text(json.dumps(summary, indent=1, default=str) + "\n")


def load(folder: str | Path, use_ema: bool = True, device="cpu",
         verify: bool | None = None) -> tuple[ae_model.AutoencoderKL, dict]:
    """The autoencoder of a finished `train-ae` output folder (EMA weights when present and
    asked for), in eval mode, with its summary. The weights are checked against the sha256 the
    folder's provenance.json lists (`verify`: None follows `$SPECMATCH_VERIFY`)."""
    folder = Path(folder)
    meta_path, w_path = folder / SUMMARY, folder / WEIGHTS
    for p in (meta_path, w_path):
        if not p.is_file():
            raise SpecmatchError(f"{folder}: not a trained autoencoder (no {p.name}); run `specmatch train-ae`")
    summary = json.loads(meta_path.read_text())
    fields = dict(summary["config"])
    # Outputs written before the padding became a field were all trained with SD's padding.
    fields.setdefault("downsample_padding", "sd")
    cfg = ae_model.config({k: (tuple(v) if k == "channels" else v) for k, v in fields.items()})
    tensors = load_stage_weights(folder, WEIGHTS, str(device), verify,
                                 "copy the whole folder again, or make it again with `specmatch train-ae` "
                                 "(or `import-ae`)")
    prefix = "ema." if use_ema and summary.get("ema") else "ae."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    ae = ae_model.build(cfg).to(device)
    missing, unexpected = ae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SpecmatchError(f"{w_path}: weights do not fit config {cfg.name} (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
    ae.eval()
    for p in ae.parameters():
        p.requires_grad_(False)
    return ae, summary
