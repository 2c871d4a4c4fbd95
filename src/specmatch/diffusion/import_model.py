"""`specmatch import-model`: a released diffusion checkpoint as a `train-diffusion` output.

Three layouts, learnt from reading their repositories (no code of theirs is used or copied):

- `uvit` (baofff/U-ViT, `libs/uvit.py`): the same module names as our UViT. Its forward puts
  the tokens in the order [label, time, patches] (it prepends the time token, then the label
  token), ours is [time, label, patches]: the first two rows of `pos_embed` are swapped. Its
  continuous-time models (`train.py`, `train_ldm.py`, e.g. the ImageNet 256 U-ViT-L/2) are
  trained on the VP SDE with beta 0.1..20 (our `vp-linear`), t = 0 the data, and fed `999 t`
  (`sde.ScoreModel`): `time_scale` 999. Its label table has num_classes + 1 rows, the last the
  null label (`num_classes=1001` in its ImageNet configs), as ours. Refused: `mlp_time_embed`
  models (a time MLP ours does not have), `conv=False` ones (no final conv) and, by the
  parameters, the discrete-time ones (`train_ldm_discrete.py`: U-ViT-H/2, whose SD beta schedule
  is not a process of ours).
- `sit` (willisma/SiT, `models.py`, `transport/path.py`): DiT's module names, as ours. Its
  interpolant runs the other way: x_t = t x1 + (1 - t) x0 with x1 the data and x0 the noise
  (ICPlan), so t = 1 is the data and the network predicts the velocity x1 - x0; its time input
  is t itself. Ours: x_t = (1 - t) x + t eps, velocity eps - x. So ours(x, t) = -SiT(x, 1 - t),
  and both are exact linear rewrites of the weights: the sinusoid of 1 - t is a fixed rotation
  of the sinusoid of t per frequency (cos f(1-t) = cos f cos ft + sin f sin ft, sin f(1-t) =
  sin f cos ft - cos f sin ft), folded into the first layer of the time MLP; the sign into the
  final linear layer. Released SiT-XL/2 learns the variance: its output layer has 2C channels
  per pixel, of which the first C are the velocity (SiT's forward keeps `x.chunk(2, dim=1)[0]`);
  the other rows are dropped. `time_scale` 1.
- `repa-sit` (sihyun-yu/REPA, `models/sit.py`, `loss.py`): DiT's module names plus the
  alignment `projectors.*`, dropped (sampling never uses them). Its linear path is ours (alpha =
  1 - t, sigma = t, velocity eps - x), its time input t itself: `time_scale` 1, no other change.
  Checkpoints from REPA's train.py are dicts {model, ema, opt, args, steps}: the `weights`
  parameter picks `ema` (the default, what REPA's generate.py samples) or `model`.

Every tensor of the file must map onto a parameter of the network named by `model` with the
same shape, and every parameter must be given; otherwise the import stops naming every missing,
unexpected and misshaped key. SiT's `pos_embed` is a fixed buffer here: the file's is checked
against ours (a different grid or patch shows there).
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

import torch

from .. import config as config_mod
from ..errors import SpecmatchError
from ..runtime import atomic
from ..runtime.hashing import sha256_file
from ..runtime.provenance import Provenance
from ..runtime.weights import load_safetensors, mismatch_problems
from . import artifact, models

log = logging.getLogger(__name__)

STAGE = "import-model"
LAYOUTS = ("uvit", "sit", "repa-sit")
# The network's time input for each layout (see the module docstring).
TIME_SCALES = {"uvit": 999.0, "sit": 1.0, "repa-sit": 1.0}
FAMILY = {"uvit": "uvit", "sit": "sit", "repa-sit": "sit"}
DEFAULT_PROCESS = {"uvit": {"kind": "vp-linear"}, "sit": {"kind": "linear"}, "repa-sit": {"kind": "linear"}}
# REPA's README training command for its released SiT-XL/2: DINOv2-B/14, block 8, lambda 0.5.
REPA_ALIGNMENT = {"kind": "repa", "encoder": "dinov2-vitb14", "depth": 8, "weight": 0.5,
                  "projector": "mlp (dropped on import)"}


# --------------------------------------------------------------------------- reading


def read_checkpoint(path: str | Path, weights: str = "ema") -> dict[str, torch.Tensor]:
    """The state dict of a released checkpoint file: safetensors, or a torch file read with
    weights_only=True (argparse.Namespace allowed: REPA's and SiT's train.py store their `args`
    beside the weights). A dict holding `ema` / `model` gives the entry `weights` asks for; a bare
    state dict is taken as it is."""
    path = Path(path)
    if not path.is_file():
        raise SpecmatchError(f"{path}: checkpoint file is missing")
    if path.suffix == ".safetensors":
        obj: Any = load_safetensors(path)
    else:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, RuntimeError (bad zip), EOFError: name the file
            raise SpecmatchError(f"{path}: cannot be read with torch.load(weights_only=True) "
                                 f"({type(e).__name__}: {str(e)[:300]})") from e
    if not isinstance(obj, dict):
        raise SpecmatchError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if any(k in obj for k in ("ema", "model")) and not all(torch.is_tensor(v) for v in obj.values()):
        if weights not in obj:
            raise SpecmatchError(f"{path}: a training checkpoint without {weights!r} weights (it holds "
                                 f"{sorted(obj)}); set `weights` to one of those")
        obj = obj[weights]
    bad = sorted(k for k, v in obj.items() if not torch.is_tensor(v))
    if bad:
        raise SpecmatchError(f"{path}: entries that are not tensors: {bad[:10]} (not a state dict)")
    return obj


# --------------------------------------------------------------------------- conversions


def _reversed_time_rotation(freq_dim: int, scale: float = 1.0) -> torch.Tensor:
    """M (freq_dim x freq_dim, float64) with emb(scale * (1 - t)) = M emb(scale * t) for the
    [cos, sin] sinusoid of `models.timestep_embedding` (even freq_dim)."""
    half = freq_dim // 2
    f = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half) * scale
    c, s = torch.cos(f), torch.sin(f)
    m = torch.zeros(freq_dim, freq_dim, dtype=torch.float64)
    idx = torch.arange(half)
    m[idx, idx], m[idx, half + idx] = c, s
    m[half + idx, idx], m[half + idx, half + idx] = s, -c
    return m


def _keep_first_half_of_channels(t: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """Rows of a (p*p*2C, ...) output layer for the first C channels of every pixel (DiT's
    unpatchify orders the features (p, q, c))."""
    rows = torch.arange(t.shape[0]).reshape(patch * patch, 2 * channels)[:, :channels].reshape(-1)
    return t[rows]


def convert(state: dict[str, torch.Tensor], layout: str, net: torch.nn.Module,
            where: str = "checkpoint") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our state dict for `net` from a released checkpoint's `state` of `layout`, and the list
    of conversions applied (for the summary). Errors name every missing, unexpected and misshaped
    key."""
    if layout not in LAYOUTS:
        raise SpecmatchError(f"import-model: unknown layout {layout!r}; known: {list(LAYOUTS)}")
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    state = {k: v.detach().to(torch.float32) for k, v in state.items()}
    done: list[str] = []
    if layout == "repa-sit":
        dropped = [k for k in state if k.startswith("projectors.")]
        state = {k: v for k, v in state.items() if k not in dropped}
        if dropped:
            done.append(f"dropped the {len(dropped)} alignment projector tensors (projectors.*)")
    if layout == "uvit":
        if "time_embed.0.weight" in state:
            raise SpecmatchError(f"{where}: a U-ViT with mlp_time_embed=True (time_embed.* tensors); ours embeds "
                                 "time as a bare sinusoid token, as every released U-ViT config")
        pe = state.get("pos_embed")
        if pe is not None and net.num_classes > 0 and pe.ndim == 3 and pe.shape[1] >= 2:
            state["pos_embed"] = pe[:, [1, 0, *range(2, pe.shape[1])]]
            done.append("pos_embed rows of the label and time tokens swapped (U-ViT: [label, time, ...]; ours: "
                        "[time, label, ...])")
    if layout == "sit":
        lin_w, lin_b = state.get("final_layer.linear.weight"), state.get("final_layer.linear.bias")
        rows = net.patch * net.patch * net.in_channels
        if lin_w is not None and lin_b is not None and lin_w.shape[0] == 2 * rows:
            state["final_layer.linear.weight"] = _keep_first_half_of_channels(lin_w, net.patch, net.in_channels)
            state["final_layer.linear.bias"] = _keep_first_half_of_channels(lin_b, net.patch, net.in_channels)
            done.append("learned-sigma output rows dropped (the first C channels per pixel are the prediction)")
        w0 = state.get("t_embedder.mlp.0.weight")
        if w0 is not None and w0.shape[-1] == models.SIT_FREQ_DIM:
            rot = _reversed_time_rotation(models.SIT_FREQ_DIM, net.time_scale)
            state["t_embedder.mlp.0.weight"] = (w0.double() @ rot).float()
            done.append("time reversed (SiT: t = 1 data; ours: t = 0 data), folded into t_embedder.mlp.0")
        for k in ("final_layer.linear.weight", "final_layer.linear.bias"):
            if k in state:
                state[k] = -state[k]
        done.append("velocity sign flipped (SiT: data - noise; ours: noise - data), folded into final_layer.linear")
    if FAMILY[layout] == "sit" and "pos_embed" in state and "pos_embed" in want:
        pe = state["pos_embed"]
        ours = net.state_dict()["pos_embed"]
        if tuple(pe.shape) == tuple(ours.shape) and not torch.allclose(pe, ours, atol=1e-4):
            raise SpecmatchError(f"{where}: pos_embed is not the 2-D sin-cos embedding of a "
                                 f"{net.token_grid[0]}x{net.token_grid[1]} grid of width {net.hidden_dim} "
                                 f"(max difference {float((pe - ours).abs().max()):.3g}); another input_size or patch?")
    misshaped = [f"{k} {tuple(v.shape)} (expected {want[k]})" for k, v in sorted(state.items())
                 if k in want and tuple(v.shape) != want[k]]
    problems = mismatch_problems(set(want) - set(state), set(state) - set(want), misshaped)
    if problems:
        raise SpecmatchError(f"{where}: does not fit {net.name} ({layout} layout, {net.in_channels}x{net.input_size}"
                             f"x{net.input_size}, {net.num_classes} classes): " + "; ".join(problems))
    return {k: state[k].contiguous() for k in want}, done


# --------------------------------------------------------------------------- the stage


def import_model(params: dict[str, Any], checkpoint: str | Path, name: str, out: str | Path) -> dict[str, Any]:
    """Write the `train-diffusion`-format output of a released checkpoint (`params`: schema
    `$defs/import_model`)."""
    p = config_mod.validate(params, "import_model", where="import-model", source=f"parameters of {name}")
    layout, checkpoint = p["layout"], Path(checkpoint)
    cfg, _ = models.parse_name(p["model"])
    if cfg.family != FAMILY[layout]:
        raise SpecmatchError(f"import-model: model {p['model']!r} is a {cfg.family} network, layout {layout!r} "
                             f"holds a {FAMILY[layout]} one")
    process = p["process"] or DEFAULT_PROCESS[layout]
    if process["kind"] != DEFAULT_PROCESS[layout]["kind"]:
        raise SpecmatchError(f"import-model: layout {layout!r} was trained on the {DEFAULT_PROCESS[layout]['kind']!r} "
                             f"process (after conversion), not {process['kind']!r}")
    time_scale = TIME_SCALES[layout]
    net = models.build(p["model"], in_channels=p["in_channels"], input_size=p["input_size"],
                       num_classes=p["num_classes"], time_scale=time_scale)
    sha = sha256_file(checkpoint)
    state, done = convert(read_checkpoint(checkpoint, p["weights"]), layout, net, str(checkpoint))
    net.load_state_dict(state)
    prefix = "ema" if p["weights"] == "ema" else "net"
    alignment = p["alignment"] or (REPA_ALIGNMENT if layout == "repa-sit" else {"kind": "none"})
    summary = {"name": name, "kind": artifact.KIND, "fingerprint": sha, "model": p["model"],
               "process": config_mod.validate(process, "diff_process", where="import-model.process"),
               "conditional": p["num_classes"] > 0, "num_classes": net.num_classes, "in_channels": net.in_channels,
               "input_size": net.input_size, "token_grid": list(net.token_grid), "steps": p["trained_steps"],
               "world_size": None, "ema": prefix == "ema", "parameters": models.count_parameters(net),
               "time_scale": time_scale,
               "latents": {"autoencoder": p["autoencoder"], "scale_factor": p["scale_factor"],
                           "shape": [net.in_channels, net.input_size, net.input_size], "count": None,
                           "manifest_sha256": None},
               "alignment": alignment,
               "imported": {"layout": layout, "file": checkpoint.name, "sha256": sha, "weights": prefix,
                            "conversions": done, "source": p["source"]}}
    prov = Provenance(STAGE, name, p)
    prov.add_input(checkpoint, f"checkpoint:{layout}", sha)
    with atomic.atomic_dir(Path(out)) as tmp:
        artifact.write(tmp, {f"{prefix}.{k}": v for k, v in state.items()}, summary, sha, Path(tmp))
        prov.write(out, tmp)
    log.info("import-model %s: %s (%s layout, %d parameters; %s) in %s", name, p["model"], layout,
             summary["parameters"], "; ".join(done) or "no conversion", out)
    return summary
